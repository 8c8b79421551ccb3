"""Aspect-ratio bucketing: the bucket resolutions, the choice of bucket per image, resize and crop.

As the training guide describes: bucket sides move in `reso_steps` (64 by default, 32 allowed for SDXL) between
`min_size` and `max_size`, no bucket exceeds the area of the training resolution, and each image goes to the
bucket with the nearest aspect ratio, resized to cover it and cropped (center, or random with `random_crop`).
With `no_upscale` the buckets follow the images (never enlarged; shrunk only to fit the area) instead of a
predefined list. Without bucketing every image is resized to cover the fixed resolution and cropped.

Sizes are (width, height) tuples throughout, as in the original; the SDXL conditioning values
(`original_size_hw`, `crop_top_left`) are returned by `resize_and_crop` in the (height, width) order the
model expects. The crop offset is the real top-left of the crop inside the resized image (what SDXL's
micro-conditioning was trained with).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Reso = tuple[int, int]


def make_bucket_resolutions(max_reso: Reso, min_size: int = 256, max_size: int = 1024, divisible: int = 64) -> list[Reso]:
    """All (w, h) buckets with area <= w*h of `max_reso`, sides multiples of `divisible` in [min_size, max_size].

    The square bucket is the largest multiple of `divisible` not above sqrt(area); for each width the height is
    the largest multiple that keeps the area (capped at `max_size`), and each pair is added in both orientations.
    """
    max_area = max_reso[0] * max_reso[1]
    side = int(math.sqrt(max_area) // divisible) * divisible
    resos = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def round_to_steps(x: float, steps: int) -> int:
    x = int(x + 0.5)
    return x - x % steps


@dataclass(frozen=True)
class BucketChoice:
    """Where one image goes: its bucket and the size it is resized to before cropping."""

    bucket_reso: Reso
    resized_size: Reso
    ar_error: float


class BucketManager:
    """Chooses buckets. `predefined` mode (the default) uses `make_bucket_resolutions`; `no_upscale` mode
    derives each bucket from the image; `fixed` mode (bucketing off) has the single training resolution."""

    def __init__(self, max_reso: Reso, min_size: int = 256, max_size: int = 1024, reso_steps: int = 64,
                 no_upscale: bool = False, enabled: bool = True, predefined: list[Reso] | None = None) -> None:
        self.max_reso = tuple(max_reso)
        self.max_area = max_reso[0] * max_reso[1]
        self.min_size, self.max_size, self.reso_steps = min_size, max_size, reso_steps
        self.no_upscale = no_upscale and enabled and predefined is None
        self.enabled = enabled
        if predefined is not None:
            resos = sorted(set(map(tuple, predefined)))
        elif not enabled:
            resos = [self.max_reso]
        elif no_upscale:
            resos = []
        else:
            resos = make_bucket_resolutions(self.max_reso, min_size, max_size, reso_steps)
        self.predefined_resos = resos
        self._resos_set = set(resos)
        self._aspects = np.array([w / h for w, h in resos], dtype=np.float64)

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        """The bucket of an image of this (upright) size and the size to resize it to (covering the bucket)."""
        aspect = image_width / image_height
        if self.no_upscale:
            reso, resized = self._select_no_upscale(image_width, image_height, aspect)
        else:
            reso = (image_width, image_height)
            if reso not in self._resos_set:
                reso = self.predefined_resos[int(np.abs(self._aspects - aspect).argmin())]
            resized = cover_size((image_width, image_height), reso)
        return BucketChoice(reso, resized, reso[0] / reso[1] - aspect)

    def _select_no_upscale(self, width: int, height: int, aspect: float) -> tuple[Reso, Reso]:
        if width * height > self.max_area:
            # shrink to the area keeping the aspect; round the side whose rounding keeps the aspect best
            rw = math.sqrt(self.max_area * aspect)
            rh = self.max_area / rw
            bw = round_to_steps(rw, self.reso_steps)
            bh_in_w = round_to_steps(bw / aspect, self.reso_steps)
            bh = round_to_steps(rh, self.reso_steps)
            bw_in_h = round_to_steps(bh * aspect, self.reso_steps)
            if bh_in_w > 0 and (bw_in_h == 0 or abs(bw / bh_in_w - aspect) < abs(bw_in_h / bh - aspect)):
                resized = (bw, int(bw / aspect + 0.5))
            else:
                resized = (int(bh * aspect + 0.5), bh)
        else:
            resized = (width, height)
        reso = (resized[0] - resized[0] % self.reso_steps, resized[1] - resized[1] % self.reso_steps)
        if reso[0] < self.reso_steps or reso[1] < self.reso_steps:
            raise ValueError(f"image of {width}x{height} is smaller than one bucket step ({self.reso_steps}) "
                             "with bucket_no_upscale; use a larger image or drop bucket_no_upscale")
        return reso, resized


def cover_size(image_size: Reso, reso: Reso) -> Reso:
    """The size that scales `image_size` (keeping its aspect) to just cover `reso`."""
    w, h = image_size
    if w / h > reso[0] / reso[1]:  # wider than the bucket: match heights
        scale = reso[1] / h
    else:
        scale = reso[0] / w
    return max(reso[0], int(w * scale + 0.5)), max(reso[1], int(h * scale + 0.5))


@dataclass(frozen=True)
class Crop:
    """How one image was turned into a bucket-sized array (for SDXL conditioning and cache validation)."""

    original_size_hw: tuple[int, int]
    crop_top_left: tuple[int, int]  # (top, left) in the resized image
    resized_size: Reso


def crop_offsets(resized: Reso, reso: Reso, random_crop: bool = False,
                 rng: np.random.Generator | None = None) -> tuple[int, int]:
    """(top, left) of the crop of size `reso` inside an image of size `resized` (both (w, h))."""
    trim_w, trim_h = resized[0] - reso[0], resized[1] - reso[1]
    if random_crop:
        rng = rng if rng is not None else np.random.default_rng()
        return int(rng.integers(0, trim_h + 1)), int(rng.integers(0, trim_w + 1))
    return trim_h // 2, trim_w // 2


def resize_and_crop(image: np.ndarray, reso: Reso, resized: Reso | None = None, random_crop: bool = False,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, Crop]:
    """Resize `image` (H, W, C) to `resized` (default: covering `reso`) and crop it to `reso` (w, h)."""
    import cv2

    h, w = image.shape[:2]
    resized = tuple(resized) if resized is not None else cover_size((w, h), reso)
    if (w, h) != resized:
        shrinking = resized[0] * resized[1] < w * h
        image = cv2.resize(image, resized, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)
    top, left = crop_offsets(resized, reso, random_crop, rng)
    image = image[top:top + reso[1], left:left + reso[0]]
    return np.ascontiguousarray(image), Crop((h, w), (top, left), resized)


def flipped_crop_top_left(crop: Crop, reso: Reso) -> tuple[int, int]:
    """The crop top-left after a horizontal flip of the cropped image (the crop mirrors inside the resize)."""
    return crop.crop_top_left[0], crop.resized_size[0] - reso[0] - crop.crop_top_left[1]
