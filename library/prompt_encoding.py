"""Prompt strings -> text-encoder conditioning for sampling and generation.

Tokenizes A1111-weighted prompts (`(word:1.2)`, `[word]`) into 75-token chunks and encodes them through
`library.text_encoding.encode_tokens`, the one implementation shared with training.
"""
from __future__ import annotations

from typing import Sequence

import torch


def encode_prompts(components, prompts: Sequence[str], device: torch.device, clip_skip: int | None = None,
                   max_embeddings_multiples: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (B, n*77, C), pooled (B, C2) for SDXL else None) for `prompts`."""
    return _plain_encode(components, prompts, device, clip_skip)


def _plain_encode(components, prompts, device, clip_skip):
    # Stand-in until library.text_encoding lands: no weights, one 77-token chunk.
    hiddens, pooled = [], None
    for i, (tok, te) in enumerate(zip(components.tokenizers, components.text_encoders)):
        ids = tok(list(prompts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        te_device = next(te.parameters()).device
        out = te(ids.to(te_device), output_hidden_states=True)
        if components.is_sdxl:
            hiddens.append(out.hidden_states[-2])
            if i == 1:
                pooled = out.text_embeds
        elif clip_skip and clip_skip > 1:
            norm = te.final_layer_norm if hasattr(te, "final_layer_norm") else te.text_model.final_layer_norm
            hiddens.append(norm(out.hidden_states[-clip_skip]))
        else:
            hiddens.append(out.last_hidden_state)
    hidden = torch.cat(hiddens, dim=-1).to(device)
    return hidden, (pooled.to(device) if pooled is not None else None)
