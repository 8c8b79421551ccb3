"""img2img sources and the highres fix of the generation scripts (sd-scripts' `--image_path`, `--strength`,
`--highres_fix_*`).

img2img: each image job takes the next source image (cycling); without an explicit size the image's size,
rounded down to a multiple of 32, is used. Highres fix: a first pass at `--highres_fix_scale` of the size with
`--highres_fix_steps`, upscaled (LANCZOS on the image, or bilinear on the latents with
`--highres_fix_latents_upscaling`), then an img2img pass at full size with `--strength` and the seed + 1 noise.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from library import sampling as S

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_STRENGTH = 0.8


def image_files(path: str) -> list[Path]:
    """The source image(s) of `--image_path`: a file, or the images of a folder (sorted)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"--image_path {path}: no such file or folder")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"--image_path {path}: no images ({', '.join(IMAGE_EXTS)}) in this folder")
    return files


def load_images(files: Sequence[Path]) -> list[Any]:
    from PIL import Image

    images = []
    for f in files:
        with Image.open(f) as im:
            image = im.convert("RGB")
        image.filename = str(f)  # convert() drops it; --use_original_file_name needs it
        images.append(image)
    return images


class InitImages:
    """Hands out the img2img source images in turn; sizes the job from the image when no size was given."""

    def __init__(self, images: Sequence[Any], size_from_image: bool):
        self.images, self.size_from_image = list(images), size_from_image
        self.count = 0

    def next_for(self, spec: S.PromptSpec) -> tuple[S.PromptSpec, Any]:
        image = self.images[self.count % len(self.images)]
        self.count += 1
        if self.size_from_image and spec.width is None and spec.height is None:
            w, h = image.size
            spec = replace(spec, width=max(64, w - w % 32), height=max(64, h - h % 32))
        return spec, image


def _scaled(value: int, scale: float, multiple: int = 1) -> int:
    v = int(value * scale + 0.5)
    return max(multiple, v - v % multiple)


def first_stage_job(job: S.ImageJob, scale: float, steps: int, strength: float | None) -> S.ImageJob:
    """The low-resolution pass of the highres fix (sizes and size conditioning scaled by `scale`)."""
    def pair(p):
        return (_scaled(p[0], scale), _scaled(p[1], scale))

    return replace(job, width=_scaled(job.width, scale, 32), height=_scaled(job.height, scale, 32), steps=steps,
                   original_size=pair(job.original_size), original_size_negative=pair(job.original_size_negative),
                   crop_top_left=pair(job.crop_top_left), strength=job.strength if strength is None else strength)


def highres_fix(jobs: Sequence[S.ImageJob], run_stage: Callable[[list[S.ImageJob], bool], list[Any]],
                scale: float, steps: int, strength: float | None, latents: bool,
                save_first: Callable[[S.ImageJob, Any], None] | None = None) -> list[S.ImageJob]:
    """Run the first pass with `run_stage(jobs, decode)`; return the second-pass jobs (img2img on its output)."""
    first = [first_stage_job(j, scale, steps, strength) for j in jobs]
    outputs = run_stage(first, not latents)
    if save_first is not None:
        for job, out in zip(first, outputs):
            save_first(job, out)
    logger.info("highres fix: first pass %dx%d done, second pass %dx%d", first[0].width, first[0].height,
                jobs[0].width, jobs[0].height)
    return [replace(j, init_image=out, noise_offset=1) for j, out in zip(jobs, outputs)]
