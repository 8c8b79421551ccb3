"""CPU training: every core with OpenMP's passive wait policy, set before torch loads (docs/benchmarks.md)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from library.cpu_threads import apply_default_cpu_threads

ROOT = Path(__file__).resolve().parent.parent
PROBE = "import os, library, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_passive_wait_policy_is_set_before_torch_loads_and_the_users_choice_stays():
    policy, threads = _probe()
    assert policy == "PASSIVE" and int(threads) >= 1  # the count: torch's default
    assert _probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "1"]


def test_thread_count_is_left_to_torch_and_spinning_threads_are_warned_about(monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
        with caplog.at_level(logging.INFO, logger="library.cpu_threads"):
            assert apply_default_cpu_threads(torch.device("cpu")) == 2
        assert "2 thread(s), OMP_WAIT_POLICY=PASSIVE" in caplog.text and "spin" not in caplog.text
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        with caplog.at_level(logging.INFO, logger="library.cpu_threads"):
            apply_default_cpu_threads(torch.device("cpu"))
        assert "spin while they wait" in caplog.text
    finally:
        torch.set_num_threads(before)
