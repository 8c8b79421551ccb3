"""Textual Inversion embeddings for generation: load the file formats in use and teach them to the encoders.

Formats: sd-scripts' `{"emb_params": (N, dim)}` (SD1/SD2) and `{"clip_l": ..., "clip_g": ...}` (SDXL)
safetensors; AUTOMATIC1111's `.pt` (`{"string_to_param": {"*": (N, dim)}}`); diffusers' `{token: (dim,)}`.
The token is the file name without extension. An N-vector embedding adds the tokens `name`, `name1`, ...
`name{N-1}`; `expand_prompt` rewrites each `name` in a prompt to all N of them before tokenizing.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from library.file_io import CheckpointError

logger = logging.getLogger(__name__)


def read_embedding(path: str | os.PathLike, n_encoders: int) -> list[torch.Tensor]:
    """The (N, dim) vectors of one embedding file, one tensor per text encoder (SDXL: [clip_l, clip_g])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--textual_inversion_embeddings {path}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        data: Mapping = load_file(str(path))
    else:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable embedding file ({str(e).splitlines()[0]})") from None
    if isinstance(data, Mapping) and isinstance(data.get("string_to_param"), Mapping):
        data = {"emb_params": next(iter(data["string_to_param"].values()))}
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: not an embedding file (found {type(data).__name__})")
    if n_encoders == 2:
        if "clip_l" not in data or "clip_g" not in data:
            raise CheckpointError(f"{path}: an SDXL embedding needs 'clip_l' and 'clip_g' tensors "
                                  f"(found {', '.join(map(str, data)) or 'nothing'})")
        return [_vectors(data["clip_l"], path), _vectors(data["clip_g"], path)]
    tensors = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if "emb_params" in data:
        tensors = [data["emb_params"]]
    if len(tensors) != 1:
        raise CheckpointError(f"{path}: expected one embedding tensor ('emb_params' or A1111 'string_to_param'), "
                              f"found {len(tensors)}")
    return [_vectors(tensors[0], path)]


def _vectors(t: torch.Tensor, path: Path) -> torch.Tensor:
    t = t.detach().float()
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2:
        raise CheckpointError(f"{path}: embedding of shape {tuple(t.shape)}; expected (vectors, dim)")
    return t


def add_embeddings(tokenizers: Sequence, text_encoders: Sequence, files: Sequence[str | os.PathLike]
                   ) -> dict[str, list[str]]:
    """Add every embedding's tokens to the tokenizers and its vectors to the encoders' token tables.

    Returns {name: [name, name1, ...]} for `expand_prompt`. Errors name the file: a token the tokenizer knows
    already, or vectors whose width differs from the encoder's.
    """
    loaded = [(Path(f).stem, read_embedding(f, len(text_encoders)), f) for f in files]
    replacements: dict[str, list[str]] = {}
    for name, per_encoder, file in loaded:
        n = per_encoder[0].shape[0]
        tokens = [name] + [f"{name}{i}" for i in range(1, n)]
        for tok, te, vecs in zip(tokenizers, text_encoders, per_encoder):
            table = te.get_input_embeddings().weight
            if vecs.shape[1] != table.shape[1]:
                raise CheckpointError(f"{file}: embedding width {vecs.shape[1]} does not fit this text encoder "
                                      f"(width {table.shape[1]}); is it for another model family?")
            if tok.add_tokens(tokens) != len(tokens):
                raise ValueError(f"{file}: the token {name!r} (the file name) is already known to the tokenizer; "
                                 "rename the file")
            te.resize_token_embeddings(len(tok), mean_resizing=False)
            ids = tok.convert_tokens_to_ids(tokens)
            with torch.no_grad():
                table = te.get_input_embeddings().weight
                table[ids] = vecs.to(table.device, table.dtype)
        replacements[name] = tokens
        logger.info("Textual Inversion %s: %d vector(s) as %s", file, n, name)
    return replacements


def expand_prompt(text: str, replacements: Mapping[str, list[str]]) -> str:
    """Write every multi-vector embedding token as its full token sequence (`name` -> `name name1 name2`)."""
    for name, tokens in replacements.items():
        if len(tokens) > 1:
            text = re.sub(rf"(?<![\w]){re.escape(name)}(?![\w])", " ".join(tokens), text, flags=re.IGNORECASE)
    return text
