"""LoHa, LoKr and DoRA networks on tiny SD1 / SD2 / SDXL models: exact file keys and shapes, and what each module
adds to its layer equals the update the consumers (ComfyUI / webui formula) compute from the saved file alone."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from library.file_io import read_metadata
from networks import adapter_math, lokr, lora
from networks.lora_names import lora_targets
from tests.conftest import tiny_models
from tests.consumer_formulas import consumer_weight, group, layer_input, layer_output
from tests.lora_helpers import outputs, randomize

ARCHS = ["sd1", "sd2", "sdxl"]
ALGOS = {
    "loha": ("networks.loha", {"conv_dim": "2", "conv_alpha": "1"}),
    "lokr": ("networks.lokr", {"conv_dim": "2", "conv_alpha": "1", "factor": "4"}),
    "lokr_both": ("networks.lokr", {"decompose_both": "True", "factor": "8"}),
    "dora": ("networks.lora", {"dora_wd": "True", "conv_dim": "2"}),
    "loha_dora": ("networks.loha", {"dora_wd": "True"}),
}
KEYS = {
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}


def build(arch: str, algo: str, dim: int = 4, alpha: float = 2):
    import importlib

    module_name, kwargs = ALGOS[algo]
    m = tiny_models(arch)
    net = importlib.import_module(module_name).create_network(1.0, dim, alpha, m.vae, m.text_encoder, m.unet,
                                                              **kwargs)
    return m, net


def randomize_adapter(net, scale: float = 0.3) -> None:
    randomize(net, scale)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("dora_scale"):
                p.abs_().add_(0.5)


def check_file_against_layers(path: str, models, multiplier: float = 1.0) -> int:
    """Every module of the file: the hooked layer's output equals the layer run with the consumer-formula weight."""
    sd = load_file(path)
    targets = lora_targets(models.text_encoders, models.unet, include_conv3x3=True, include_extra=True)
    checked = 0
    for name, parts in group(sd).items():
        layer = targets[name].module
        x = layer_input(layer)
        expected = layer_output(layer, x, consumer_weight(layer.weight.detach(), parts, multiplier))
        with torch.no_grad():
            got = layer(x).double()
        assert torch.allclose(got, expected, atol=2e-4, rtol=1e-4), (name, float((got - expected).abs().max()))
        checked += 1
    return checked


@pytest.mark.parametrize("algo", list(ALGOS))
@pytest.mark.parametrize("arch", ARCHS)
def test_module_adds_what_consumers_compute_from_the_file(arch, algo, tmp_path):
    m, net = build(arch, algo)
    base = outputs(m)
    net.apply_to(m.text_encoder, m.unet)
    assert all(torch.equal(a, b) for a, b in zip(outputs(m), base))  # a fresh network changes nothing
    randomize_adapter(net)
    path = str(tmp_path / f"{algo}.safetensors")
    net.save_weights(path, torch.float32, {"ss_network_module": ALGOS[algo][0], "ss_network_dim": "4"})
    n = check_file_against_layers(path, m)
    assert n == len(net.text_encoder_loras) + len(net.unet_loras) > 10
    net.set_multiplier(0.6)
    check_file_against_layers(path, m, 0.6)

    sd = load_file(path)
    for name, parts in group(sd).items():
        keys = set(parts)
        if algo in KEYS:
            assert keys == KEYS[algo], name
        if "dora" in algo:
            weight = net.get_submodule(name).org_module.weight
            assert parts["dora_scale"].shape == (1, weight.shape[1], *([1, 1] if weight.dim() == 4 else [])), name
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == ("loha" if algo.startswith("loha") else "lokr" if "lokr" in algo else "lora")
    assert ("dora_wd" in args) == ("dora" in algo)


