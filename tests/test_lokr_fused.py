"""LoKr's training paths (networks.lokr_fused): the fused Linear node and the factor-wise conv / Linear delta give the
same output and gradients (input and every factor) as the layer run with the updated weight `W + kron(w1, w2)`."""
from __future__ import annotations

import pytest
import torch

from networks import lokr

FUSED = "FusedLoKrLinearBackward"


def make_module(layer: torch.nn.Module, dim: int, factor: int, decompose_both: bool = False, **kwargs):
    torch.manual_seed(0)
    module = lokr.LoKrModule("t", layer.requires_grad_(False), multiplier=0.7, lora_dim=dim, alpha=dim / 2,
                             factor=factor, decompose_both=decompose_both, **kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    module.apply_to()
    return module


def updated_weight_reference(module, x: torch.Tensor) -> torch.Tensor:
    """The layer run once with `W + multiplier * delta` (the path every tool agrees on: adapter_math)."""
    weight = module.org_module.weight
    return module._layer(x, weight + module.weight_update().to(weight.dtype), module.org_module.bias)


def compare(module, layer, x: torch.Tensor, expect_fused: bool, tol: float = 1e-4, autocast: bool = False):
    params = [p for _, p in sorted(module.named_parameters())]
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = layer(x1)
        expected = updated_weight_reference(module, x2)
    assert (got.grad_fn.name() == FUSED) == expect_fused, got.grad_fn.name()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    g = torch.randn_like(got.transpose(-1, -2)).transpose(-1, -2)  # an incoming gradient need not be contiguous
    grads_got = torch.autograd.grad(got, [x1, *params], g)
    grads_ref = torch.autograd.grad(expected, [x2, *params], g)
    for name, a, b in zip(["x"] + sorted(dict(module.named_parameters())), (got, *grads_got),
                          (expected, *grads_ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        err = float((a.float() - b.float()).abs().max().detach() / b.float().abs().max().detach())
        assert err <= tol, (name, err)


@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("case", ["fp32", "no_bias", "noncontiguous", "bf16_autocast", "full_bf16"])
def test_linear_fused_node_matches_updated_weight(case, decompose_both):
    layer = torch.nn.Linear(96, 128, bias=case != "no_bias")
    module = make_module(layer, dim=2, factor=8, decompose_both=decompose_both)  # w1 (8, 8), w2 (16, 2) @ (2, 12)
    names = set(dict(module.named_parameters()))
    assert {"lokr_w2_a", "lokr_w2_b"} <= names and ("lokr_w1_a" in names) == decompose_both
    x = torch.randn(1, 96, 5).transpose(1, 2) if case == "noncontiguous" else torch.randn(1, 5, 96)
    if case in ("bf16_autocast", "full_bf16"):
        layer.to(torch.bfloat16)
        x = x.bfloat16()
    if case == "full_bf16":
        module.to(torch.bfloat16)
    compare(module, layer, x, expect_fused=True, tol=3e-2 if "bf16" in case else 1e-5,
            autocast=case == "bf16_autocast")


@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("shape", ["full_w2", "rank_dropout", "trainable_layer", "dora_wd", "fp32_layer_autocast"])
def test_linear_general_path_matches_updated_weight(shape, decompose_both):
    """What the node does not take (a full w2, dropouts, a trained base, dora_wd, autocast changing the dtype) runs
    the factor-wise delta or the updated weight, with the same numbers."""
    layer = torch.nn.Linear(96, 128)
    module = make_module(layer, dim=16 if shape == "full_w2" else 2, factor=8, decompose_both=decompose_both,
                         dora_wd=shape == "dora_wd")
    names = set(dict(module.named_parameters()))
    assert ("lokr_w2" in names) == (shape == "full_w2")
    assert ("lokr_w1_a" in names) == (decompose_both and shape != "full_w2")
    if shape == "rank_dropout":
        x = torch.randn(3, 96, requires_grad=True)
        module.rank_dropout = 0.5  # acts in training only
        assert layer(x).grad_fn.name() != FUSED
        module.rank_dropout, module.module_dropout = None, 0.5
        assert layer(x).grad_fn.name() != FUSED
        module.rank_dropout = 0.5
        module.eval()  # compared in eval: deterministic
    if shape == "trainable_layer":
        layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, 96)
    compare(module, layer, x, expect_fused=shape == "rank_dropout", tol=3e-2 if "autocast" in shape else 1e-5,
            autocast=shape == "fp32_layer_autocast")


@pytest.mark.parametrize("decompose_both", [False, True])
@pytest.mark.parametrize("conv", ["3x3", "3x3_stride2", "1x1", "3x3_full_w2", "bf16_autocast"])
def test_conv_factorwise_delta_matches_updated_weight(conv, decompose_both):
    kernel, stride = (1, 1) if conv == "1x1" else (3, 2 if conv == "3x3_stride2" else 1)
    layer = torch.nn.Conv2d(64, 96, kernel, stride=stride, padding=kernel // 2)
    module = make_module(layer, dim=16 if conv == "3x3_full_w2" else 2, factor=8, decompose_both=decompose_both)
    names = set(dict(module.named_parameters()))
    assert ("lokr_w2" in names) == (conv == "3x3_full_w2")
    assert ("lokr_w1_a" in names) == (decompose_both and conv != "3x3_full_w2")
    assert module.bypass(torch.randn(1, 64, 6, 6)) is not None
    compare(module, layer, torch.randn(2, 64, 7, 6), expect_fused=False, tol=3e-2 if "bf16" in conv else 1e-5,
            autocast=conv == "bf16_autocast")


def test_grouped_conv_and_tucker_take_the_updated_weight():
    grouped = make_module(torch.nn.Conv2d(32, 48, 3, padding=1, groups=2), dim=2, factor=4)
    assert grouped.bypass(torch.randn(1, 32, 4, 4)) is None
    compare(grouped, grouped.org_module, torch.randn(1, 32, 5, 5), expect_fused=False, tol=1e-5)
