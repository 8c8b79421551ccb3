"""CPU training runs one thread unless OMP_NUM_THREADS is set (docs/benchmarks.md, "CPU threads")."""
from __future__ import annotations

import torch

from library.cpu_threads import apply_default_cpu_threads


def test_one_thread_without_omp_num_threads_and_the_users_setting_otherwise(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert apply_default_cpu_threads(torch.device("cpu")) == 2  # the user's choice stays
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert apply_default_cpu_threads(torch.device("meta")) == 2  # not the CPU: untouched
        assert apply_default_cpu_threads(torch.device("cpu")) == 1
    finally:
        torch.set_num_threads(before)
