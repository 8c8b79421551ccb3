"""WD14 tagger (SmilingWolf's ONNX models) for finetune/tag_images_by_wd14_tagger.py.

The model folder holds `model.onnx` (input: NHWC float32 BGR 0..255 images padded to a white square, output:
sigmoid probabilities, one per row of the CSV) and `selected_tags.csv` (`tag_id,name,category,count`; category 9
= rating, 0 = general, 4 = character). Folders are found or downloaded as kohya does: `<model_dir>/<repo_id with
/ replaced by _>/`, or `<model_dir>` itself when it already holds both files.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_REPO_ID = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
DEFAULT_IMAGE_SIZE = 448
RATING, GENERAL, CHARACTER = "9", "0", "4"


def model_folder(model_dir: str | os.PathLike, repo_id: str) -> Path:
    """Where the model files are: `model_dir` if it holds them, else `model_dir/<repo_id with _>`."""
    model_dir = Path(model_dir)
    if (model_dir / MODEL_FILE).is_file() and (model_dir / TAGS_FILE).is_file():
        return model_dir
    return model_dir / repo_id.replace("/", "_")


def ensure_model(model_dir: str | os.PathLike, repo_id: str, force_download: bool = False) -> Path:
    """The folder holding model.onnx and selected_tags.csv, downloading them from the hub when missing."""
    folder = model_folder(model_dir, repo_id)
    have = (folder / MODEL_FILE).is_file() and (folder / TAGS_FILE).is_file()
    if have and not force_download:
        logger.info("using existing WD14 tagger model in %s", folder)
        return folder
    from huggingface_hub import hf_hub_download

    logger.info("downloading WD14 tagger model %s to %s", repo_id, folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TAGS_FILE, MODEL_FILE):
        try:
            hf_hub_download(repo_id, name, local_dir=folder, force_download=force_download)
        except Exception as e:  # offline, unknown repo, HTTP errors: all end the run the same way
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise FileNotFoundError(
                f"cannot download {name} of {repo_id} into {folder} ({reason}); without network, put "
                f"{MODEL_FILE} and {TAGS_FILE} into that folder or pass --model_dir pointing at them") from None
    return folder


@dataclass
class TagTable:
    """The rows of selected_tags.csv: names and categories, in model output order."""

    names: list[str]
    categories: list[str]

    def indices(self, category: str) -> np.ndarray:
        return np.array([i for i, c in enumerate(self.categories) if c == category], dtype=np.int64)


def read_tag_table(path: str | os.PathLike) -> TagTable:
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:3] != ["tag_id", "name", "category"]:
        raise ValueError(f"{path}: expected a header 'tag_id,name,category,...', found {rows[0] if rows else 'nothing'}")
    body = [r for r in rows[1:] if r]
    bad = next((r for r in body if len(r) < 3), None)
    if bad is not None:
        raise ValueError(f"{path}: row {bad} has fewer than 3 columns")
    return TagTable([r[1] for r in body], [r[2] for r in body])


@dataclass
class TagOptions:
    """How probabilities become a tag line (the script's options)."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    remove_underscore: bool = False
    undesired_tags: set[str] = field(default_factory=set)
    separator: str = ", "
    use_rating_tags: bool = False
    use_rating_tags_as_last_tag: bool = False
    character_tags_first: bool = False
    always_first_tags: list[str] = field(default_factory=list)


def display_name(tag: str, remove_underscore: bool) -> str:
    """Underscores to spaces, except in short emoticon tags such as `^_^` (kohya's rule: longer than 3)."""
    return tag.replace("_", " ") if remove_underscore and len(tag) > 3 else tag


def select_tags(probs: np.ndarray, table: TagTable, opts: TagOptions) -> list[str]:
    """Tags of one image in CSV order: general >= general threshold, character >= character threshold, and the
    most likely rating when asked; undesired tags removed; `always_first_tags` moved to the front."""
    chosen: list[str] = []
    characters: list[str] = []
    for i, (name, cat) in enumerate(zip(table.names, table.categories)):
        if cat == GENERAL and probs[i] >= opts.general_threshold:
            chosen.append(name)
        elif cat == CHARACTER and probs[i] >= opts.character_threshold:
            (characters if opts.character_tags_first else chosen).append(name)
    tags = characters + chosen
    ratings = table.indices(RATING)
    if (opts.use_rating_tags or opts.use_rating_tags_as_last_tag) and len(ratings):
        rating = table.names[int(ratings[np.argmax(probs[ratings])])]
        tags = [rating] + tags if opts.use_rating_tags else tags + [rating]
    tags = [display_name(t, opts.remove_underscore) for t in tags]
    tags = [t for t in tags if t not in opts.undesired_tags]
    for first in reversed(opts.always_first_tags):
        if first in tags:
            tags.remove(first)
            tags.insert(0, first)
    return tags


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (size, size, 3) float32 BGR: the image padded with white to a centred square of
    `size` (as the tagger was trained). Resizing before padding gives the same picture as padding first, at a
    fraction of the cost for large images."""
    import cv2

    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    out = np.full((size, size, 3), 255, np.uint8)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top:top + new_h, left:left + new_w] = image[:, :, ::-1]
    return out.astype(np.float32)


class OnnxTagger:
    """An onnxruntime session over the tagger model, with its input size and fixed batch size (if any)."""

    def __init__(self, model_path: str | os.PathLike, num_tags: int):
        import onnxruntime as ort

        self.path = Path(model_path)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers + ["CPUExecutionProvider"])
        except Exception as e:
            raise ValueError(f"{self.path}: not a loadable ONNX model ({str(e).splitlines()[0]})") from None
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] not in (3, "3"):
            raise ValueError(f"{self.path}: expected an NHWC image input [N, H, W, 3], found {shape}")
        self.image_size = shape[1] if isinstance(shape[1], int) and shape[1] > 0 else DEFAULT_IMAGE_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        out_shape = self.session.get_outputs()[0].shape
        if isinstance(out_shape[-1], int) and out_shape[-1] != num_tags:
            raise ValueError(f"{self.path}: the model predicts {out_shape[-1]} tags but {TAGS_FILE} lists "
                             f"{num_tags}; use the CSV that came with the model")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n = len(batch)
        if self.fixed_batch and n < self.fixed_batch:  # pad a short last batch for fixed-batch exports
            batch = np.concatenate([batch, np.zeros((self.fixed_batch - n, *batch.shape[1:]), batch.dtype)])
        return self.session.run(None, {self.input_name: batch})[0][:n]


@dataclass
class TaggingResult:
    written: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)
    frequency: dict[str, int] = field(default_factory=dict)


def merge_existing(path: Path, tags: list[str], separator: str) -> list[str]:
    """`--append_tags`: the tags already in `path` first, then the new ones not yet there."""
    if not path.is_file():
        return tags
    existing = [t.strip() for t in path.read_text(encoding="utf-8").split(separator.strip()) if t.strip()]
    return existing + [t for t in tags if t not in existing]


def tag_images(images: list[Path], tagger: OnnxTagger, table: TagTable, opts: TagOptions, extension: str,
               batch_size: int = 1, append: bool = False, workers: int = 2) -> TaggingResult:
    """Tag every image, writing `<image stem><extension>` beside it (atomically). Unreadable images are skipped
    and listed in the result."""
    from tqdm import tqdm

    from library.dataprep.metadata import prefetch, sidecar_path, write_text
    from library.images import load_image

    batch_size = tagger.fixed_batch or batch_size
    result = TaggingResult()

    def load(path: Path) -> np.ndarray:
        return preprocess(load_image(path), tagger.image_size)

    def flush(batch: list[tuple[Path, np.ndarray]]) -> None:
        probs = tagger(np.stack([arr for _, arr in batch]))
        for (path, _), p in zip(batch, probs):
            tags = select_tags(p, table, opts)
            out = sidecar_path(path, extension)
            if append:
                tags = merge_existing(out, tags, opts.separator)
            write_text(out, opts.separator.join(tags) + "\n")
            result.written += 1
            for t in tags:
                result.frequency[t] = result.frequency.get(t, 0) + 1
            logger.debug("%s: %s", path, ", ".join(tags))
        batch.clear()

    batch: list[tuple[Path, np.ndarray]] = []
    for path, arr, err in tqdm(prefetch(images, load, workers), total=len(images), desc="tagging", smoothing=0.0):
        if err is not None:
            logger.error("%s", err)
            result.failures.append((path, str(err)))
            continue
        batch.append((path, arr))
        if len(batch) >= batch_size:
            flush(batch)
    if batch:
        flush(batch)
    return result
