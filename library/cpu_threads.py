"""CPU thread count of training: torch's default (every core) with OpenMP's passive wait policy.

Two OpenMP threads that spin while they wait fall off a cliff on a machine where another process holds a core (the
demo's 8 steps: over 28 minutes against 83 s with one thread). With `OMP_WAIT_POLICY=PASSIVE`, which
`library/__init__.py` sets before torch loads unless the user chose a policy, two threads stay within the noise of
one on such a machine and, on an idle one, train a full-size SD 1.5 step 1.6x faster than one (8.5 s against 13.9 s;
docs/benchmarks.md, "CPU threads"). `OMP_NUM_THREADS` (or accelerate's `--num_cpu_threads_per_process`, which sets
it) chooses the count.
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def apply_default_cpu_threads(device: torch.device) -> int:
    """Log the CPU training's thread count and wait policy (warn when several threads spin); returns the count."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        policy = os.environ.get("OMP_WAIT_POLICY", "default")
        logger.info("CPU training with %d thread(s), OMP_WAIT_POLICY=%s (OMP_NUM_THREADS sets the count)",
                    threads, policy)
        if threads > 1 and policy.upper() != "PASSIVE":
            logger.warning("%d OpenMP threads with OMP_WAIT_POLICY=%s spin while they wait: on a machine where "
                           "another process holds a core this can be many times slower; set "
                           "OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1", threads, policy)
    return threads
