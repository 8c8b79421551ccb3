"""Helpers shared by the LoRA tests: deterministic inputs and outputs of the tiny UNet and text encoders."""
from __future__ import annotations

import torch


def unet_inputs(unet, seed: int = 1) -> dict:
    """A fixed batch for the tiny UNet (SDXL gets its size/pooled conditioning)."""
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    size = cfg.sample_size
    inputs = {
        "sample": torch.randn(1, cfg.in_channels, size, size, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, cfg.cross_attention_dim, generator=g),
    }
    if cfg.addition_embed_type == "text_time":
        pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled_dim, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    return inputs


@torch.no_grad()
def unet_out(unet, seed: int = 1) -> torch.Tensor:
    return unet(**unet_inputs(unet, seed)).sample


@torch.no_grad()
def te_outs(text_encoders) -> list[torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 1929, 49407]])
    return [te(ids).last_hidden_state for te in (text_encoders if isinstance(text_encoders, list) else [text_encoders])]


def randomize(network, scale: float = 0.2, seed: int = 3) -> None:
    """Give every LoRA weight random non-zero values (a fresh network has zero up weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in network.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def outputs(models) -> list[torch.Tensor]:
    return [unet_out(models.unet)] + te_outs(models.text_encoders)
