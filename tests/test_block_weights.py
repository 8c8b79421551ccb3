"""Block-wise LoRA settings: block_dims / block_alphas / conv_block_dims, lr-weight presets, zero threshold,
and the optimizer parameter groups they produce (SD1: 25 blocks, SDXL: 23)."""
from __future__ import annotations

import math

import pytest

from networks import lora
from networks.lora_blocks import block_lr_weights, preset_weights
from tests.conftest import tiny_models

SD_DIMS = "2,4,4,4,8,8,8,8,12,12,12,12,16,12,12,12,12,8,8,8,8,4,4,4,2"  # the guide's example


def network(arch="sd1", dim=4, alpha=1, **kwargs):
    m = tiny_models(arch)
    return lora.create_network(1.0, dim, alpha, None, m.text_encoder, m.unet, **kwargs)


def test_presets_and_offsets():
    s = preset_weights("down_lr_weight", "sine", 12)
    assert s[0] == 0 and s[-1] == pytest.approx(1) and s[5] == pytest.approx(math.sin(math.pi * 5 / 11 / 2))
    assert preset_weights("x", "cosine", 12) == list(reversed(s))
    assert preset_weights("x", "linear", 12) == [i / 11 for i in range(12)]
    assert preset_weights("x", "reverse_linear", 12) == [i / 11 for i in reversed(range(12))]
    assert preset_weights("x", "zeros", 9) == [0.0] * 9
    assert preset_weights("x", "sine+.25", 12) == [v + 0.25 for v in s]  # 0.25 .. 1.25 as the guide says
    with pytest.raises(ValueError, match="up_lr_weight.*unknown preset 'sinus'"):
        preset_weights("up_lr_weight", "sinus", 12)


def test_block_dims_alphas_and_conv_block_dims_sd1():
    alphas = ",".join(str(i % 3 + 1) for i in range(25))
    conv = "0,1,1,1,2,2,2,2,3,3,3,3,4,3,3,3,3,2,2,2,2,1,1,1,0"
    net = network(block_dims=SD_DIMS, block_alphas=alphas, conv_block_dims=conv)
    dims = [int(x) for x in SD_DIMS.split(",")]
    conv_dims = [int(x) for x in conv.split(",")]
    alpha_list = [float(x) for x in alphas.split(",")]
    assert net.unet_loras
    seen_blocks = set()
    for module in net.unet_loras:
        seen_blocks.add(module.block)
        if module.is_conv3x3:
            assert module.lora_dim == conv_dims[module.block]
            assert module.alpha.item() == 1.0  # conv_block_alphas default: conv_alpha (1)
        else:
            assert module.lora_dim == dims[module.block], module.lora_name
            assert module.alpha.item() == alpha_list[module.block]
    assert seen_blocks == set(range(1, 25))
    assert not any(m.block == 24 and m.is_conv3x3 for m in net.unet_loras)  # conv dim 0 there: no module
    assert all(m.lora_dim == 4 for m in net.text_encoder_loras)  # text encoders keep network_dim


def test_block_dims_without_conv_keep_lierla_set():
    net = network(block_dims=SD_DIMS)
    assert not any(m.is_conv3x3 for m in net.unet_loras)
    assert len(net.unet_loras) == len(network().unet_loras)


def test_lr_weights_zero_blocks_get_no_modules_and_groups_have_weighted_lrs():
    net = network(down_lr_weight="0,0,0,0,0,0,1,1,1,1,1,1", mid_lr_weight="2.0",
                  up_lr_weight="1.5,1.5,1.5,1.5,1.0,1.0,1.0,1.0,0.5,0.5,0.5,0.5")
    assert net.unet_loras and all(m.block >= 6 for m in net.unet_loras)
    groups = net.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert net.lr_descriptions[0] == "textencoder" and groups[0]["lr"] == 5e-5
    weights = [0.0] * 6 + [1.0] * 6 + [2.0] + [1.5] * 4 + [1.0] * 4 + [0.5] * 4
    expected = {b: 1e-4 * w for b, w in enumerate(weights)}
    for desc, group in zip(net.lr_descriptions[1:], groups[1:]):
        block = int(desc.split()[-1])
        assert group["lr"] == pytest.approx(expected[block])
        ids = {id(p) for p in group["params"]}
        assert ids == {id(p) for m in net.unet_loras if m.block == block for p in m.parameters()}
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(net.parameters()))


def test_default_lr_used_without_unet_lr_and_plain_groups_without_block_weights():
    net = network(mid_lr_weight=0.5)
    groups = net.prepare_optimizer_params(None, None, 1e-3)
    assert "lr" not in groups[0]
    mid = groups[net.lr_descriptions.index("unet block 12")]
    assert mid["lr"] == pytest.approx(5e-4)
    plain = network()
    groups = plain.prepare_optimizer_params(None, 2e-4, 1e-3)
    assert plain.lr_descriptions == ["textencoder", "unet"] and groups[1]["lr"] == 2e-4 and "lr" not in groups[0]


