"""`--debug_dataset`: show what would be trained, without a screen and without loading a model.

`run_debug_dataset(args, sdxl)` needs only the dataset options and a tokenizer (from a Diffusers folder or hub id
given as --pretrained_model_name_or_path, else --tokenizer_cache_dir or the hub): no model, network or output
folder.

For every step of the requested epochs it prints the bucket, and per image the file, whether it was flipped,
its loss weight, the caption after processing and its token count (marking captions that
`--max_token_length` cuts). With `--debug_dataset_dir` the cropped / augmented images are saved as PNG.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from library.datasets import DatasetGroup
from library.text_encoding import CHUNK, chunk_count, count_tokens


def _to_uint8(image) -> np.ndarray:
    return ((image.permute(1, 2, 0).numpy() + 1.0) * 127.5 + 0.5).clip(0, 255).astype(np.uint8)


def debug_dataset(group: DatasetGroup, args: argparse.Namespace, epochs: int = 1, max_steps: int | None = None,
                  out: Callable[[str], None] = print) -> int:
    """Print (through `out`) every batch of the first `epochs` epochs; return the number of steps shown."""
    save_dir = getattr(args, "debug_dataset_dir", None)
    if save_dir:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
    limit = CHUNK * chunk_count(getattr(args, "max_token_length", None))
    tokenizer = group.tokenizers[0] if group.tokenizers else None
    out(group.describe(log=False))
    shown = 0
    for epoch in range(1, epochs + 1):
        group.set_epoch(epoch)
        out(f"epoch {epoch}")
        for step in range(len(group)):
            if max_steps is not None and shown >= max_steps:
                return shown
            group.set_current_step(shown)
            batch = group[step]
            reso = batch["bucket_reso"]
            out(f"  step {step + 1}/{len(group)}  bucket {reso[0]}x{reso[1]}  batch {len(batch['captions'])}")
            for k, (path, caption) in enumerate(zip(batch["image_paths"], batch["captions"])):
                tokens = count_tokens(tokenizer, caption) if tokenizer is not None else None
                cut = f" (cut at {limit})" if tokens is not None and tokens > limit else ""
                flip = " flipped" if batch["flipped"][k] else ""
                out(f"    {path}{flip}  loss weight {batch['loss_weights'][k].item():g}")
                out(f"      caption: {caption!r}" + (f"  tokens: {tokens}{cut}" if tokens is not None else ""))
                if save_dir and "images" in batch:
                    name = f"e{epoch:02d}_s{step + 1:05d}_{k}_{Path(path).stem}.png"
                    Image.fromarray(_to_uint8(batch["images"][k])).save(os.path.join(save_dir, name))
            shown += 1
    return shown


def run_debug_dataset(args: argparse.Namespace, sdxl: bool, out: Callable[[str], None] = print) -> int:
    """The whole `--debug_dataset` run: validate the dataset options, load the tokenizer(s), print the batches."""
    from library.dataset_config import load_dataset_config
    from library.datasets import build_dataset_group
    from library.model_loading import load_tokenizers
    from library.train_args import _exists, _looks_like_hub_id

    model = getattr(args, "pretrained_model_name_or_path", None)
    _exists(model, "--pretrained_model_name_or_path")
    config = load_dataset_config(args)
    folder = model if model and os.path.isdir(model) else None
    hub = model if model and not os.path.exists(model) and _looks_like_hub_id(model) else None
    family = "sdxl" if sdxl else "sd2" if getattr(args, "v2", False) else "sd1"
    tokenizers = load_tokenizers(family, folder, getattr(args, "tokenizer_cache_dir", None), hub)
    group = build_dataset_group(args, tokenizers, sdxl, config=config)
    return debug_dataset(group, args, out=out)
