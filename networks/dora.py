"""DoRA (weight-decomposed LoRA, arXiv 2402.09353) as `--network_module networks.lora --network_args dora_wd=True`.

A DoRA module is a LoRA module plus a trained magnitude `dora_scale`, one value per *input* channel, shaped
(1, in) for a Linear and (1, in, 1, 1) for a Conv2d: the shape and orientation AUTOMATIC1111's webui, ComfyUI and
LyCORIS (`wd_on_out=False`) read. The layer's weight becomes

    W' = (W + s * up @ down) * dora_scale / ||W + s * up @ down||     (norm per input channel)

(`networks.adapter_math.dora_weight`, the function every tool here uses). Since the factor multiplies input
columns, the forward never forms W': `W' x = (W + s up down)(c * x)` with `c = dora_scale / norm`, so it runs
the frozen layer and the LoRA branch on the rescaled input. As in the paper (section 4.3) the norm is treated as
a constant in backward (no gradient through it): the forward value is exact, training is cheaper. At multiplier
m the output is `m * W' x + (1 - m) * W x`, the same blend as the loaders' `W + m (W' - W)`.

Files: the LoRA keys plus `<module>.dora_scale`; any of `networks.lora/loha/lokr` loads them
(`create_network_from_weights` picks DoRAModule where a module has `dora_scale`). LoHa and LoKr take
`dora_wd=True` too (their modules compute W' directly).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from networks import adapter_math as am
from networks.lora import LoRAModule, add_up_projection
from networks.lora_fused import can_fuse, fused_lora_linear


class DoRAModule(LoRAModule):
    """A LoRA module with DoRA's per-input-channel magnitude."""

    fused_linear = False
    algo = "lora"

    def __init__(self, lora_name: str, org_module: torch.nn.Module, *args, **kwargs):
        kwargs.pop("dora_wd", None)
        super().__init__(lora_name, org_module, *args, **kwargs)
        self.dora_scale = torch.nn.Parameter(am.column_norm(org_module.weight.detach().float()))

    def parts(self) -> dict[str, torch.Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight,
                "alpha": self.alpha, "dora_scale": self.dora_scale}

    def input_scale(self) -> torch.Tensor:
        """`dora_scale / ||W + s * up @ down||` per input channel (the norm without gradient)."""
        weight = self.org_module.weight
        with torch.no_grad():
            merged = weight.float() + self.delta_weight().float()
            norm = am.column_norm(merged)
        return self.dora_scale.reshape(norm.shape) / norm

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.multiplier == 0:
            return self.org_forward(x, *args, **kwargs)
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return self.org_forward(x, *args, **kwargs)
        c = self.input_scale()
        c = c.reshape(-1, 1, 1) if self.is_conv else c.reshape(-1)  # channels of (B, C, H, W) / features of (..., C)
        xs = x * c.to(x.dtype)
        if not (self.training and (self.dropout or self.rank_dropout)) and not args and not kwargs \
                and can_fuse(self.org_module, self.org_forward, xs):  # LoRA's fused node on the rescaled input
            out = fused_lora_linear(xs, self.org_module, self.lora_down.weight, self.lora_up.weight, self.scale)
        else:
            out = self.org_forward(xs, *args, **kwargs)
            hidden, up = self.lora_hidden(xs, self.scale)
            out = add_up_projection(out, hidden, up, self.is_conv)
        if self.multiplier != 1:
            out = self.multiplier * out + (1 - self.multiplier) * self.org_forward(x, *args, **kwargs)
        return out

    def merge_to(self, sd: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        am.merge_into_layer(self.org_module, dict(sd) if sd else self.parts(), self.multiplier, self.lora_name, device)


def create_network(multiplier: float, network_dim: int | None, network_alpha: float | None, vae, text_encoder, unet,
                   neuron_dropout: float | None = None, **kwargs: Any):
    """A DoRA network (LoRA modules with `dora_scale`); called by `networks.lora.create_network` for dora_wd=True."""
    from networks import adapters

    kwargs.pop("dora_wd", None)
    network = adapters.create_adapter_network(adapters.AdapterNetwork, DoRAModule, multiplier, network_dim,
                                              network_alpha, text_encoder, unet, **kwargs)
    network.dropout = neuron_dropout
    for module in network.text_encoder_loras + network.unet_loras:
        module.dropout = neuron_dropout
    network.algo, network.algo_args = "lora", {"dora_wd": "True"}
    return network
