"""Shared fixtures: tiny random-weight models of each architecture (built once per test process)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

_CACHE: dict[tuple[str, int], object] = {}


def tiny_models(arch: str, seed: int = 0):
    """A fresh deep copy of the tiny models of `arch` (sd1, sd2, sd2-v, sdxl); safe to modify."""
    from library.sd_configs import build_models

    key = (arch, seed)
    if key not in _CACHE:
        _CACHE[key] = build_models(arch, "tiny", seed=seed)
    return copy.deepcopy(_CACHE[key])


@pytest.fixture
def sd1_models():
    return tiny_models("sd1")


@pytest.fixture
def sd2_models():
    return tiny_models("sd2")


@pytest.fixture
def sdxl_models():
    return tiny_models("sdxl")
