"""LoKr (`--network_module networks.lokr`): LoRA with Kronecker product, as LyCORIS's `algo=lokr`.

A layer of shape (out, in[, kh, kw]) has out = a * b and in = c * d split by `factor` (LyCORIS's
`factorization`: the most balanced split with the smaller part <= factor; -1, the default, no limit). The module
adds `kron(w1, w2) * scale` to the weight, with `w1` (a, c) (`lokr_w1`, or `lokr_w1_a @ lokr_w1_b` with
`decompose_both=True` when dim < max(a, c) / 2) and `w2` (b, d[, kh, kw]) (`lokr_w2_a` (b, dim) @ `lokr_w2_b` (dim,
d * kh * kw) when dim < max(b, d) / 2, else the full `lokr_w2`; `full_matrix=True` keeps both full). `scale` is
alpha / dim where a factor is decomposed, else 1 (alpha is ignored, as the loaders do). A large dim therefore
means full factors: use `network_dim=10000` style values for the "full" LoKr LyCORIS users train.
Initialisation: w1 (and w1_a, w1_b, w2_a) Kaiming-uniform, w2 (or w2_b) zero, so the delta starts at zero.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from networks.adapter_math import factorization
from networks.adapters import (AdapterModule, AdapterNetwork, create_adapter_network,  # noqa: F401
                               create_network_from_weights, to_bool)
from networks.lokr_fused import fused_lokr_linear, lokr_delta
from networks.lora_blocks import to_float
from networks.lora_fused import can_fuse


def lokr_shapes(weight_shape: tuple[int, ...], rank: int, factor: int = -1, decompose_both: bool = False,
                full_matrix: bool = False) -> dict[str, tuple[int, ...]]:
    """The LoKr factor shapes LyCORIS creates for a weight (see the module docstring)."""
    out_dim, in_dim, *kernel = weight_shape
    out_l, out_k = factorization(out_dim, factor)
    in_m, in_n = factorization(in_dim, factor)
    kernel_size = math.prod(kernel) if kernel else 1
    shapes: dict[str, tuple[int, ...]] = {}
    if decompose_both and not full_matrix and rank < max(out_l, in_m) / 2:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (out_l, rank), (rank, in_m)
    else:
        shapes["lokr_w1"] = (out_l, in_m)
    if full_matrix or rank >= max(out_k, in_n) / 2:
        shapes["lokr_w2"] = (out_k, in_n, *kernel)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (out_k, rank), (rank, in_n * kernel_size)
    return shapes


class LoKrModule(AdapterModule):
    algo = "lokr"

    @staticmethod
    def factor_shapes(weight_shape: tuple[int, ...], rank: int, factor: int = -1, decompose_both: bool = False,
                      full_matrix: bool = False, **algo_args) -> dict[str, tuple[int, ...]]:
        return lokr_shapes(weight_shape, rank, factor, decompose_both, full_matrix)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """A frozen Linear with a decomposed w2 runs as one node with its LoKr (`networks.lokr_fused`)."""
        params = dict(self.named_parameters())
        if self.multiplier != 0 and "lokr_w2_b" in params and "lokr_t2" not in params and not self.is_conv \
                and "dora_scale" not in params and not (self.training and (self.rank_dropout or self.module_dropout)) \
                and not args and not kwargs and can_fuse(self.org_module, self.org_forward, x):
            return fused_lokr_linear(x, self.org_module, self._w1(params), params["lokr_w2_a"], params["lokr_w2_b"],
                                     self.multiplier * self.scale)
        return super().forward(x, *args, **kwargs)

    @staticmethod
    def _w1(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params["lokr_w1"] if "lokr_w1" in params else params["lokr_w1_a"] @ params["lokr_w1_b"]

    def bypass(self, x: torch.Tensor) -> torch.Tensor | None:
        """`scale * kron(w1, w2) x` from the factors (`networks.lokr_fused.lokr_delta`); Tucker modules and grouped
        or padded-mode convs use the updated weight."""
        params = dict(self.named_parameters())
        org = self.org_module
        if "lokr_t2" in params or (self.is_conv and (org.groups != 1 or org.padding_mode != "zeros")):
            return None
        conv = None
        if self.is_conv:
            conv = {"kernel_size": org.kernel_size, "stride": org.stride, "padding": org.padding,
                    "dilation": org.dilation}
        w1 = self._w1(params)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(w1.dtype)
        return lokr_delta(x, w1, params.get("lokr_w2"), params.get("lokr_w2_a"), params.get("lokr_w2_b"), self.scale,
                          conv)

    def init_factors(self) -> None:
        with torch.no_grad():
            for name, p in self.named_parameters(recurse=False):
                if name in ("lokr_w2", "lokr_w2_b"):
                    torch.nn.init.zeros_(p)
                elif name != "dora_scale":
                    torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))


class LoKrNetwork(AdapterNetwork):
    algo = "lokr"


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs: Any) -> LoKrNetwork:
    """A LoKr network for training; `--network_args` as networks.lora plus factor, decompose_both, full_matrix,
    dora_wd."""
    factor = to_float("factor", kwargs.pop("factor", None))
    algo_args: dict[str, Any] = {"factor": -1 if factor is None else int(factor)}
    for flag in ("decompose_both", "full_matrix", "dora_wd"):
        if to_bool(kwargs.pop(flag, None)):
            algo_args[flag] = True
    return create_adapter_network(LoKrNetwork, LoKrModule, multiplier, network_dim, network_alpha, text_encoder,
                                  unet, neuron_dropout, algo_args=algo_args, **kwargs)
