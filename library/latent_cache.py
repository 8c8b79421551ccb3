"""Latent caching: encode each training image with the VAE once, in memory or as `.npz` beside the image.

Disk format (`<image name>.npz`, written atomically, so an interrupted run leaves only complete files):
`latents` (4, h/8, w/8) float32 as sampled from the VAE (not multiplied by the scaling factor),
`latents_flipped` (with flip_aug), `alpha_mask` (with alpha_mask), `bucket_reso` (w, h), `resized_size`
(w, h), `crop_top_left` (top, left), `original_size_hw`, `vae_fingerprint`, plus the original's keys
`original_size` (w, h) and `crop_ltrb` so its scripts can read the file. A file is reused only when the
bucket, resize, crop, VAE and (when needed) flip/alpha entries all match what this run would compute; any
other file is recomputed and replaced. Caching a run resumes where an interrupted one stopped.
`save` / `is_valid` are the primitives (also used by finetune/prepare_buckets_latents.py).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from library.buckets import Crop, crop_offsets
from library.dataset_config import check_cacheable
from library.file_io import atomic_path
from library.loss_masks import uses_mask

if TYPE_CHECKING:
    from library.datasets import DatasetGroup, ImageInfo

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def npz_path(image_path: str) -> str:
    """The cache file of an image: same folder and name, `.npz` extension."""
    return os.path.splitext(image_path)[0] + ".npz"


def vae_fingerprint(vae: Any) -> str:
    """A short id of the VAE's weights (the first and last encoder layers), stable across fp32/fp16."""
    h = hashlib.sha256()
    params = list(vae.encoder.parameters())
    for t in (params[0], params[-1]):
        h.update(t.detach().to("cpu", torch.float16).numpy().tobytes())
    h.update(str(getattr(vae.config, "latent_channels", 4)).encode())
    return h.hexdigest()[:16]


def expected_crop(info: "ImageInfo") -> Crop:
    """The deterministic (center) crop of a cached image."""
    w, h = info.size
    return Crop((h, w), crop_offsets(info.resized_size, info.bucket_reso), info.resized_size)


