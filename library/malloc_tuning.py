"""Keep glibc's allocator from handing activation memory back to the kernel between training steps (CPU).

A training step allocates and frees activation-sized tensors (megabytes each) thousands of times. With glibc's
default, adaptive thresholds, many of them are served by fresh `mmap` or carved from a heap top that was just
trimmed back to the kernel, so each step touches new pages: hundreds of thousands of page faults, each one a
zeroed page, 3-6% of an SDXL LoRA step on two cores (measured with bench/bench_train.py; the LoRA path's extra
small tensors make it worse than the frozen model's). Fixing the thresholds lets freed memory be reused: tensors
up to 32 MiB (glibc's ceiling for this setting) come from the heap, and up to 1 GiB of free heap top is kept.
Peak memory does not grow: freed blocks are reused, not added to. No effect outside Linux/glibc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # the largest value glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2**30

_applied = False


def keep_freed_memory_for_reuse() -> bool:
    """Set glibc's mmap and trim thresholds once per process; True when they are (now or before) set."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        _applied = True
        logger.debug("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB", MMAP_THRESHOLD >> 20,
                     TRIM_THRESHOLD >> 20)
    return ok
