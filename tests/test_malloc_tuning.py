"""library.malloc_tuning: freed activation memory is reused instead of being faulted in again (Linux/glibc)."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc only")

PRELUDE = r"""
import ctypes, resource, sys, torch
sys.path.insert(0, {root!r})
if {tune}:
    from library.malloc_tuning import keep_freed_memory_for_reuse
    assert keep_freed_memory_for_reuse() and keep_freed_memory_for_reuse()  # once per process, then a no-op
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
"""

# a 20 MiB tensor: from a fresh mapping (given back when freed) or from the heap (kept for reuse)
WHERE = r"""
t = torch.empty(5 * 2**20)
mapped = libc.mallinfo2().hblkhd
del t
print(mapped >= 20 * 2**20, libc.mallinfo2().fordblks >= 20 * 2**20)
"""

# a step's pattern in small: 4, 8 and 12 MiB tensors, older ones freed while newer ones are made
CHURN = r"""
def churn():
    tensors = []
    for i in range(24):
        tensors.append(torch.ones(2**20 * (1 + i % 3)))
        if i % 4 == 3:
            tensors.pop(0)
    del tensors
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(tune: bool, body: str) -> list[str]:
    code = PRELUDE.format(root=str(ROOT), tune=tune) + body
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_tensors_up_to_32_mib_come_from_the_heap_and_stay_for_reuse():
    assert _run(False, WHERE) == ["True", "False"]  # glibc's default: mapped, and unmapped when freed
    assert _run(True, WHERE) == ["False", "True"]  # tuned: from the heap, and the freed block is kept


def test_a_step_like_churn_faults_next_to_no_pages_in_again():
    pages_written = 20 * 8 * (4 + 8 + 12) * 2**20 // 4096  # what 20 rounds would fault if nothing were reused
    assert int(_run(True, CHURN)[-1]) < pages_written // 20
