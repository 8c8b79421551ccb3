"""tools/resize_images_to_resolution.py: names, sizes, no upscaling, divisible_by, associated files, corrupt files."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from library.dataprep.resize_images import Resolution, parse_resolutions, target_size
from tools.resize_images_to_resolution import main

ROOT = Path(__file__).resolve().parents[1]


def _image(path: Path, w: int, h: int, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(w * 31 + h)
    channels = 4 if mode == "RGBA" else 3
    Image.fromarray(rng.integers(0, 255, (h, w, channels), dtype=np.uint8), mode).save(path)
    return path


@pytest.fixture
def src(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    _image(d / "wide.png", 1024, 512)
    _image(d / "small.jpg", 200, 150)
    (d / "wide.txt").write_text("a wide picture", encoding="utf-8")
    (d / "wide.caption").write_text("caption", encoding="utf-8")
    (d / "notes.md").write_text("not an image", encoding="utf-8")
    return d


def test_target_size_area_and_no_upscale():
    res = Resolution("512x512", 512, 512)
    w, h, scaled = target_size(1024, 512, res)
    assert scaled and w * h <= 512 * 512 and abs(w / h - 2) < 0.01 and (w, h) == (724, 362)
    assert target_size(200, 150, res) == (200, 150, False)
    assert target_size(200, 150, res, divisible_by=64) == (192, 128, False)


def test_parse_resolutions_errors():
    assert [r.label for r in parse_resolutions("512x512, 384x256")] == ["512x512", "384x256"]
    with pytest.raises(ValueError, match="'512' is not WIDTHxHEIGHT"):
        parse_resolutions("512")


def test_guide_example(src: Path, tmp_path: Path):
    """The worked example of docs/resize_images_to_resolution.md, run as a user would."""
    dst = tmp_path / "dst"
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "tools/resize_images_to_resolution.py"),
                    "--max_resolution", "512x512,384x384,256x256", "--save_as_png", "--copy_associated_files",
                    str(src), str(dst)], check=True, env=env, cwd=tmp_path)
    names = sorted(p.name for p in dst.iterdir())
    expected = {"wide.png", "small.jpg", "wide.txt", "wide.caption", "notes.md"}
    for res in ("512x512", "384x384", "256x256"):
        expected |= {f"wide+{res}.png", f"small+{res}.png", f"wide+{res}.txt", f"wide+{res}.caption"}
    assert set(names) == expected
    # originals copied byte for byte, sources untouched
    assert (dst / "wide.png").read_bytes() == before["wide.png"]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    assert (dst / "wide+384x384.txt").read_text(encoding="utf-8") == "a wide picture"
    for res, side in (("512x512", 512), ("384x384", 384), ("256x256", 256)):
        w, h = Image.open(dst / f"wide+{res}.png").size
        assert w * h <= side * side and w * h > 0.98 * side * side and abs(w / h - 2) < 0.02
        # smaller than every target: never upscaled
        assert Image.open(dst / f"small+{res}.png").size == (200, 150)


def test_jpeg_divisible_crop_and_alpha(tmp_path: Path):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "a.png", 700, 300, "RGBA")
    assert main([str(src), str(tmp_path / "out"), "--max_resolution", "256x256", "--divisible_by", "64",
                 "--interpolation", "lanczos4"]) == 0
    out = Image.open(tmp_path / "out" / "a+256x256.jpg")
    assert out.format == "JPEG" and out.mode == "RGB"
    w, h = out.size
    assert w % 64 == 0 and h % 64 == 0 and (w, h) == (384, 128)


def test_corrupt_image_named_and_skipped(tmp_path: Path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    _image(src / "good.png", 600, 600)
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    main([str(src), str(tmp_path / "out"), "--max_resolution", "256x256"])
    assert (tmp_path / "out" / "good+256x256.jpg").exists()
    assert not (tmp_path / "out" / "broken+256x256.jpg").exists()
    assert "broken.png" in caplog.text


def test_refuses_source_as_destination(src: Path):
    with pytest.raises(SystemExit, match="is the source folder"):
        main([str(src), str(src)])


def test_bad_resolution_is_one_line_error(src: Path, tmp_path: Path):
    with pytest.raises(SystemExit, match="--max_resolution: 'big' is not"):
        main([str(src), str(tmp_path / "o"), "--max_resolution", "big"])
    assert not (tmp_path / "o").exists()
