#!/usr/bin/env bash
# Creates (once) the virtual environment that the README's commands use and prints its path.
# The venv lives outside the checkout, keyed by the requirement files' hash, so a second run,
# or a fresh clone on the same machine, is instant. Override the location with SD_LORA_VENV.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
hash=$(cat "$root/requirements.txt" "$root/requirements-dev.txt" | sha256sum | cut -c1-12)
venv="${SD_LORA_VENV:-$HOME/.cache/sd-lora-suite/venv-$hash}"
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (one time, about a minute)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  # torch first and in the same command: otherwise optional packages pull a CUDA build of torch.
  log="$venv.log"
  if ! "$venv/bin/pip" install --disable-pip-version-check torch==2.13.0 -r "$root/requirements-dev.txt" >"$log" 2>&1; then
    tail -n 30 "$log" >&2; echo "setup failed; full log: $log" >&2; exit 1
  fi
  touch "$venv/.complete"
fi
echo "$venv"
