#!/usr/bin/env bash
# Sets up the environment (once; see tools/setup_env.sh) and runs the test suite on tiny models.
# Extra arguments go to pytest, e.g. `bash run_tests.sh tests/test_lora.py -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
venv="$(bash tools/setup_env.sh)"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
workers=$(( $(nproc) < 4 ? $(nproc) : 4 ))
set +e
"$venv/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
