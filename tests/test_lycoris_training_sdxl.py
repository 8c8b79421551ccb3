"""LoHa, LoKr and DoRA trained through sdxl_train_network.py on a tiny SDXL model: the saved file, applied by the
consumers' formula alone, gives the trained layers' outputs (the checks of test_lycoris_training.py)."""
from __future__ import annotations

import pytest

from tests.test_lycoris_training import ALGOS, check_trained_file_applies_as_trained, dataset  # noqa: F401


@pytest.mark.parametrize("algo", list(ALGOS))
def test_sdxl_trained_file_applies_as_trained(algo, dataset, tmp_path):  # noqa: F811
    check_trained_file_applies_as_trained("sdxl", algo, dataset, tmp_path)
