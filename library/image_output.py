"""Saving generated images: PNG text chunks describing the generation, atomic writes, names that never clobber.

The text chunks follow sd-scripts' gen_img (`prompt`, `negative-prompt`, `seed`, `sampler`, `steps`, `scale`,
`negative-scale`, SDXL `original-*` / `crop-*`) plus `width`, `height`, `networks` (JSON) and an
AUTOMATIC1111-style `parameters` chunk so that web UIs' "PNG info" shows the settings.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from library.file_io import atomic_path


def png_metadata(job: Any, networks: Sequence[dict[str, Any]] = (), sdxl: bool = False) -> dict[str, str]:
    """Text chunks for one image from an `ImageJob`; `networks` lists {"file", "multiplier", "merged"}; the size
    conditioning keys (original size, crop) only for SDXL, the one model that uses them."""
    meta = {
        "prompt": job.prompt,
        "negative-prompt": job.negative_prompt,
        "seed": str(job.seed),
        "sampler": job.sampler,
        "steps": str(job.steps),
        "scale": str(job.scale),
        "width": str(job.width),
        "height": str(job.height),
    }
    if job.negative_scale is not None:
        meta["negative-scale"] = str(job.negative_scale)
    if getattr(job, "init_image", None) is not None:
        meta["strength"] = str(job.strength)
    if sdxl and job.original_size is not None:
        meta["original-height"], meta["original-width"] = map(str, job.original_size)
        meta["original-height-negative"], meta["original-width-negative"] = map(str, job.original_size_negative)
        meta["crop-top"], meta["crop-left"] = map(str, job.crop_top_left)
    if networks:
        meta["networks"] = json.dumps(list(networks), ensure_ascii=False)
    meta["parameters"] = _a1111_parameters(job, networks)
    return meta


def _a1111_parameters(job: Any, networks: Sequence[dict[str, Any]]) -> str:
    lines = [job.prompt]
    if job.negative_prompt:
        lines.append(f"Negative prompt: {job.negative_prompt}")
    fields = [f"Steps: {job.steps}", f"Sampler: {job.sampler}", f"CFG scale: {job.scale}", f"Seed: {job.seed}",
              f"Size: {job.width}x{job.height}"]
    if networks:
        fields.append("Networks: " + "; ".join(f"{Path(n['file']).stem}:{n['multiplier']}" for n in networks))
    lines.append(", ".join(fields))
    return "\n".join(lines)


def reserve_path(path: str | os.PathLike) -> Path:
    """Create and return `path`, or `stem_1.ext`, `stem_2.ext`, ... if taken (exclusive create: no clobbering)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    while True:
        candidate = path if n == 0 else path.with_name(f"{path.stem}_{n}{path.suffix}")
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            n += 1
            continue
        os.close(fd)
        return candidate


def save_png(image, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """Write `image` as PNG with text chunks at `path` (or a free variant of it); returns the path used."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_itxt(key, value)  # iTXt: UTF-8, so prompts in any language survive
    target = reserve_path(path)
    try:
        with atomic_path(target) as tmp:
            image.save(tmp, format="PNG", pnginfo=info)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(target)
        raise
    return str(target)
