"""finetune/tag_images_by_wd14_tagger.py with a tiny ONNX tagger built by the test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import tag_images_by_wd14_tagger as script
from library.dataprep.wd14_tagger import TagOptions, read_tag_table, select_tags
from tests.prep_models import write_tiny_tagger

ROOT = Path(__file__).resolve().parents[1]
RGB = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def _images(folder: Path, sizes=((80, 40), (30, 60), (64, 64))) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for (name, colour), size in zip(RGB.items(), sizes):
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    return folder


def test_guide_example_writes_tag_files(tmp_path: Path):
    """docs/tag_images_by_wd14_tagger.md's example: model from --model_dir, one .txt per image."""
    train = _images(tmp_path / "train_data")
    write_tiny_tagger(tmp_path / "wd14_tagger_model" / "SmilingWolf_wd-v1-4-convnext-tagger-v2")
    before = {p.name: p.read_bytes() for p in train.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "finetune/tag_images_by_wd14_tagger.py"), "--batch_size", "2",
                    "--onnx", "--remove_underscore", "train_data"], check=True, cwd=tmp_path, env=env)
    assert (train / "red.txt").read_text(encoding="utf-8") == "red theme, ^_^, 1girl\n"
    assert (train / "green.txt").read_text(encoding="utf-8") == "green theme, ^_^, 1girl\n"
    assert (train / "blue.txt").read_text(encoding="utf-8") == "blue theme, ^_^, 1girl\n"
    assert {p.name: p.read_bytes() for p in train.iterdir() if p.suffix == ".png"} == before


def test_thresholds_undesired_rating_and_recursive(tmp_path: Path):
    train = _images(tmp_path / "t")
    _images(train / "sub", sizes=((20, 20),))
    model = write_tiny_tagger(tmp_path / "m")
    script.main([str(train), "--model_dir", str(model), "--recursive", "--caption_extension", ".tags",
                 "--undesired_tags", "1girl", "--use_rating_tags", "--character_threshold", "0.001",
                 "--general_threshold", "0.5"])
    assert (train / "sub" / "red.tags").read_text(encoding="utf-8") == \
        "sensitive, red_theme, ^_^, hatsune_miku\n"
    # a high general threshold keeps only the near-certain tags
    script.main([str(train), "--model_dir", str(model), "--thresh", "0.99"])
    assert (train / "red.txt").read_text(encoding="utf-8") == "^_^, 1girl\n"  # red_theme is 0.98


def test_append_tags_and_fixed_batch_model(tmp_path: Path):
    train = _images(tmp_path / "t")
    (train / "red.txt").write_text("my tag, 1girl\n", encoding="utf-8")
    model = write_tiny_tagger(tmp_path / "m", fixed_batch=2)
    script.main([str(train), "--model_dir", str(model), "--append_tags", "--batch_size", "3"])
    assert (train / "red.txt").read_text(encoding="utf-8") == "my tag, 1girl, red_theme, ^_^\n"
    assert (train / "blue.txt").read_text(encoding="utf-8") == "blue_theme, ^_^, 1girl\n"


def test_corrupt_image_named(tmp_path: Path, caplog):
    train = _images(tmp_path / "t")
    (train / "broken.jpg").write_bytes(b"not a jpeg")
    script.main([str(train), "--model_dir", str(write_tiny_tagger(tmp_path / "m"))])
    assert "broken.jpg" in caplog.text and not (train / "broken.txt").exists()
    assert (train / "red.txt").exists()


def test_offline_download_error_is_clear(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = _images(tmp_path / "t")
    with pytest.raises(SystemExit, match=r"cannot download selected_tags.csv of SmilingWolf/wd-v1-4-convnext-tagger-v2"
                                         r" into .*SmilingWolf_wd-v1-4-convnext-tagger-v2"):
        script.main([str(train), "--model_dir", str(tmp_path / "models")])


def test_mismatched_csv_and_bad_threshold(tmp_path: Path):
    train = _images(tmp_path / "t")
    model = write_tiny_tagger(tmp_path / "m")
    with pytest.raises(SystemExit, match="--thresh 1.5 must be between 0 and 1"):
        script.main([str(train), "--model_dir", str(model), "--thresh", "1.5"])
    csv = model / "selected_tags.csv"
    csv.write_text("\n".join(csv.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(SystemExit, match="predicts 10 tags but selected_tags.csv lists 9"):
        script.main([str(train), "--model_dir", str(model)])


def test_select_tags_order_options(tmp_path: Path):
    table = read_tag_table(write_tiny_tagger(tmp_path / "m") / "selected_tags.csv")
    probs = np.array([0.1, 0.9, 0.0, 0.0, 0.9, 0.0, 0.0, 0.9, 0.9, 0.9])
    opts = TagOptions(character_tags_first=True, use_rating_tags_as_last_tag=True, always_first_tags=["1girl"],
                      remove_underscore=True)
    assert select_tags(probs, table, opts) == ["1girl", "hatsune miku", "red theme", "^_^", "sensitive"]


def test_preprocess_matches_pad_then_resize():
    """Resizing before padding (faster) gives the tagger the same picture as kohya's pad-then-resize."""
    import cv2

    from library.dataprep.wd14_tagger import preprocess

    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8), (0, 0), 3)
    pad = (500 - 300) // 2
    square = np.pad(image[:, :, ::-1], ((pad, 500 - 300 - pad), (0, 0), (0, 0)), constant_values=255)
    reference = cv2.resize(square, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
    got = preprocess(image, 64)
    assert got.shape == (64, 64, 3) and got.dtype == np.float32
    assert np.abs(got - reference).mean() < 3.0
    assert (got[0] == 255).all() and (got[-1] == 255).all()  # white bars above and below
