"""Shared training and model code of the suite."""
import os as _os

# OpenMP threads spin briefly, then sleep, while they wait for each other: GOMP_SPINCOUNT=10000 (libgomp spins about
# 100,000 times a millisecond, so about 0.1 ms) unless the user chose a policy or a count. libgomp's own default
# (300,000 spins, about 3 ms) fell off a cliff with two threads on a machine where another process holds a core (8
# demo steps: over 28 minutes against 83 s with one thread); never spinning (OMP_WAIT_POLICY=PASSIVE) costs 5-9% of
# an SD 1.5 step on an idle machine. The short spin keeps most of the speed and stays off the cliff. It must be set
# before torch loads libgomp, so it is set here, on the first import of `library`.
# Measurements: docs/benchmarks.md ("CPU threads"); thread count: library/cpu_threads.py.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["GOMP_SPINCOUNT"] = "10000"
