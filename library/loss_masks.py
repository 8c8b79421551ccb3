"""Loss masks: `--masked_loss` with mask images of a subset's `conditioning_data_dir`, and alpha masks.

A mask image has the name stem of its training image (any image extension) in the subset's
`conditioning_data_dir`; it is read as grey levels in [0, 1] (white = learn, black = ignore; a colour mask uses
its luminance). It is attached to the image as an alpha channel before resizing, so it follows the image through
bucketing, cropping and flipping exactly, and the latent cache stores it (`alpha_mask` in the `.npz`). The trainer
multiplies the element-wise loss by the mask at latent resolution (area-averaged), as for `alpha_mask = true`.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np

from library.images import IMAGE_EXTENSIONS, list_images, load_image, load_image_with_alpha


def uses_mask(sub: Any) -> bool:
    """Whether the images of this subset carry a loss mask (alpha channel or mask image)."""
    return bool(sub.alpha_mask or getattr(sub, "conditioning_data_dir", None))


def mask_path(image_path: str, mask_dir: str) -> str | None:
    """The mask image of `image_path` in `mask_dir` (same stem, any image extension), or None."""
    stem = Path(image_path).stem
    for ext in IMAGE_EXTENSIONS:
        for candidate in (stem + ext, stem + ext.upper()):
            path = os.path.join(mask_dir, candidate)
            if os.path.isfile(path):
                return path
    return None


def validate_masks(config: Any, args: argparse.Namespace) -> None:
    """conditioning_data_dir needs --masked_loss, an existing folder and a mask for every image (checked now,
    before any model loads); --masked_loss needs masks somewhere."""
    masked = bool(getattr(args, "masked_loss", False))
    any_mask = False
    for ds in config.datasets:
        for sub in ds.subsets:
            any_mask |= uses_mask(sub)
            if not sub.conditioning_data_dir:
                continue
            if not masked:
                raise ValueError(f"{sub.where}: conditioning_data_dir needs --masked_loss (its images are loss masks)")
            if not os.path.isdir(sub.conditioning_data_dir):
                raise FileNotFoundError(f"{sub.where}: conditioning_data_dir {sub.conditioning_data_dir}: no such folder")
            if sub.image_dir and os.path.isdir(sub.image_dir):
                missing = [os.path.basename(p) for p in list_images(sub.image_dir)
                           if mask_path(p, sub.conditioning_data_dir) is None]
                if missing:
                    raise FileNotFoundError(f"{sub.where}: conditioning_data_dir {sub.conditioning_data_dir} has no mask "
                                            f"image for {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else "")
                                            + " (same name, any image extension)")
    if masked and not any_mask:
        raise ValueError("--masked_loss: no subset has masks; set conditioning_data_dir (mask images) in the dataset "
                         "config or use --alpha_mask / alpha_mask = true")


def load_mask(path: str, size_wh: tuple[int, int]) -> np.ndarray:
    """A mask image as float32 (H, W) in [0, 1], resized to the image's size when it differs."""
    from PIL import Image

    from library.images import _open

    with _open(path) as img:
        grey = img.convert("L")
        if grey.size != tuple(size_wh):
            grey = grey.resize(tuple(size_wh), Image.BILINEAR)
        return np.asarray(grey, dtype=np.float32) / 255.0


def load_image_and_mask(info: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB uint8 (H, W, 3) of a training image and its loss mask float32 (H, W) or None (no alpha channel)."""
    sub = info.subset
    if getattr(sub, "conditioning_data_dir", None):
        image = load_image(info.path)
        path = mask_path(info.path, sub.conditioning_data_dir)
        if path is None:
            raise FileNotFoundError(f"{sub.where}: no mask image for {info.path} in {sub.conditioning_data_dir}")
        return image, load_mask(path, (image.shape[1], image.shape[0]))
    return load_image_with_alpha(info.path)
