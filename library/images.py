"""Reading training images: the supported formats, EXIF orientation, transparency and 16-bit images.

Every image is returned as an RGB `uint8` numpy array (H, W, 3), upright as the EXIF orientation says.
Transparent images (RGBA, LA, palette with transparency) are composited onto white, 16-bit and float images
are scaled to 8 bits (not clipped). Any unreadable or corrupt file raises `ImageError` naming the file.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

from library.file_io import atomic_path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_BACKGROUND = (255, 255, 255)

# Large training images are expected; the guide only warns about ~3000x3000 and above.
Image.MAX_IMAGE_PIXELS = 20000 * 20000


class ImageError(ValueError):
    """An image file that cannot be read; the message names the file."""


def is_image_file(path: str | os.PathLike) -> bool:
    """True for the supported extensions (.png .jpg .jpeg .webp .bmp), any letter case."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(folder: str | os.PathLike) -> list[str]:
    """The supported image files directly inside `folder`, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and is_image_file(p))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on white, high bit depths rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F" and arr.max(initial=0) <= 1.0:
            peak = 1.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray] * 3, axis=-1), "RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _error(path: str | os.PathLike, e: Exception) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError(f"{path}: image file not found")
    return ImageError(f"{path}: cannot read image ({type(e).__name__}: {e}); "
                      f"replace or remove the file (supported: {' '.join(IMAGE_EXTENSIONS)})")


def _open(path: str | os.PathLike) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
        return ImageOps.exif_transpose(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad files
        raise _error(path, e) from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Load `path` as an upright RGB uint8 array (H, W, 3)."""
    with _open(path) as img:
        return np.asarray(_to_rgb(img)).copy()


def load_image_with_alpha(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Load `path` as RGB plus its alpha channel as float32 in [0, 1] (None when the image has no alpha)."""
    with _open(path) as img:
        alpha = None
        if img.mode in ("RGBA", "LA", "PA") or img.mode == "P" and "transparency" in img.info:
            alpha = np.asarray(img.convert("RGBA"))[..., 3].astype(np.float32) / 255.0
        return np.asarray(_to_rgb(img)).copy(), alpha


def _check_one(path: str) -> tuple[int, int]:
    """Upright (w, h) of an image after decoding all of its data (JPEGs at 1/8 scale: same check, faster)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                w, h = h, w
            if img.format == "JPEG":
                img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
        return w, h
    except Exception as e:  # noqa: BLE001 - see _open
        raise _error(path, e) from None


def read_image_sizes(paths: Iterable[str], workers: int = 4, progress: bool = True) -> list[tuple[int, int]]:
    """Decode every image once (catching corrupt files before training starts); return upright (w, h) sizes.

    Decoding runs on a small thread pool (PIL releases the GIL while decoding). Every unreadable image is
    reported in one `ImageError` (how many, and the first few with their reasons).
    """
    from tqdm import tqdm

    paths = list(paths)
    if not paths:
        return []

    def check(path: str) -> tuple[int, int] | ImageError:
        try:
            return _check_one(path)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
        it = pool.map(check, paths)
        results = list(tqdm(it, total=len(paths), desc="checking images", disable=not progress or len(paths) < 50))
    errors = [r for r in results if isinstance(r, ImageError)]
    if len(errors) == 1:
        raise errors[0]
    if errors:
        shown = "; ".join(str(e).split("; replace or remove")[0] for e in errors[:_ERRORS_SHOWN])
        more = f"; and {len(errors) - _ERRORS_SHOWN} more" if len(errors) > _ERRORS_SHOWN else ""
        raise ImageError(f"{len(errors)} of {len(paths)} images cannot be read: {shown}{more}; replace or remove "
                         f"them (supported: {' '.join(IMAGE_EXTENSIONS)})")
    return results


_ERRORS_SHOWN = 5


SIZE_CACHE_NAME = "image_size_cache.json"


class SizeCache:
    """Sizes of images already decoded once, keyed by file name, valid while size and mtime are unchanged."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, SIZE_CACHE_NAME)
        self.entries: dict[str, list[int]] = {}
        self.dirty = False
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
            self.entries = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            pass

    @staticmethod
    def _stamp(path: str) -> list[int]:
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]

    def get(self, path: str) -> tuple[int, int] | None:
        entry = self.entries.get(os.path.basename(path))
        if isinstance(entry, list) and len(entry) == 4 and entry[2:] == self._stamp(path):
            return int(entry[0]), int(entry[1])
        return None

    def put(self, path: str, size: tuple[int, int]) -> None:
        self.entries[os.path.basename(path)] = [size[0], size[1], *self._stamp(path)]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            with atomic_path(self.path) as tmp, open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.entries, f)
        except OSError as e:  # a read-only image folder only loses the speed-up
            logger.warning("cannot write %s: %s", self.path, e)