def test_zero_threshold_with_presets():
    weights = block_lr_weights({"block_lr_zero_threshold": "0.2", "down_lr_weight": "sine", "mid_lr_weight": "1.5",
                                "up_lr_weight": "cosine+.5"}, sdxl=False)
    sine = preset_weights("d", "sine", 12)
    assert weights[:12] == [w if w > 0.2 else 0.0 for w in sine] and weights[0] == 0 and weights[1] == 0
    assert weights[2] == pytest.approx(math.sin(math.pi / 11))  # 0.28 stays
    assert weights[12] == 1.5 and weights[13:] == preset_weights("u", "cosine+.5", 12)
    net = network(block_lr_zero_threshold="0.2", down_lr_weight="sine")
    blocks = {m.block for m in net.unet_loras}
    assert 1 not in blocks and 2 in blocks  # sin(pi/22) = 0.14 is dropped, sin(pi/11) = 0.28 kept
    assert 1 in {m.block for m in network(block_lr_zero_threshold="0.1", down_lr_weight="sine").unet_loras}


def test_sdxl_uses_23_blocks_and_9_3_9_weights():
    dims = ",".join(["0", "0"] + ["2"] * 8 + ["3"] * 3 + ["5"] * 9 + ["0"])
    net = network("sdxl", block_dims=dims, down_lr_weight="zeros+1", mid_lr_weight="1,0,1", up_lr_weight="linear")
    for m in net.unet_loras:
        assert m.lora_dim == [int(x) for x in dims.split(",")][m.block]
    assert not any(m.block == 11 for m in net.unet_loras)  # middle_block.1 (the transformer) has lr weight 0
    assert not any(m.block == 13 for m in net.unet_loras)  # linear preset starts at 0
    groups = net.prepare_optimizer_params(None, 1.0, None)
    lrs = dict(zip(net.lr_descriptions, (g.get("lr") for g in groups)))
    assert lrs["unet block 14"] == pytest.approx(1 / 8) and lrs["unet block 17"] == pytest.approx(4 / 8)
    assert lrs["unet block 5"] == pytest.approx(1.0) and lrs["unet block 8"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="block_dims: expected 23"):
        network("sdxl", block_dims=SD_DIMS)
    with pytest.raises(ValueError, match="mid_lr_weight"):
        network("sdxl", mid_lr_weight="1,1")


def test_wrong_counts_and_values_name_the_argument():
    with pytest.raises(ValueError, match="block_dims: expected 25"):
        network(block_dims="1,2,3")
    with pytest.raises(ValueError, match="block_alphas.*needs block_dims"):
        network(block_alphas=",".join(["1"] * 25))
    with pytest.raises(ValueError, match="block_alphas=.*expected a number"):
        network(block_dims=SD_DIMS, block_alphas=",".join(["x"] * 25))
    with pytest.raises(ValueError, match="conv_block_dims: dims must be whole"):
        network(block_dims=SD_DIMS, conv_block_dims=",".join(["1.5"] * 25))


def test_python_lists_accepted_like_strings():
    a = network(block_dims=[int(x) for x in SD_DIMS.split(",")], down_lr_weight=[1.0] * 12)
    b = network(block_dims=SD_DIMS, down_lr_weight=",".join(["1"] * 12))
    assert [(m.lora_name, m.lora_dim) for m in a.unet_loras] == [(m.lora_name, m.lora_dim) for m in b.unet_loras]


def test_short_lr_weight_lists_are_padded_with_one_and_long_ones_cut(caplog):
    """The English guide's own example, `"down_lr_weight=0.5,1.0" "mid_lr_weight=2.0" "up_lr_weight=1.5"`:
    sd-scripts pads short lists with 1.0 and cuts long ones, with a warning."""
    weights = block_lr_weights({"down_lr_weight": "0.5,1.0", "mid_lr_weight": "2.0", "up_lr_weight": "1.5"},
                               sdxl=False)
    assert weights == [0.5] + [1.0] * 11 + [2.0] + [1.5] + [1.0] * 11
    assert "down_lr_weight: 2 values for 12 blocks; the last 10 are 1.0" in caplog.text
    sdxl = block_lr_weights({"down_lr_weight": ",".join(["0.5"] * 12)}, sdxl=True)
    assert sdxl[1:10] == [0.5] * 9 and sdxl[0] == 1.0 and sdxl[10:] == [1.0] * 13
    assert "down_lr_weight: 12 values for 9 blocks; values after the 9th are ignored" in caplog.text
