#!/usr/bin/env bash
# Creates (once) the virtual environment that the README's commands use and prints its path.
#   bash tools/setup_env.sh          the main job's packages (torch + requirements.txt)
#   bash tools/setup_env.sh --dev    the same venv plus the test tools and optional extras (requirements-dev.txt)
# The venv lives outside the checkout, keyed by the hash of requirements.txt, so a second run, or a fresh clone on
# the same machine, is instant; `.venv` in the checkout is a link to it (`source .venv/bin/activate` enters it).
# Override the location with SD_LORA_VENV.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_pin="torch==2.13.0"
hash=$( (echo "$torch_pin"; cat "$root/requirements.txt") | sha256sum | cut -c1-12)
venv="${SD_LORA_VENV:-$HOME/.cache/sd-lora-suite/venv-$hash}"
dev_marker="$venv/.complete-dev-$(sha256sum "$root/requirements-dev.txt" | cut -c1-12)"
log="$venv.log"

pip_install() {  # torch first and in the same command: otherwise optional packages pull a CUDA build of torch.
  if ! "$venv/bin/pip" install --disable-pip-version-check "$torch_pin" "$@" >>"$log" 2>&1; then
    tail -n 30 "$log" >&2; echo "setup failed; full log: $log" >&2; exit 1
  fi
}

need_dev=0; [ "${1:-}" = "--dev" ] && [ ! -f "$dev_marker" ] && need_dev=1
if [ ! -f "$venv/.complete" ] || [ "$need_dev" = 1 ]; then
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"; flock 9  # two commands started at once build it once
  if [ ! -f "$venv/.complete" ]; then
    echo "setting up $venv (one time, a few minutes)" >&2
    rm -rf "$venv"; : >"$log"
    python3 -m venv "$venv"
    pip_install -r "$root/requirements.txt"
    touch "$venv/.complete"
  fi
  if [ "${1:-}" = "--dev" ] && [ ! -f "$dev_marker" ]; then
    echo "adding the test tools and optional packages to $venv (one time)" >&2
    pip_install -r "$root/requirements-dev.txt"
    touch "$dev_marker"
  fi
fi
# `.venv` in the checkout: where users and editors look. A real .venv of the user's own is left alone.
if [ "$venv" != "$root/.venv" ] && { [ -L "$root/.venv" ] || [ ! -e "$root/.venv" ]; }; then
  ln -sfn "$venv" "$root/.venv"
fi
echo "$venv"
