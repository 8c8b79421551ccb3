"""Shared training and model code of the suite."""
import os as _os

# OpenMP threads sleep while they wait instead of spinning: with spinning, two threads on a machine where another
# process holds a core fell off a cliff (8 demo steps: over 28 minutes against 83 s). It must be set before torch
# loads libgomp, so it is set here, on the first import of `library`; a user's own value is kept.
# Measurements: docs/benchmarks.md ("CPU threads"); thread count: library/cpu_threads.py.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
