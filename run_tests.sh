#!/usr/bin/env bash
# Sets up the environment with the test tools (once; see tools/setup_env.sh --dev) and runs the test suite on tiny
# models: one pytest worker per core (at most 4), each worker single-threaded.
# Extra arguments go to pytest, e.g. `bash run_tests.sh tests/test_lora.py -x`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
venv="$(bash tools/setup_env.sh --dev)"
# count cores before OMP_NUM_THREADS=1 is exported: nproc honours OMP_NUM_THREADS / OMP_THREAD_LIMIT
cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
workers=$(( cores < 4 ? cores : 4 ))
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
set +e
"$venv/bin/python" -m pytest -n "$workers" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
