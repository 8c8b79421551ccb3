"""Tokenizing captions and prompts in 75-token chunks and encoding them with the text encoders.

Token layout (as the original trainer): a caption is tokenized without special tokens and cut at
75 * n tokens (n = max_token_length / 75, 1 when not given). Chunk k is `<BOS>` + tokens[75k:75k+75] +
`<EOS>`, padded with the tokenizer's pad token to 77 (`<EOS>` for SD1's tokenizer, "!" for OpenCLIP's); a
chunk past the end of the text is `<BOS> <EOS> <PAD>...`. `input_ids` of a batch are (B, n*77) LongTensors,
one per tokenizer.

`encode_tokens` runs every chunk through the encoder, then joins the chunks along the sequence keeping the
first chunk's `<BOS>`, the 75 inner positions of every chunk and the last chunk's final position:
(B, 2 + 75n, dim). SD1/SD2: the last layer, or the `clip_skip`-th from last, through the final layer norm
(SD2 checkpoints already drop OpenCLIP's last layer, so no clip_skip is needed). SDXL: the penultimate hidden
states of both encoders concatenated (768 + 1280), and the second encoder's projected pooled output at the
first `<EOS>` of the first chunk. Weights (A1111 `(word:1.2)` syntax) scale each position and the mean of the
whole output is restored afterwards, as the WebUI does.

`BREAK` (upper case, a word of its own) in generation and sample prompts (`tokenize_weighted(..., breaks=True)`)
closes the current chunk, padded as a short text is, and starts the next one, as sd-scripts' generation script
and the WebUI do. Training captions keep the word as text, as the original trainer does.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from library.captions import parse_weighted_prompt

CHUNK = 75  # tokens of text per chunk
CHUNK_LEN = CHUNK + 2  # with BOS and the closing token
BREAK = re.compile(r"\s*\bBREAK\b\s*")


def chunk_count(max_token_length: int | None) -> int:
    """75 -> 1, 150 -> 2, 225 -> 3 (None -> 1). Training allows 75/150/225; prompts may use more chunks."""
    if max_token_length is None:
        return 1
    if max_token_length <= 0 or max_token_length % CHUNK:
        raise ValueError(f"max_token_length {max_token_length}: expected a multiple of 75 (75, 150 or 225 for training)")
    return max_token_length // CHUNK


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _chunk_spans(n_tokens: int, breaks: Sequence[int]) -> list[tuple[int, int]]:
    """(start, end) of each chunk's text: 75 tokens at most, and a chunk ends at every BREAK position."""
    spans: list[tuple[int, int]] = []
    start = 0
    for end in [*breaks, n_tokens]:
        spans.append((start, min(start + CHUNK, end)))  # a BREAK right after a BREAK gives an empty chunk
        while spans[-1][1] < end:
            spans.append((spans[-1][1], min(spans[-1][1] + CHUNK, end)))
        start = end
    return spans


