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


# The training tests' defaults (a module may define its own `model` / `dataset` to override them).
@pytest.fixture(scope="module")
def model():
    """A tiny random-weight SD 1.x model as a Diffusers folder."""
    from tests.train_helpers import tiny_model_dir

    return tiny_model_dir()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """One solid-colour captioned image with 4 repeats."""
    from tests.train_helpers import solid_dataset

    return solid_dataset(tmp_path_factory.mktemp("data"), repeats=4)
