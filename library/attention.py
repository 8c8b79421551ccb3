"""Attention for --mem_eff_attn: plain PyTorch, any device, memory bounded by a chunk of queries.

`ChunkedAttnProcessor` is a diffusers attention processor with the same inputs and outputs as the default SDPA
one (`AttnProcessor2_0`). It computes softmax(q k^T / sqrt(d)) v for `chunk_size` queries at a time, so the
attention matrix never exceeds chunk_size x keys per head; under autograd each chunk is recomputed in backward
(torch.utils.checkpoint) instead of keeping its probabilities, so training holds no full attention matrix either.
It is the fallback of sd-scripts' --mem_eff_attn (a pure-PyTorch flash attention) for machines without xformers.
"""
from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 1024


def chunked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      mask: torch.Tensor | None = None, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D), `chunk_size` queries at a time; `mask` is added to the
    scores (boolean: True keeps) as in F.scaled_dot_product_attention."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, float("-inf"))
    scale = 1.0 / math.sqrt(query.shape[-1])
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outputs = []
    for start in range(0, query.shape[-2], chunk_size):
        q = query[..., start:start + chunk_size, :]
        m = None if mask is None else mask[..., start:start + chunk_size, :] if mask.shape[-2] > 1 else mask
        if recompute:
            outputs.append(checkpoint(_attend, q, key, value, m, scale, use_reentrant=False))
        else:
            outputs.append(_attend(q, key, value, m, scale))
    return torch.cat(outputs, dim=-2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)


class ChunkedAttnProcessor:
    """diffusers attention processor: AttnProcessor2_0's projections and norms around `chunked_attention`."""

    def __init__(self, chunk_size: int = DEFAULT_CHUNK):
        self.chunk_size = chunk_size

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 *args, **kwargs) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, length, _ = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = chunked_attention(query, key, value, attention_mask, self.chunk_size)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
