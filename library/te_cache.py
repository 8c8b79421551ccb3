"""Text-encoder output caching (`--cache_text_encoder_outputs[_to_disk]`), in memory and on disk.

Outputs are computed once per distinct caption (token ids) and looked up per batch, so the text encoders can
leave memory. The disk cache is one `<image>_te_outputs.npz` per image holding the outputs, the token ids and a
fingerprint of the encoders and options; a file whose ids or fingerprint differ is recomputed (invalidation
like the latent cache). Caching needs captions that never change, so it is refused with caption shuffle /
dropout and with text-encoder training (see `train_args.validate_te_cache_args`).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)
SUFFIX = "_te_outputs.npz"


def cache_path(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + SUFFIX


def fingerprint(text_encoders: list[torch.nn.Module], clip_skip: int | None, max_token_length: int | None) -> str:
    """A short hash of the encoders' weights (first and last tensors) and the encoding options."""
    h = hashlib.sha1(f"{clip_skip}|{max_token_length}".encode())
    for te in text_encoders:
        params = list(te.parameters())
        for p in (params[0], params[-1]):
            h.update(p.detach().float().flatten()[:256].cpu().numpy().tobytes())
            h.update(str(tuple(p.shape)).encode())
    return h.hexdigest()[:16]


def _row_key(input_ids: list[torch.Tensor], row: int) -> bytes:
    return b"|".join(ids[row].to(torch.int64).cpu().numpy().tobytes() for ids in input_ids)


def _row_ids(input_ids: list[torch.Tensor], row: int) -> np.ndarray:
    return np.concatenate([ids[row].to(torch.int64).cpu().numpy() for ids in input_ids])


class TextEncoderOutputCache:
    """Encoder outputs by caption token ids: `lookup(batch)` returns (hidden states, pooled or None)."""

    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.computed = 0
        self.from_disk = 0

    @classmethod
    def build(cls, dataset: Any, components: Any, args: argparse.Namespace, device: torch.device,
              to_disk: bool = False, processes: Any = None, chunk: int = 8) -> "TextEncoderOutputCache":
        """Encode every caption of `dataset` once (reading / writing the disk cache when `to_disk`).

        `processes` (accelerate's PartialState) with several processes: each encodes its share of the distinct
        captions; then the disk files (written by their encoder) are read by all after a barrier, or the
        in-memory outputs are exchanged, so every process holds every caption (its batches change each epoch)."""
        from tqdm import tqdm

        cache = cls()
        tes = components.text_encoders
        stamp = fingerprint(tes, args.clip_skip, args.max_token_length)
        rows = _distinct_rows(dataset)
        world = 1 if processes is None else processes.num_processes
        keys = list(rows)[processes.process_index::world] if world > 1 else list(rows)
        todo = [k for k in keys if not (to_disk and cache._load_disk(rows[k][1], rows[k][0], 0, stamp))]
        for start in tqdm(range(0, len(todo), chunk), desc="caching text encoder outputs", leave=False):
            part = todo[start:start + chunk]
            ids = [torch.cat([rows[k][0][t] for k in part]) for t in range(len(rows[part[0]][0]))]
            cache._compute(components, args, ids, list(range(len(part))), device,
                           [rows[k][1] for k in part] if to_disk else None, stamp)
        if world > 1:
            cache._share(rows, processes, to_disk, stamp)
        logger.info("text encoder outputs: %d captions (%d computed, %d from disk)", len(cache.entries),
                    cache.computed, cache.from_disk)
        return cache

    def _share(self, rows: dict[bytes, tuple[list[torch.Tensor], str | None]], processes: Any, to_disk: bool,
               stamp: str) -> None:
        """Give every process every caption's outputs (the others' share: from their files, or gathered)."""
        if to_disk:
            processes.wait_for_everyone()  # every file is complete
            for key, (ids, path) in rows.items():
                if key not in self.entries and not self._load_disk(path, ids, 0, stamp):
                    raise RuntimeError(f"{cache_path(path or '?')}: another process did not write this cache file")
            return
        from accelerate.utils import gather_object

        self.entries.update(gather_object(list(self.entries.items())))

    def _load_disk(self, image_path: str | None, ids: list[torch.Tensor], row: int, stamp: str) -> bool:
        if image_path is None or not os.path.isfile(cache_path(image_path)):
            return False
        try:
            with np.load(cache_path(image_path)) as data:
                if str(data["fingerprint"]) != stamp or not np.array_equal(data["input_ids"], _row_ids(ids, row)):
                    return False
                pooled = torch.from_numpy(data["pooled"]) if "pooled" in data.files else None
                self.entries[_row_key(ids, row)] = (torch.from_numpy(data["hidden_states"]), pooled)
        except (OSError, KeyError, ValueError) as e:
            logger.warning("%s: unreadable cache file, recomputing (%s)", cache_path(image_path), e)
            return False
        self.from_disk += 1
        return True

    @torch.no_grad()
    def _compute(self, components: Any, args: argparse.Namespace, ids: list[torch.Tensor], rows: list[int],
                 device: torch.device, paths: list[str | None] | None, stamp: str) -> None:
        from library.text_encoding import encode_tokens

        sub = [t[rows].to(device) for t in ids]
        hidden, pooled = encode_tokens(components.text_encoders, sub, args.clip_skip, components.is_sdxl, None,
                                       tokenizers=components.tokenizers, max_token_length=args.max_token_length)
        for i, row in enumerate(rows):
            h = hidden[i].detach().float().cpu().clone()
            p = pooled[i].detach().float().cpu().clone() if pooled is not None else None
            self.entries[_row_key(ids, row)] = (h, p)
            self.computed += 1
            if paths is not None and paths[row] is not None:
                _write(cache_path(paths[row]), h, p, _row_ids(ids, row), stamp)

    def lookup(self, batch: dict[str, Any], device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        ids = batch["input_ids"]
        found = []
        for r in range(ids[0].shape[0]):
            key = _row_key(ids, r)
            if key not in self.entries:
                raise KeyError("a caption without cached text encoder outputs (the captions changed after caching)")
            found.append(self.entries[key])
        hidden = torch.stack([h for h, _ in found]).to(device, dtype)
        pooled = torch.stack([p for _, p in found]).to(device, dtype) if found[0][1] is not None else None
        return hidden, pooled


def _distinct_rows(dataset: Any) -> dict[bytes, tuple[list[torch.Tensor], str | None]]:
    """Every distinct caption (token ids) of the dataset, in order: key -> (ids of one row per tokenizer, the
    first image with it). All rows of the global batches, also with several processes."""
    rows: dict[bytes, tuple[list[torch.Tensor], str | None]] = {}
    whole, dataset.whole_batches = getattr(dataset, "whole_batches", False), True
    try:
        for index in range(len(dataset)):
            batch = dataset[index]
            ids = batch["input_ids"]
            paths = batch.get("image_paths") or [None] * ids[0].shape[0]
            for r in range(ids[0].shape[0]):
                rows.setdefault(_row_key(ids, r), ([t[r:r + 1] for t in ids], paths[r]))
    finally:
        dataset.whole_batches = whole
    return rows


def _write(path: str, hidden: torch.Tensor, pooled: torch.Tensor | None, ids: np.ndarray, stamp: str) -> None:
    from library.file_io import atomic_path

    arrays = {"hidden_states": hidden.numpy(), "input_ids": ids, "fingerprint": np.array(stamp)}
    if pooled is not None:
        arrays["pooled"] = pooled.numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
