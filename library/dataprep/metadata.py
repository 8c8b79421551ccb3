"""The fine-tuning metadata JSON and the per-image side files (captions, tags) of the preparation scripts.

Metadata format (read by the fine-tuning dataset method through `--in_json` / `metadata_file`): one JSON object
whose keys are image keys and whose values are objects with any of `caption` (str), `tags` (str, comma separated)
and `train_resolution` ([width, height], written by prepare_buckets_latents.py). An image key is the image's
absolute path with `--full_path`, otherwise the file name without extension (so only one folder per file).

Everything here writes atomically (temporary file + rename) and never drops entries it was given.
"""
from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from library.file_io import atomic_path

logger = logging.getLogger(__name__)

T = TypeVar("T")
Metadata = dict[str, dict]


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Image files of `folder` (sorted; subfolders too with `recursive`); errors name a missing folder.

    What counts as an image (extensions, hidden files skipped) is library.images' rule, the training data's."""
    from library.images import is_image_file
    from library.images import list_images as list_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder (expected the folder holding the training images)")
    if not recursive:
        return [Path(p) for p in list_folder(folder)]
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and is_image_file(p) and not any(part.startswith(".") for part in
                                                                  p.relative_to(folder).parts))


def image_key(image_path: str | os.PathLike, full_path: bool) -> str:
    """The metadata key of an image: its absolute path with `--full_path`, else its file name without extension."""
    path = Path(image_path)
    return os.path.abspath(path) if full_path else path.stem


def find_key(metadata: Metadata, image_path: str | os.PathLike, full_path: bool) -> str:
    """The key of an image in `metadata`: its canonical key, or with `--full_path` an existing entry keyed by the
    path as given or with the extension dropped (as older tools wrote it); the canonical key if none exists."""
    key = image_key(image_path, full_path)
    if key in metadata or not full_path:
        return key
    for variant in (str(image_path), os.path.splitext(str(image_path))[0], os.path.splitext(key)[0]):
        if variant in metadata:
            return variant
    return key


def check_unique_keys(images: Iterable[Path], full_path: bool) -> None:
    """Without `--full_path` two images with the same stem (a.png, a.jpg) would share one entry: refuse that."""
    seen: dict[str, Path] = {}
    for path in images:
        key = image_key(path, full_path)
        if key in seen:
            raise ValueError(f"{seen[key]} and {path} both have the metadata key {key!r}; rename one of them "
                             "or use --full_path")
        seen[key] = path


def sidecar_path(image_path: str | os.PathLike, extension: str) -> Path:
    """The caption/tag/latent file beside an image: same name, `extension` instead of the image's own."""
    path = Path(image_path)
    return path.with_name(path.stem + extension)


def load_metadata(path: str | os.PathLike) -> Metadata:
    """Read a metadata JSON file; a clear error if it is missing, not JSON, or not an object of objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metadata file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))  # tolerate a BOM (Windows editors)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable metadata JSON file ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: metadata must be a JSON object mapping image keys to objects "
                         '(e.g. {"img1": {"caption": "..."}})')
    return data


def save_metadata(metadata: Metadata, path: str | os.PathLike) -> None:
    """Write metadata JSON atomically (UTF-8, indented, non-ASCII kept readable)."""
    text = json.dumps(metadata, indent=2, ensure_ascii=False)
    write_text(path, text + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def read_caption(path: str | os.PathLike) -> str:
    """A caption/tag file's text: the lines joined, surrounding whitespace stripped."""
    text = Path(path).read_text(encoding="utf-8-sig")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


@dataclass
class MergeResult:
    """What `merge_text_files` did: keys updated, images without a text file."""

    updated: int = 0
    added: int = 0
    missing: list[Path] = field(default_factory=list)


def merge_text_files(metadata: Metadata, images: list[Path], extension: str, field_name: str,
                     full_path: bool) -> MergeResult:
    """Put each image's `<stem><extension>` text into `metadata[key][field_name]` (in place).

    Entries of images without a text file, and entries of images not in `images`, are kept unchanged.
    """
    from tqdm import tqdm

    check_unique_keys(images, full_path)
    result = MergeResult()
    for image in tqdm(images, desc=f"merging {field_name}", smoothing=0.0):
        text_file = sidecar_path(image, extension)
        if not text_file.is_file():
            result.missing.append(image)
            continue
        key = find_key(metadata, image, full_path)
        if key not in metadata:
            metadata[key] = {}
            result.added += 1
        metadata[key][field_name] = read_caption(text_file)
        result.updated += 1
    return result


def resolve_in_json(in_json: str | None, out_json: str) -> str | None:
    """The metadata to start from: `--in_json`, else the output file when it exists (the guide's rule), else none."""
    if in_json is not None:
        return in_json
    return out_json if Path(out_json).is_file() else None


def prefetch(items: list[T], load: Callable[[T], object], workers: int = 2,
             window: int = 16) -> Iterator[tuple[T, object, Exception | None]]:
    """Yield `(item, load(item), None)` in order, loading up to `window` items ahead on `workers` threads.

    A failing load yields `(item, None, error)` instead of raising, so one corrupt image never stops a long run.
    """
    def safe(item: T):
        try:
            return load(item), None
        except Exception as e:  # reported per item by the caller
            return None, e

    if workers <= 0:
        for item in items:
            yield (item, *safe(item))
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        it = iter(items)
        for item in it:
            pending.append((item, pool.submit(safe, item)))
            if len(pending) >= window:
                first, fut = pending.pop(0)
                yield (first, *fut.result())
        for item, fut in pending:
            yield (item, *fut.result())


def report_failures(failures: list[tuple[Path, str]], what: str = "images") -> None:
    """Log one summary line plus one line per unreadable file."""
    if not failures:
        return
    logger.warning("%d %s could not be read and were skipped:", len(failures), what)
    for path, reason in failures:
        logger.warning("  %s: %s", path, reason)
