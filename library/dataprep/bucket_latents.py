"""Bucketing and latent pre-caching for fine-tuning metadata (finetune/prepare_buckets_latents.py).

Each image gets a bucket (library.buckets, the same rules as training), its `train_resolution` is written to the
metadata, and its VAE latents are cached beside it as `.npz` in the training scripts' disk-cache format, so a
later `--cache_latents_to_disk` run finds them valid and does not encode again. Image sizes are read from the
file headers first, then images are loaded, resized, cropped and encoded bucket by bucket in batches.
"""
from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from library.buckets import BucketManager, Crop, cover_size, crop_offsets, resize_and_crop

logger = logging.getLogger(__name__)

Reso = tuple[int, int]


@dataclass
class PrepResult:
    """What a run did: bucket counts, aspect errors, latents written/skipped, unreadable images."""

    bucket_counts: dict[Reso, int] = field(default_factory=dict)
    ar_errors: list[float] = field(default_factory=list)
    encoded: int = 0
    skipped_valid: int = 0
    not_in_metadata: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class _Item:
    path: Path
    key: str
    reso: Reso
    resized: Reso
    npz: Path


def parse_max_resolution(text: str) -> Reso:
    """`"512,512"` (width,height) -> (512, 512); a single number means a square."""
    try:
        parts = [int(v) for v in text.split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise ValueError(f"--max_resolution {text!r}: expected 'width,height', e.g. 512,512")
    return parts[0], parts[1]


def read_sizes(images: list[Path], failures: list[tuple[Path, str]]) -> dict[Path, Reso]:
    """Upright (w, h) of each image from its header (EXIF rotation respected); unreadable ones go to `failures`."""
    from PIL import Image
    from tqdm import tqdm

    from library.dataprep.metadata import prefetch

    def size(path: Path) -> Reso:
        try:
            with Image.open(path) as im:
                w, h = im.size
                orientation = im.getexif().get(0x0112, 1)
        except Exception as e:
            raise ValueError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
        return (h, w) if orientation in (5, 6, 7, 8) else (w, h)

    sizes = {}
    for path, wh, err in tqdm(prefetch(images, size, workers=4, window=64), total=len(images),
                              desc="reading sizes", smoothing=0.0):
        if err is not None:
            logger.error("%s", err)
            failures.append((path, str(err)))
        else:
            sizes[path] = wh
    return sizes


def print_bucket_table(result: PrepResult) -> None:
    """The bucket table of the guide: index, resolution, image count; then the mean aspect-ratio error."""
    for i, reso in enumerate(sorted(result.bucket_counts)):
        print(f"bucket {i} {reso}: {result.bucket_counts[reso]}")
    if result.ar_errors:
        print(f"mean ar error: {float(np.mean(np.abs(result.ar_errors))):.6f}")


def prepare(images: list[Path], metadata: dict[str, dict], vae, manager: BucketManager, *, full_path: bool,
            batch_size: int = 1, flip_aug: bool = False, skip_existing: bool = False, seed: int = 0,
            workers: int = 2) -> PrepResult:
    """Bucket every image, set `train_resolution` in `metadata` (in place) and write its latent cache with
    library.latent_cache (the format and validity rules `--cache_latents_to_disk` training uses).

    Training takes each image's bucket from `train_resolution` and resizes the image to just cover it, then
    center-crops; the caches are computed exactly that way, so training finds them valid.
    """
    from tqdm import tqdm

    from library import latent_cache
    from library.dataprep.metadata import check_unique_keys, find_key, prefetch
    from library.images import load_image

    check_unique_keys(images, full_path)
    result = PrepResult()
    sizes = read_sizes(images, result.failures)
    fingerprint = latent_cache.vae_fingerprint(vae)
    pending: dict[Reso, list[_Item]] = defaultdict(list)
    for path, (w, h) in sizes.items():
        try:
            choice = manager.select(w, h)
        except ValueError as e:  # e.g. smaller than one bucket step with bucket_no_upscale
            logger.error("%s: %s", path, e)
            result.failures.append((path, str(e)))
            continue
        reso = tuple(choice.bucket_reso)
        resized = cover_size((w, h), reso)
        result.bucket_counts[reso] = result.bucket_counts.get(reso, 0) + 1
        result.ar_errors.append(choice.ar_error)
        key = find_key(metadata, path, full_path)
        if key not in metadata:
            result.not_in_metadata += 1
        metadata.setdefault(key, {})["train_resolution"] = list(reso)
        item = _Item(path, key, reso, resized, Path(latent_cache.npz_path(str(path))))
        crop = Crop((h, w), crop_offsets(resized, reso), resized)
        if skip_existing and latent_cache.is_valid(item.npz, reso, flip_aug, crop, fingerprint=fingerprint):
            result.skipped_valid += 1
            continue
        pending[reso].append(item)

    batches = [items[i:i + batch_size] for items in pending.values() for i in range(0, len(items), batch_size)]
    todo = [item for batch in batches for item in batch]
    loaded = prefetch(todo, lambda item: resize_and_crop(load_image(item.path), item.reso, item.resized), workers)
    param = next(vae.parameters())
    generator = torch.Generator(device=param.device).manual_seed(seed)
    bar = tqdm(total=len(todo), desc="caching latents", smoothing=0.0)
    for batch in batches:
        arrays, crops, ok = [], [], []
        for _ in batch:
            item, out, err = next(loaded)
            bar.update(1)
            if err is not None:  # the header was readable, the pixels are not: no bucket for it either
                logger.error("%s", err)
                result.failures.append((item.path, str(err)))
                metadata[item.key].pop("train_resolution", None)
                continue
            arrays.append(out[0])
            crops.append(out[1])
            ok.append(item)
        if not ok:
            continue
        latents = latent_cache.encode_images(vae, arrays, generator)
        flipped = latent_cache.encode_images(vae, [a[:, ::-1] for a in arrays], generator) if flip_aug else None
        for i, item in enumerate(ok):
            latent_cache.save(item.npz, latents[i], crops[i], item.reso, None if flipped is None else flipped[i],
                              None, fingerprint)
            result.encoded += 1
    bar.close()
    return result
