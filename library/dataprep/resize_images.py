"""Resize a folder of training images to one or more target areas (tools/resize_images_to_resolution.py).

For each image the destination gets the original file unchanged plus one copy per target resolution, named
`<name>+<W>x<H>.<jpg|png>`: scaled (aspect ratio kept) so that its area is at most W*H, never upscaled, then
center-cropped so both sides are divisible by `divisible_by`. Every size is computed from the original image, not
from the previous copy. Other files are copied unchanged; with `copy_associated_files` the files sharing an
image's name (captions, tags) are also copied under each resized copy's name.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from library.dataprep.metadata import prefetch, report_failures
from library.file_io import atomic_path
from library.images import is_image_file

logger = logging.getLogger(__name__)

INTERPOLATIONS = ("area", "cubic", "lanczos4", "nearest", "linear")


@dataclass(frozen=True)
class Resolution:
    """One target: its label as written in the file name (`512x512`) and its pixel area."""

    label: str
    width: int
    height: int

    @property
    def area(self) -> int:
        return self.width * self.height


@dataclass
class ResizeSummary:
    images: int = 0
    written: list[Path] = field(default_factory=list)
    copied: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)


def parse_resolutions(text: str) -> list[Resolution]:
    """`"512x512,384x384"` -> Resolutions; a clear error for anything else."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            w = h = 0
        if w <= 0 or h <= 0:
            raise ValueError(f"--max_resolution: {part!r} is not WIDTHxHEIGHT (e.g. 512x512,384x384)")
        out.append(Resolution(f"{w}x{h}", w, h))
    return out


def target_size(width: int, height: int, res: Resolution, divisible_by: int = 1) -> tuple[int, int, bool]:
    """(new_width, new_height, scaled): area at most `res.area`, no upscaling, sides rounded down to `divisible_by`.

    The returned size is what the saved copy measures; when it differs from the scaled size the copy is
    center-cropped to it.
    """
    scaled = width * height > res.area
    if scaled:
        factor = math.sqrt(res.area / (width * height))
        width, height = int(width * factor), int(height * factor)
    width -= width % divisible_by
    height -= height % divisible_by
    return width, height, scaled


def resize_array(img: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
    """cv2 resize of an HxWxC uint8 array to (w, h)."""
    import cv2

    flags = {"area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC, "lanczos4": cv2.INTER_LANCZOS4,
             "nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR}
    return cv2.resize(img, size, interpolation=flags[interpolation])


def center_crop(img: np.ndarray, width: int, height: int) -> np.ndarray:
    top = (img.shape[0] - height) // 2
    left = (img.shape[1] - width) // 2
    return img[top:top + height, left:left + width]


def _open_array(path: Path) -> np.ndarray:
    """Image as uint8 RGB or RGBA array (RGBA kept only when the image has transparency), EXIF-rotated.

    Unlike library.images.load_image (which composites transparency onto white for training), the alpha channel
    is kept as it is so PNG copies stay identical to the original apart from their size."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
            return np.asarray(im.convert("RGBA" if has_alpha else "RGB"))
    except Exception as e:
        raise ValueError(f"cannot read image ({e})") from None


def _save_array(img: np.ndarray, path: Path, as_png: bool) -> None:
    from PIL import Image

    image = Image.fromarray(img)
    if not as_png and image.mode == "RGBA":  # JPEG has no alpha: composite onto white
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    with atomic_path(path) as tmp:
        if as_png:
            image.save(tmp, format="PNG")
        else:
            image.save(tmp, format="JPEG", quality=100)


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)


def index_associated_files(files: list[Path]) -> dict[str, list[Path]]:
    """Non-image files by every name prefix that ends before a dot: `a.tags.txt` under `a` and `a.tags`, so an
    image `a.png` finds `a.txt`, `a.caption` and `a.tags.txt` in one lookup."""
    index: dict[str, list[Path]] = {}
    for f in files:
        if is_image_file(f):
            continue
        parts = f.name.split(".")
        for i in range(1, len(parts)):
            index.setdefault(".".join(parts[:i]), []).append(f)
    return index


def _check_output_names(images: list[Path], resolutions: list[Resolution], save_as_png: bool) -> None:
    ext = ".png" if save_as_png else ".jpg"
    seen: dict[str, Path] = {}
    for img in images:
        name = f"{img.stem}+{resolutions[0].label}{ext}"
        if name in seen:
            raise ValueError(f"{seen[name]} and {img} would both be written as {name}; rename one of them")
        seen[name] = img


def resize_folder(src: str | os.PathLike, dst: str | os.PathLike, resolutions: list[Resolution],
                  divisible_by: int = 1, interpolation: str = "area", save_as_png: bool = False,
                  copy_associated_files: bool = False) -> ResizeSummary:
    """Resize every image of `src` into `dst` as described in the module docstring. Source files are never
    modified; `dst` must be another folder."""
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: source folder not found")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"destination {dst} is the source folder; choose another folder (sources are never modified)")
    if divisible_by < 1:
        raise ValueError(f"--divisible_by must be at least 1 (got {divisible_by})")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"--interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
    files = sorted(p for p in src.iterdir() if p.is_file())
    images = [p for p in files if is_image_file(p)]
    _check_output_names(images, resolutions, save_as_png)
    dst.mkdir(parents=True, exist_ok=True)

    summary = ResizeSummary(images=len(images))
    for f in files:
        if f not in images:
            _copy(f, dst / f.name)
            summary.copied.append(dst / f.name)
    ext = ".png" if save_as_png else ".jpg"
    associated = index_associated_files(files) if copy_associated_files else {}
    for path, img, err in tqdm(prefetch(images, _open_array), total=len(images), desc="resizing", smoothing=0.0):
        if err is not None:
            logger.error("%s: %s (skipped)", path, err)
            summary.failures.append((path, str(err)))
            continue
        _copy(path, dst / path.name)
        summary.copied.append(dst / path.name)
        height, width = img.shape[:2]
        for res in resolutions:
            new_w, new_h, scaled = target_size(width, height, res, divisible_by)
            if new_w < 1 or new_h < 1:
                logger.warning("%s: too small for --divisible_by %d, no %s copy", path, divisible_by, res.label)
                continue
            out = img
            if scaled:
                factor = math.sqrt(res.area / (width * height))
                out = resize_array(img, (int(width * factor), int(height * factor)), interpolation)
            out = center_crop(out, new_w, new_h)
            target = dst / f"{path.stem}+{res.label}{ext}"
            _save_array(np.ascontiguousarray(out), target, save_as_png)
            summary.written.append(target)
            logger.debug("%s %s -> %s (%dx%d)", "resized" if scaled else "saved", path.name, target.name, new_w, new_h)
            for assoc in associated.get(path.stem, []):
                copy = dst / f"{path.stem}+{res.label}{assoc.name[len(path.stem):]}"
                _copy(assoc, copy)
                summary.copied.append(copy)
    report_failures(summary.failures)
    return summary
