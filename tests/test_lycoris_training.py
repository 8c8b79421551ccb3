"""LoHa, LoKr and DoRA trained through train_network.py on tiny SD1 / SD2 models (SDXL: test_lycoris_training_sdxl.py):
the saved file, applied by the consumers' formula alone, gives the trained layers' outputs; LyCORIS metadata;
continuing from a file."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from library.file_io import read_metadata
from tests.test_lycoris_networks import check_file_against_layers
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train

ALGOS = {
    "loha": ["--network_module", "networks.loha", "--network_args", "conv_dim=2", "conv_alpha=1"],
    "lokr": ["--network_module", "networks.lokr", "--network_args", "factor=4", "conv_dim=2"],
    "dora": ["--network_module", "networks.lora", "--network_args", "dora_wd=True"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("data"), repeats=2)


def run(arch: str, algo: str, dataset: str, out, *extra: str):
    args = base_args(tiny_model_dir(arch=arch), dataset, out, "--max_train_steps", "6", "--learning_rate", "1e-2",
                     *ALGOS[algo], *(["--v2"] if arch == "sd2" else []), *extra)
    return train(args, sdxl=arch == "sdxl")


def check_trained_file_applies_as_trained(arch: str, algo: str, dataset: str, tmp_path) -> None:
    trainer = run(arch, algo, dataset, tmp_path / "out")
    path = trainer.final_path
    sd = load_file(path)
    changed = [k for k in sd if k.endswith(("hada_w2_a", "lokr_w2", "lokr_w2_b", "lora_up.weight"))
               and sd[k].abs().max() > 0]
    assert changed, "training changed no module"
    assert any(k.startswith("lora_te") for k in changed) and any(k.startswith("lora_unet") for k in changed)
    net = trainer.accelerator.unwrap_model(trainer.network)
    net.eval()
    n = check_file_against_layers(path, trainer.components)
    assert n == len(net.text_encoder_loras) + len(net.unet_loras)
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ("lora" if algo == "dora" else algo) and meta["ss_network_dim"] == "4"
    assert args.get("dora_wd") == ("True" if algo == "dora" else None)


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_trained_file_applies_as_trained(arch, algo, dataset, tmp_path):
    check_trained_file_applies_as_trained(arch, algo, dataset, tmp_path)


def test_continue_from_weights_with_dim_from_weights(dataset, tmp_path):
    first = run("sd1", "lokr", dataset, tmp_path / "a")
    # lr 0: the continued run starts from the file and saves it unchanged (shapes and values read back)
    second = run("sd1", "lokr", dataset, tmp_path / "b", "--network_weights", first.final_path, "--dim_from_weights",
                 "--learning_rate", "0", "--max_train_steps", "1")
    a, b = load_file(first.final_path), load_file(second.final_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
