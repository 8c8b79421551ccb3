"""Small image folders for the training-data tests (PIL images written into pytest's tmp_path)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from library.dataset_config import add_dataset_arguments


def make_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), ext: str = ".png",
                captions: dict[int, str] | None = None, caption_ext: str = ".caption", seed: int = 0) -> list[Path]:
    """`count` random RGB images of `size` (w, h) named img0.. in `folder`, with optional caption files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i}{ext}"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    for i, text in (captions or {}).items():
        (folder / f"img{i}{caption_ext}").write_text(text, encoding="utf-8")
    return paths


def parse(*argv: str) -> argparse.Namespace:
    """The dataset options parsed like a training script would (plus --seed)."""
    parser = add_dataset_arguments(argparse.ArgumentParser())
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_train_steps", type=int, default=None)
    return parser.parse_args([str(a) for a in argv])


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
