"""CPU training: every core, OpenMP threads that spin only briefly while they wait, set before torch loads
(docs/benchmarks.md, "CPU threads")."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch

from library.cpu_threads import apply_default_cpu_threads, wait_policy

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import os, library, torch; print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'), "
         "torch.get_num_threads())")


def _probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**clean, **env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True).stdout
    return out.split()


def test_short_spin_is_set_before_torch_loads_and_the_users_choice_stays():
    policy, spins, threads = _probe()
    assert (policy, spins) == ("-", "10000") and int(threads) >= 1  # the count: torch's default
    assert _probe(OMP_WAIT_POLICY="ACTIVE", OMP_NUM_THREADS="1") == ["ACTIVE", "-", "1"]
    assert _probe(OMP_WAIT_POLICY="PASSIVE")[:2] == ["PASSIVE", "-"]
    assert _probe(GOMP_SPINCOUNT="500")[:2] == ["-", "500"]


def test_wait_settings_that_spin_long_are_recognised(monkeypatch):
    for env, long_spin in [({"GOMP_SPINCOUNT": "10000"}, False), ({"OMP_WAIT_POLICY": "PASSIVE"}, False),
                           ({"OMP_WAIT_POLICY": "ACTIVE"}, True), ({}, True), ({"GOMP_SPINCOUNT": "infinity"}, True),
                           ({"GOMP_SPINCOUNT": "300000", "OMP_WAIT_POLICY": "PASSIVE"}, True)]:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert wait_policy()[1] is long_spin, env


def test_thread_count_is_left_to_torch_and_long_spinning_threads_are_warned_about(monkeypatch, caplog):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
        with caplog.at_level(logging.INFO, logger="library.cpu_threads"):
            assert apply_default_cpu_threads(torch.device("cpu")) == 2
        assert "2 thread(s), GOMP_SPINCOUNT=10000" in caplog.text and "spin long" not in caplog.text
        monkeypatch.delenv("GOMP_SPINCOUNT")
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
        with caplog.at_level(logging.INFO, logger="library.cpu_threads"):
            apply_default_cpu_threads(torch.device("cpu"))
        assert "OMP_WAIT_POLICY=ACTIVE spin long while they wait" in caplog.text
    finally:
        torch.set_num_threads(before)
