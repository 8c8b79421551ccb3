"""LoHa (`--network_module networks.loha`): LoRA with Hadamard product, as LyCORIS's `algo=loha`.

Each module holds two rank-`network_dim` pairs and adds `(hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) *
alpha / dim` (element-wise product: an update of rank up to dim^2 from 4 * dim * (in + out) values) to the layer
weight. Files have the keys `<module>.hada_w1_a` (out, dim), `hada_w1_b` (dim, in * kh * kw), `hada_w2_a`,
`hada_w2_b`, `alpha` (and `dora_scale` with `dora_wd=True`), which ComfyUI, the webui and LyCORIS read.
Targets, names, block dims / lr weights and `conv_dim` / `conv_alpha` (3x3 convs) are those of `networks.lora`.
Initialisation as LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0 (the delta starts at zero).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from networks.adapters import (AdapterModule, AdapterNetwork, create_adapter_network,  # noqa: F401
                               create_network_from_weights, to_bool)


class LoHaModule(AdapterModule):
    algo = "loha"

    @staticmethod
    def factor_shapes(weight_shape: tuple[int, ...], rank: int, **algo_args) -> dict[str, tuple[int, ...]]:
        out_dim, in_flat = weight_shape[0], 1
        for d in weight_shape[1:]:
            in_flat *= d
        return {"hada_w1_a": (out_dim, rank), "hada_w1_b": (rank, in_flat),
                "hada_w2_a": (out_dim, rank), "hada_w2_b": (rank, in_flat)}

    def bypass(self, x: torch.Tensor) -> torch.Tensor | None:
        """`(A1 B1) * (A2 B2) = U V` with U[:, i*r+j] = A1[:, i] * A2[:, j] and V[i*r+j] = B1[i] * B2[j] (Khatri-Rao
        products): the LoHa is a rank-r² LoRA, applied as one (cheaper than forming the delta while r² is small)."""
        rank = self.hada_w1_b.shape[0]
        if "hada_t1" in dict(self.named_parameters()) or rank * rank * 2 > min(self.weight_shape[0],
                                                                                math.prod(self.weight_shape[1:])):
            return None
        up = (self.hada_w1_a[:, :, None] * self.hada_w2_a[:, None, :]).reshape(self.weight_shape[0], rank * rank)
        down = (self.hada_w1_b[:, None, :] * self.hada_w2_b[None, :, :]).reshape(rank * rank, -1)
        return self._low_rank(x, up * self.scale, down)

    def init_factors(self) -> None:
        with torch.no_grad():
            torch.nn.init.normal_(self.hada_w1_b, std=1.0)
            torch.nn.init.normal_(self.hada_w1_a, std=0.1)
            torch.nn.init.normal_(self.hada_w2_b, std=1.0)
            torch.nn.init.zeros_(self.hada_w2_a)


class LoHaNetwork(AdapterNetwork):
    algo = "loha"


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs: Any) -> LoHaNetwork:
    """A LoHa network for training; `--network_args` as networks.lora (conv_dim, block_dims, ...) plus dora_wd."""
    algo_args = {"dora_wd": True} if to_bool(kwargs.pop("dora_wd", None)) else {}
    return create_adapter_network(LoHaNetwork, LoHaModule, multiplier, network_dim, network_alpha, text_encoder,
                                  unet, neuron_dropout, algo_args=algo_args, **kwargs)
