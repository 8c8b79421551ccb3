"""Regenerate the bundled tiny dataset (deterministic): 64x64 PNGs of coloured shapes with captions.

    python examples/tiny_lora/make_images.py   # rewrites examples/tiny_lora/images/
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")


def draw(colour: tuple[int, int, int], shape: str, size: int = 64) -> Image.Image:
    y, x = np.mgrid[:size, :size]
    c = size / 2
    mask = (np.abs(x - c) < size * 0.3) & (np.abs(y - c) < size * 0.3) if shape == "square" else \
        (x - c) ** 2 + (y - c) ** 2 < (size * 0.32) ** 2
    img = np.full((size, size, 3), 245, np.uint8)
    img[mask] = colour
    return Image.fromarray(img)


def main() -> None:
    out = Path(__file__).resolve().parent / "images" / "4_sks shape"
    out.mkdir(parents=True, exist_ok=True)
    for name, colour in COLOURS.items():
        for shape in SHAPES:
            stem = f"{name}_{shape}"
            draw(colour, shape).save(out / f"{stem}.png", optimize=True)
            (out / f"{stem}.caption").write_text(f"sks, a {name} {shape}\n")


if __name__ == "__main__":
    main()
