"""CPU thread count of training: torch's default (every core), OpenMP threads that spin only briefly while they wait.

Two OpenMP threads that spin long while they wait fall off a cliff on a machine where another process holds a core
(the demo's 8 steps: over 28 minutes against 83 s with one thread, under libgomp's default of about 3 ms). With the
short spin `library/__init__.py` sets before torch loads (GOMP_SPINCOUNT=10000, about 0.1 ms) unless the user chose
a policy, two threads stay off that cliff and, on an idle machine, train a full-size SD 1.5 step 1.6x faster than
one; never spinning (OMP_WAIT_POLICY=PASSIVE) costs 5-9% more (docs/benchmarks.md, "CPU threads").
`OMP_NUM_THREADS` (or accelerate's `--num_cpu_threads_per_process`, which sets it) chooses the count.
"""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


LONG_SPIN = 100_000  # spins (about 1 ms in libgomp) beyond which a waiting thread can hold a core others need


def wait_policy() -> tuple[str, bool]:
    """OpenMP's wait setting as the environment gives it, and whether threads spin long while they wait."""
    policy, count = os.environ.get("OMP_WAIT_POLICY"), os.environ.get("GOMP_SPINCOUNT")
    if count is not None:  # libgomp: GOMP_SPINCOUNT overrides the policy
        try:
            spins = float(count.lower().replace("infinity", "inf"))
        except ValueError:
            spins = float("inf")
        return f"GOMP_SPINCOUNT={count}", spins > LONG_SPIN
    if policy is None:
        return "OMP_WAIT_POLICY unset (libgomp spins about 3 ms)", True
    return f"OMP_WAIT_POLICY={policy}", policy.upper() != "PASSIVE"


def apply_default_cpu_threads(device: torch.device) -> int:
    """Log the CPU training's thread count and wait setting (warn when several threads spin long); the count."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        setting, spins_long = wait_policy()
        logger.info("CPU training with %d thread(s), %s (OMP_NUM_THREADS sets the count)", threads, setting)
        if threads > 1 and spins_long:
            logger.warning("%d OpenMP threads with %s spin long while they wait: on a machine where another "
                           "process holds a core this can be many times slower; unset it (the default spins "
                           "about 0.1 ms), set OMP_WAIT_POLICY=PASSIVE or OMP_NUM_THREADS=1", threads, setting)
    return threads