def _original_crop_ltrb(reso: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """The crop box as the original scripts record it (for their readers)."""
    bucket_ar, image_ar = reso[0] / reso[1], size[0] / size[1]
    if bucket_ar > image_ar:
        rw, rh = reso[1] * image_ar, reso[1]
    else:
        rw, rh = reso[0], reso[0] / image_ar
    left, top = (reso[0] - rw) // 2, (reso[1] - rh) // 2
    return [int(left), int(top), int(left + rw), int(top + rh)]


def is_valid(path: str | os.PathLike, bucket_reso: tuple[int, int], flip_aug: bool, crop: Crop | None = None,
             alpha_mask: bool = False, fingerprint: str | None = None) -> bool:
    """True when `path` holds latents for this bucket (w, h), with the flipped variant / alpha mask when
    needed, and, when given, the same resize + crop and VAE (a file without a VAE id passes that check)."""
    if not os.path.isfile(path):
        return False
    w, h = bucket_reso
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            needed = {"latents", "bucket_reso"} | ({"latents_flipped"} if flip_aug else set())
            needed |= {"alpha_mask"} if alpha_mask else set()
            if not needed <= keys or tuple(npz["bucket_reso"].tolist()) != (w, h):
                return False
            if npz["latents"].shape[-2:] != (h // 8, w // 8):
                return False
            if crop is not None and not ({"resized_size", "crop_top_left"} <= keys
                                         and tuple(npz["resized_size"].tolist()) == tuple(crop.resized_size)
                                         and tuple(npz["crop_top_left"].tolist()) == tuple(crop.crop_top_left)):
                return False
            if fingerprint is not None and "vae_fingerprint" in keys and str(npz["vae_fingerprint"]) != fingerprint:
                return False
            return True
    except Exception:  # noqa: BLE001 - unreadable / truncated file (zipfile, OSError, ValueError ...): recompute
        return False


def cache_is_valid(path: str, info: "ImageInfo", fingerprint: str | None = None) -> bool:
    """`is_valid` for a dataset image with its current bucket, crop and subset settings."""
    return is_valid(path, info.bucket_reso, info.subset.flip_aug, expected_crop(info), uses_mask(info.subset),
                    fingerprint)


def save(path: str | os.PathLike, latents: torch.Tensor, crop: Crop, bucket_reso: tuple[int, int],
         latents_flipped: torch.Tensor | None = None, alpha: np.ndarray | None = None,
         fingerprint: str | None = None) -> None:
    """Write one image's cache file atomically (`crop` as returned by buckets.resize_and_crop)."""
    h, w = crop.original_size_hw
    arrays = {
        "latents": latents.float().cpu().numpy(),
        "bucket_reso": np.array(bucket_reso),
        "resized_size": np.array(crop.resized_size),
        "crop_top_left": np.array(crop.crop_top_left),
        "original_size_hw": np.array(crop.original_size_hw),
        "original_size": np.array((w, h)),
        "crop_ltrb": np.array(_original_crop_ltrb(bucket_reso, (w, h))),
        "format_version": np.array(FORMAT_VERSION),
    }
    if fingerprint is not None:
        arrays["vae_fingerprint"] = np.array(fingerprint)
    if latents_flipped is not None:
        arrays["latents_flipped"] = latents_flipped.float().cpu().numpy()
    if alpha is not None:
        arrays["alpha_mask"] = alpha.astype(np.float32)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_cached_latents(info: "ImageInfo", flip: bool) -> tuple[torch.Tensor, Crop, torch.Tensor | None]:
    """The cached latents of `info` (flipped variant when `flip`), its crop and alpha mask (flipped too)."""
    crop = expected_crop(info)
    if info.latents is not None:
        lat = info.latents_flipped if flip else info.latents
        alpha = info.alpha_mask
    else:
        with np.load(info.npz_path) as npz:
            lat = torch.from_numpy(npz["latents_flipped" if flip else "latents"])
            alpha = torch.from_numpy(npz["alpha_mask"]) if "alpha_mask" in npz.files else None
    if alpha is not None and flip:
        alpha = alpha.flip(-1)
    return lat, crop, alpha


@torch.no_grad()
def encode_images(vae: Any, images: list[np.ndarray],
                  generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """VAE latents (B, 4, h, w) float32 on the CPU of uint8 (H, W, 3) images of one size (not scaled);
    `generator`: one for the batch or one per image."""
    from library.training_images import to_tensor

    param = next(vae.parameters())
    x = torch.stack([to_tensor(np.ascontiguousarray(im)) for im in images]).to(param.device, param.dtype)
    latents = vae.encode(x).latent_dist.sample(generator=generator).float().cpu()
    if not torch.isfinite(latents).all():
        raise FloatingPointError("the VAE produced NaN/inf latents (an fp16 SDXL VAE does this: use "
                                 "--no_half_vae or a fixed fp16 VAE)")
    return latents


def _cache_file(image_path: str, bucket_reso: tuple[int, int], shared: bool) -> str:
    """`name.npz`; `name_<w>x<h>.npz` when the image is trained at several buckets (several datasets)."""
    if not shared:
        return npz_path(image_path)
    return os.path.splitext(image_path)[0] + f"_{bucket_reso[0]}x{bucket_reso[1]}.npz"


def _cache_units(group: "DatasetGroup") -> list[tuple[str, bool, list]]:
    """One unit per (image, bucket, resize): its cache file, whether a flipped latent is needed, its infos."""
    units: dict[tuple, list] = {}
    for ds in group.datasets:
        for info in ds.images:
            units.setdefault((info.path, info.bucket_reso, info.resized_size), []).append((ds, info))
    per_path = Counter(key[0] for key in units)
    out = []
    for (path, reso, _), members in units.items():
        members.sort(key=lambda m: not uses_mask(m[1].subset))  # the first member decides alpha loading
        flip = any(info.subset.flip_aug for _, info in members)
        out.append((_cache_file(path, reso, per_path[path] > 1), flip, members))
    return out


def cache_group_latents(group: "DatasetGroup", vae: Any, vae_batch_size: int = 1, to_disk: bool = False,
                        device: str | torch.device | None = None, progress: bool = True, seed: int | None = None,
                        processes: Any = None) -> None:
    """Cache the latents of every image of `group` (valid disk caches are reused), batched by bucket.

    Each image's VAE sample comes from its own generator (keyed by the seed and the image's place in the
    group), so the latents do not depend on the batching or on the process. `processes` (accelerate's
    PartialState) with several processes: each encodes its share and writes its files; in-memory latents are
    then exchanged, disk files are read by all after a barrier."""
    from tqdm import tqdm

    from library.distributed import STREAM_CACHE, sample_seed

    from library.training_images import load_training_image

    for ds in group.datasets:
        for sub in ds.config.subsets:
            check_cacheable(sub, "latent caching")
    if device is not None:
        vae.to(device)
    fingerprint = vae_fingerprint(vae)
    todo, reused = [], 0
    for index, (path, flip, members) in enumerate(_cache_units(group)):
        info = members[0][1]
        if to_disk and is_valid(path, info.bucket_reso, flip, expected_crop(info), uses_mask(info.subset), fingerprint):
            for _, m in members:
                m.npz_path, m.latents = path, None
            reused += 1
        elif to_disk or info.latents is None:
            todo.append((path, flip, members, index))
    if reused:
        logger.info("reusing %d cached latent files", reused)
    todo.sort(key=lambda t: (t[2][0][1].bucket_reso, t[0]))
    world = 1 if processes is None else processes.num_processes
    everyone = todo
    if world > 1:
        processes.wait_for_everyone()  # every process has checked the files before any is rewritten
        todo = todo[processes.process_index::world]
    batches: list[list] = []
    for unit in todo:
        if batches and batches[-1][-1][2][0][1].bucket_reso == unit[2][0][1].bucket_reso \
                and len(batches[-1]) < vae_batch_size:
            batches[-1].append(unit)
        else:
            batches.append([unit])
    param = next(vae.parameters())
    seed = group.seed if seed is None else seed
    computed = {}
    for batch in tqdm(batches, desc="caching latents", disable=not progress or not batches):
        firsts = [members[0] for _, _, members, _ in batch]
        loaded = [load_training_image(info, ds.config.enable_bucket, None, random_crop=False) for ds, info in firsts]
        generators = [torch.Generator(device=param.device).manual_seed(sample_seed(seed, STREAM_CACHE, index))
                      for *_, index in batch]
        try:
            latents = encode_images(vae, [ld.image for ld in loaded], generators)
            need_flip = any(flip for _, flip, _, _ in batch)
            flipped = encode_images(vae, [ld.image[:, ::-1] for ld in loaded], generators) if need_flip else None
        except FloatingPointError as e:
            raise FloatingPointError(f"{', '.join(os.path.basename(i.path) for _, i in firsts)}: {e}") from None
        for k, ((path, flip, members, index), ld) in enumerate(zip(batch, loaded)):
            lat_f = flipped[k].clone() if flip else None
            info = members[0][1]
            if to_disk:
                save(path, latents[k], expected_crop(info), info.bucket_reso, lat_f, ld.alpha, fingerprint)
            alpha = None if ld.alpha is None else torch.from_numpy(ld.alpha)
            computed[index] = (latents[k].clone(), lat_f, alpha)
    if world > 1:
        if to_disk:
            processes.wait_for_everyone()  # every file is complete
        else:
            from accelerate.utils import gather_object

            computed = dict(gather_object(list(computed.items())))
    for path, _, members, index in everyone:
        for _, m in members:
            if to_disk:
                m.npz_path, m.latents = path, None
            else:
                m.latents, m.latents_flipped, m.alpha_mask = computed[index]
