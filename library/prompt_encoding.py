"""Prompt strings -> text-encoder conditioning for sampling and generation.

Tokenizes A1111-weighted prompts (`(word:1.2)`, `[word]`) into 75-token chunks and encodes them through
`library.text_encoding.encode_tokens`, the one implementation shared with training.
"""
from __future__ import annotations

from typing import Sequence

import torch


def encode_prompts(components, prompts: Sequence[str], device: torch.device, clip_skip: int | None = None,
                   max_embeddings_multiples: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (B, 2+75n or 77, C), pooled (B, C2) for SDXL else None) for `prompts`.

    n = `max_embeddings_multiples` chunks of 75 tokens (1..3); longer prompts are cut. SDXL ignores clip_skip.
    """
    try:
        from library import text_encoding
    except ImportError:
        return _plain_encode(components, prompts, device, clip_skip)
    max_len = 75 * max_embeddings_multiples
    pairs = [text_encoding.tokenize_weighted(tok, list(prompts), max_len) for tok in components.tokenizers]
    ids = [p[0] for p in pairs]
    weights = [p[1] for p in pairs]
    if all(bool((w == 1.0).all()) for w in weights):
        weights = None  # plain prompts: skip the re-weighting (and its mean restoration)
    hidden, pooled = text_encoding.encode_tokens(components.text_encoders, ids, clip_skip, components.is_sdxl,
                                                 weights, tokenizers=components.tokenizers)
    return hidden.to(device), (pooled.to(device) if pooled is not None else None)


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
