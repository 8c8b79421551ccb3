"""Random LoRA state dicts / files for the LoRA tool tests (no model needed)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from networks.lora_math import ALPHA, DOWN, UP, delta_weight

# name -> weight shape; a linear, a 1x1 conv and a 3x3 conv, named as SD1 LoRA modules
SD1_SHAPES = {
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1, 1),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (40, 24),
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 3, 3),
}
SMALL_SHAPES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (40, 24),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (16, 12, 1, 1),
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 3, 3),
}
SDXL_SHAPES = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (40, 24),
}


def random_lora(shapes: dict, rank: int, alpha: float | None = None, seed: int = 0,
                up_scale: float = 0.5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in shapes.items():
        out, inp, *k = shape
        r = min(rank, out, inp * (k[0] * k[1] if k else 1))
        sd[name + DOWN] = torch.randn(r, inp, *k, generator=g)
        sd[name + UP] = torch.randn(out, r, *([1, 1] if k else []), generator=g) * up_scale
        sd[name + ALPHA] = torch.tensor(float(alpha if alpha is not None else r))
    return sd


def write_lora(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata or {})
    return str(path)


def deltas(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> up @ down * alpha / rank of every module of a LoRA state dict."""
    out = {}
    for key in sd:
        if key.endswith(DOWN):
            name = key[: -len(DOWN)]
            down, up = sd[key].double(), sd[name + UP].double()
            alpha = float(sd[name + ALPHA]) if name + ALPHA in sd else down.shape[0]
            out[name] = delta_weight(up, down, alpha / down.shape[0])
    return out
