"""CPU thread count of training: one thread unless the user set OMP_NUM_THREADS.

With two OpenMP threads on a machine where another process holds a core, every parallel operation waits for the
thread that is not running: the demo's steps went from ~1 s to 20-56 s (docs/benchmarks.md, "CPU threads"). One
thread never falls off that cliff, so it is the default of CPU training; `OMP_NUM_THREADS=2` (or accelerate's
`--num_cpu_threads_per_process 2`, which sets it) uses more on a machine that is otherwise idle.
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)
DEFAULT_CPU_THREADS = 1


def apply_default_cpu_threads(device: torch.device) -> int:
    """On the CPU without OMP_NUM_THREADS in the environment, use DEFAULT_CPU_THREADS; returns the thread count."""
    if device.type == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(DEFAULT_CPU_THREADS)
        logger.info("CPU training with %d thread (set OMP_NUM_THREADS to use more)", DEFAULT_CPU_THREADS)
    return torch.get_num_threads()
