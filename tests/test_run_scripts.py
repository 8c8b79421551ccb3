"""The README's shell commands: run_tests.sh's worker count, the environment setup's two levels, the README's
launch lines."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_tests_starts_one_worker_per_core_even_with_omp_num_threads_set():
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as a user's shell (or run_tests.sh itself) may have it
    proc = subprocess.run(["bash", "run_tests.sh", "tests/test_entry_scripts.py", "-k", "documented"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    workers = min(len(os.sched_getaffinity(0)), 4)
    assert re.search(rf"created: {workers}/{workers} workers", proc.stdout), proc.stdout[-2000:]
