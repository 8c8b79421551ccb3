"""Turning one training image into its bucket-sized array: resize and crop (or face crop), flips, color
augmentation, alpha masks, and the [-1, 1] tensor layout the VAE expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from library.buckets import Crop, Reso, resize_and_crop
from library.images import load_image


def color_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The original's color_aug: a third of the time, a small hue shift or a gamma in [0.95, 1.05]."""
    import cv2

    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = rng.uniform(-8, 8)
        hsv[..., 0] = ((hsv[..., 0].astype(np.float32) + shift) % 180).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(((image / 255.0) ** gamma) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def face_crop(image: np.ndarray, face: tuple[int, int, int, int], reso: Reso, face_range: tuple[float, float],
              random_crop: bool, rng: np.random.Generator) -> np.ndarray:
    """Scale so the face is 1/face_range of the short side and crop around it (the original's crop_target)."""
    import cv2

    height, width = image.shape[:2]
    tw, th = reso
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    size = min(tw, th)
    min_scale = max(th / height, tw / width)
    lo = min(1.0, max(min_scale, size / (face_size * face_range[1])))
    hi = min(1.0, max(lo, size / (face_size * face_range[0])))
    scale = lo if lo >= hi else rng.uniform(lo, hi)
    nh, nw = max(th, int(height * scale + 0.5)), max(tw, int(width * scale + 0.5))
    image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    cx, cy = int(cx * scale + 0.5), int(cy * scale + 0.5)
    for axis, (target, length, centre) in enumerate(((th, nh, cy), (tw, nw, cx))):
        p = centre - target // 2
        if random_crop:
            span = max(length - centre, centre)
            p += int(rng.integers(0, span + 1) + rng.integers(0, span + 1)) - span
        elif face_range[0] != face_range[1] and face_size > size // 10 and face_size >= 40:
            p += int(rng.integers(-(face_size // 20), face_size // 20 + 1))
        p = max(0, min(p, length - target))
        image = image[p:p + target] if axis == 0 else image[:, p:p + target]
    return np.ascontiguousarray(image)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


@dataclass
class LoadedImage:
    image: np.ndarray  # uint8 (H, W, 3), bucket sized
    crop: Crop
    alpha: np.ndarray | None


def load_training_image(info: Any, use_bucket_crop: bool, rng: np.random.Generator | None,
                        random_crop: bool | None = None) -> LoadedImage:
    """Read the image of `info` (a datasets.ImageInfo) as its bucket-sized array (face crop when configured and
    not bucketing); `random_crop` overrides the subset's setting (latent caching crops in the centre)."""
    from library.loss_masks import load_image_and_mask, uses_mask

    sub = info.subset
    masked = uses_mask(sub)  # alpha channel or --masked_loss mask image: carried as the alpha channel
    if masked:
        image, alpha = load_image_and_mask(info)
        if alpha is None:
            alpha = np.ones(image.shape[:2], dtype=np.float32)
        image = np.dstack([image, (alpha * 255 + 0.5).astype(np.uint8)])
    else:
        image = load_image(info.path)
    random_crop = sub.random_crop if random_crop is None else random_crop
    rng = rng if rng is not None else np.random.default_rng(0)
    if not use_bucket_crop and info.face is not None and sub.face_crop_aug_range is not None:
        h, w = image.shape[:2]
        image = face_crop(image, info.face, info.bucket_reso, sub.face_crop_aug_range, random_crop, rng)
        crop = Crop((h, w), (0, 0), (w, h))
    else:
        image, crop = resize_and_crop(image, info.bucket_reso, info.resized_size, random_crop, rng)
    alpha = None
    if masked:
        alpha = image[..., 3].astype(np.float32) / 255.0
        image = np.ascontiguousarray(image[..., :3])
    return LoadedImage(image, crop, alpha)