def build_chunks(tokens: Sequence[int], tokenizer: Any, n_chunks: int,
                 weights: Sequence[float] | None = None, breaks: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Lay raw token ids (no specials) out as n_chunks * 77 ids with BOS/EOS per chunk, and their weights.
    `breaks`: token positions where a BREAK starts a new chunk. Text past n_chunks chunks is cut.

    Decided by position, not by comparing ids, so a text token that equals the pad token ("!" of OpenCLIP)
    is never mistaken for padding.
    """
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, _pad_id(tokenizer)
    weights = list(weights) if weights is not None else [1.0] * len(tokens)
    spans = _chunk_spans(len(tokens), breaks)[:n_chunks]
    spans += [(len(tokens), len(tokens))] * (n_chunks - len(spans))  # chunks past the text: <BOS> <EOS> <PAD>...
    ids_out: list[int] = []
    w_out: list[float] = []
    for a, b in spans:
        text = list(tokens[a:b])
        ids_out += [bos] + text + [eos] + [pad] * (CHUNK - len(text))
        w_out += [1.0] + list(weights[a:b]) + [1.0] * (CHUNK_LEN - 1 - len(text))
    return ids_out, w_out


def _raw_tokens(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False, truncation=False, padding=False, verbose=False).input_ids


def tokenize(tokenizer: Any, texts: str | Sequence[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids (B, n*77) of `texts` in the chunk layout described above."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = chunk_count(max_token_length)
    rows = [build_chunks(toks, tokenizer, n)[0] for toks in _raw_tokens(tokenizer, texts)]
    return torch.tensor(rows, dtype=torch.long).reshape(len(texts), n * CHUNK_LEN)


def tokenize_weighted(tokenizer: Any, texts: str | Sequence[str], max_token_length: int | None = None,
                      breaks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and per-token weights (both (B, n*77)) of A1111-weighted prompts; the syntax is removed.
    `breaks`: a `BREAK` word starts a new chunk (prompts), instead of being text (captions)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    n = chunk_count(max_token_length)
    ids_rows, w_rows = [], []
    for text in texts:
        parts = []  # (text, weight, starts a new chunk)
        for piece, w in parse_weighted_prompt(text):
            for i, sub in enumerate(BREAK.split(piece) if breaks else [piece]):
                parts.append((sub, w, i > 0))
        pieces = _raw_tokens(tokenizer, [p for p, _, _ in parts])
        tokens, weights, chunk_breaks = [], [], []
        for toks, (_, w, new_chunk) in zip(pieces, parts):
            if new_chunk:
                chunk_breaks.append(len(tokens))
            tokens += toks
            weights += [w] * len(toks)
        ids, ws = build_chunks(tokens, tokenizer, n, weights, chunk_breaks)
        ids_rows.append(ids)
        w_rows.append(ws)
    return (torch.tensor(ids_rows, dtype=torch.long).reshape(len(texts), -1),
            torch.tensor(w_rows, dtype=torch.float32).reshape(len(texts), -1))


def count_tokens(tokenizer: Any, text: str) -> int:
    """Number of text tokens (without BOS/EOS) of `text`, before any truncation."""
    return len(_raw_tokens(tokenizer, [text])[0])


def join_chunks(x: torch.Tensor) -> torch.Tensor:
    """(B, n*77, ...) -> (B, 2 + 75n, ...): first BOS, the 75 inner positions of each chunk, last position."""
    b = x.shape[0]
    n = x.shape[1] // CHUNK_LEN
    if n == 1:
        return x
    chunks = x.reshape(b, n, CHUNK_LEN, *x.shape[2:])
    inner = chunks[:, :, 1:-1].reshape(b, n * CHUNK, *x.shape[2:])
    return torch.cat([chunks[:, 0, :1], inner, chunks[:, -1, -1:]], dim=1)


def _unwrap(te: Any) -> Any:
    """The model inside a DDP / compiled wrapper (for attribute access; the wrapper is still called)."""
    for attr in ("module", "_orig_mod"):
        while hasattr(te, attr) and isinstance(getattr(te, attr), torch.nn.Module):
            te = getattr(te, attr)
    return te


def _text_model(te: Any) -> Any:
    """transformers 5 flattens CLIPTextModel (no .text_model); CLIPTextModelWithProjection keeps it."""
    te = _unwrap(te)
    return getattr(te, "text_model", te)


def _apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = join_chunks(weights.to(hidden.device, torch.float32))
    before = hidden.float().mean(dim=(-2, -1))
    scaled = hidden.float() * weights.unsqueeze(-1)
    after = scaled.mean(dim=(-2, -1))
    # A1111 restores the mean; a (near) zero mean, as after a bias-free layer norm, has nothing to restore.
    meaningful = (before.abs() > 1e-6) & (after.abs() > 1e-6)
    ratio = torch.where(meaningful, before / torch.where(meaningful, after, torch.ones_like(after)),
                        torch.ones_like(after))
    return (scaled * ratio.unsqueeze(-1).unsqueeze(-1)).to(hidden.dtype)


def _run_encoder(te: Any, ids: torch.Tensor) -> Any:
    device = next(te.parameters()).device
    return te(ids.reshape(-1, CHUNK_LEN).to(device), output_hidden_states=True, return_dict=True)


def _pooled_sdxl(te2: Any, out: Any, ids: torch.Tensor, eos_id: int, n_chunks: int) -> torch.Tensor:
    """Projected final-layer output at the first EOS of each sequence's first chunk."""
    last = out.last_hidden_state  # after the final layer norm
    flat_ids = ids.reshape(-1, CHUNK_LEN).to(last.device)
    eos_pos = (flat_ids == eos_id).int().argmax(dim=-1)
    pooled = last[torch.arange(last.shape[0], device=last.device), eos_pos]
    projection = _unwrap(te2).text_projection
    return projection(pooled.to(projection.weight.dtype))[::n_chunks]


def encode_tokens(text_encoders: Any, input_ids: Any, clip_skip: int | None = None, sdxl: bool = False,
                  weights: Any = None, *, tokenizers: Any = None, max_token_length: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encoder hidden states (B, 2+75n or 77, dim) and, for SDXL, the pooled output (B, proj_dim).

    `text_encoders`: one encoder, or a list ([te] for SD1/2, [te1, te2] for SDXL). `input_ids`: a (B, n*77)
    tensor or a list of them, one per encoder (the batch's `input_ids`). `weights`: None or the same layout
    of per-token weights (the batch's `input_weights`). `tokenizers` gives SDXL's EOS id (49407 otherwise);
    `max_token_length` is implied by the shape and only checked.
    """
    encoders = list(text_encoders) if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    ids_list = list(input_ids) if isinstance(input_ids, (list, tuple)) else [input_ids]
    w_list = (list(weights) if isinstance(weights, (list, tuple)) else [weights] * len(ids_list)) if weights is not None else None
    for ids in ids_list:
        if ids.shape[-1] % CHUNK_LEN:
            raise ValueError(f"input_ids of length {ids.shape[-1]}: expected a multiple of {CHUNK_LEN}")
    n = ids_list[0].shape[-1] // CHUNK_LEN
    if max_token_length is not None and chunk_count(max_token_length) != n:
        raise ValueError(f"input_ids hold {n} chunks but max_token_length is {max_token_length}")

    if sdxl:
        if len(encoders) != 2 or len(ids_list) != 2:
            raise ValueError("SDXL needs two text encoders and two input_ids tensors")
        out1 = _run_encoder(encoders[0], ids_list[0])
        out2 = _run_encoder(encoders[1], ids_list[1])
        b = ids_list[0].shape[0]
        h1 = join_chunks(out1.hidden_states[-2].reshape(b, n * CHUNK_LEN, -1))
        h2 = join_chunks(out2.hidden_states[-2].reshape(b, n * CHUNK_LEN, -1))
        if w_list is not None:
            h1, h2 = _apply_weights(h1, w_list[0]), _apply_weights(h2, w_list[1])
        eos_id = tokenizers[1].eos_token_id if tokenizers else 49407
        pooled = _pooled_sdxl(encoders[1], out2, ids_list[1], eos_id, n)
        return torch.cat([h1, h2.to(h1.dtype)], dim=-1), pooled

    te, ids = encoders[0], ids_list[0]
    out = _run_encoder(te, ids)
    skip = clip_skip if clip_skip and clip_skip > 1 else 1
    hidden = out.hidden_states[-skip]
    hidden = _text_model(te).final_layer_norm(hidden) if skip > 1 else out.last_hidden_state
    hidden = join_chunks(hidden.reshape(ids.shape[0], n * CHUNK_LEN, -1))
    if w_list is not None:
        hidden = _apply_weights(hidden, w_list[0])
    return hidden, None