def test_lokr_factor_split_as_lycoris():
    assert adapter_math.factorization(128, -1) == (8, 16)
    assert adapter_math.factorization(360, 8) == (8, 45)
    assert adapter_math.factorization(250, 4) == (2, 125)
    assert adapter_math.factorization(127, 8) == (1, 127)
    assert adapter_math.factorization(1024, 16) == (16, 64)
    # SD1.5's 320-wide attention projection at dim 8, factor 8: w1 (8, 8) full, w2 (40, 40) as a rank-8 pair
    assert lokr.lokr_shapes((320, 320), 8, factor=8) == {"lokr_w1": (8, 8), "lokr_w2_a": (40, 8), "lokr_w2_b": (8, 40)}
    # a 3x3 conv keeps the kernel in w2_b (flattened, as ComfyUI's torch.mm needs); a large dim makes w2 full
    assert lokr.lokr_shapes((640, 320, 3, 3), 4, factor=8)["lokr_w2_b"] == (4, 40 * 9)
    assert lokr.lokr_shapes((64, 32), 16, factor=8) == {"lokr_w1": (8, 4), "lokr_w2": (8, 8)}


@pytest.mark.parametrize("algo", ["loha", "lokr", "dora"])
def test_loaded_file_merges_like_it_applies_and_loads_under_any_module(algo, tmp_path):
    m, net = build("sd1", algo)
    net.apply_to(m.text_encoder, m.unet)
    randomize_adapter(net, 0.2)
    applied = outputs(m)
    path = str(tmp_path / "a.safetensors")
    net.save_weights(path)
    for module in (lora, lokr):  # any network module reads any of these files
        m2 = tiny_models("sd1")
        net2, sd = module.create_network_from_weights(1.0, path, None, m2.text_encoder, m2.unet)
        net2.merge_to(m2.text_encoder, m2.unet, sd)
        assert all(torch.allclose(a, b, atol=2e-4, rtol=1e-4) for a, b in zip(outputs(m2), applied))
    m3 = tiny_models("sd1")
    net3, sd = lora.create_network_from_weights(1.0, path, None, m3.text_encoder, m3.unet)
    net3.apply_to(m3.text_encoder, m3.unet)
    net3.load_state_dict(sd, strict=False)
    assert all(torch.allclose(a, b, atol=2e-4, rtol=1e-4) for a, b in zip(outputs(m3), applied))


def test_max_norm_scales_the_delta_of_every_algorithm():
    for algo in ("loha", "lokr", "dora"):
        m, net = build("sd1", algo)
        randomize_adapter(net, 0.5)
        scaled, mean, largest = net.apply_max_norm_regularization(0.05)
        assert scaled > 0 and largest <= 0.05 + 1e-4
        for module in net.unet_loras:
            assert float(module.delta_weight().detach().norm()) <= 0.05 + 1e-4


def test_block_dims_lr_weights_and_dropouts_apply_to_loha_and_lokr():
    from networks import loha

    dims = ",".join(["2"] * 12 + ["3"] + ["4"] * 12)  # SD1: 25 blocks (input 0-11, middle 12, output 13-24)
    for module in (loha, lokr):
        m = tiny_models("sd1")
        net = module.create_network(1.0, 4, 1, None, m.text_encoder, m.unet, block_dims=dims,
                                    block_alphas=",".join(["1"] * 25), down_lr_weight="zeros", rank_dropout="0.5",
                                    module_dropout="0.1")
        by_block = {lm.block: lm.lora_dim for lm in net.unet_loras}
        assert all(d == (2 if b < 12 else 3 if b == 12 else 4) for b, d in by_block.items())
        groups = net.prepare_optimizer_params(None, 1e-3, 1e-3)
        trained = {id(p) for g in groups for p in g["params"]}
        assert not any(id(p) in trained for lm in net.unet_loras if lm.block < 12 for p in lm.parameters())
        assert all(id(p) in trained for lm in net.unet_loras if lm.block > 12 for p in lm.parameters())
        layer = net.unet_loras[-1]
        assert layer.rank_dropout == 0.5 and layer.module_dropout == 0.1
        randomize_adapter(net)
        net.apply_to(m.text_encoder, m.unet)
        x = layer_input(layer.org_module)
        net.train()
        torch.manual_seed(0)
        a = layer.org_module(x)
        torch.manual_seed(1)
        b = layer.org_module(x)
        assert not torch.allclose(a, b)  # rank dropout draws a new mask each step
        net.eval()
        assert torch.equal(layer.org_module(x), layer.org_module(x))
