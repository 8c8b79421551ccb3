"""finetune/make_captions.py with a tiny random-weight BLIP built by the test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from finetune import make_captions
from tests.prep_models import BLIP_WORDS, write_tiny_blip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    return write_tiny_blip(tmp_path_factory.mktemp("blip"))


def _images(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour, size in (("a", (255, 0, 0), (50, 40)), ("b", (0, 0, 255), (30, 60)), ("c", (9, 200, 9), (64, 64))):
        Image.new("RGB", size, colour).save(folder / f"{name}.png")
    return folder


def _captions(folder: Path, ext: str = ".caption") -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(folder.glob(f"*{ext}"))}


def test_guide_example_writes_one_caption_per_image(tmp_path: Path, blip_dir: Path):
    """docs/make_captions.md's example, as a user runs it."""
    train = _images(tmp_path / "train_data")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(ROOT / "finetune/make_captions.py"), "--batch_size", "2",
                    "--caption_weights", str(blip_dir), "--max_length", "12", "train_data"],
                   check=True, cwd=tmp_path, env=env)
    caps = _captions(train)
    assert set(caps) == {"a", "b", "c"}
    for text in caps.values():
        assert text.endswith("\n") and "\n" not in text[:-1]
        words = text.split()
        assert words and not text.startswith("a picture of")  # prompt stripped
        assert set(words) <= set(BLIP_WORDS)


def test_seed_reproducible_beam_search_and_skip(tmp_path: Path, blip_dir: Path):
    train = _images(tmp_path / "t")
    args = [str(train), "--caption_weights", str(blip_dir), "--max_length", "12", "--seed", "7"]
    make_captions.main(args)
    first = _captions(train)
    (train / "a.caption").write_text("hand written\n", encoding="utf-8")
    make_captions.main(args)  # existing captions are kept
    assert _captions(train)["a"] == "hand written\n"
    make_captions.main(args + ["--overwrite"])
    assert _captions(train) == first  # same seed, same captions
    make_captions.main(args + ["--overwrite", "--beam_search", "--num_beams", "2", "--caption_extension", ".cap",
                               "--batch_size", "3"])
    beams = _captions(train, ".cap")
    make_captions.main(args + ["--overwrite", "--beam_search", "--num_beams", "2", "--caption_extension", ".cap",
                               "--seed", "99"])
    assert _captions(train, ".cap") == beams  # beam search does not depend on the seed


def test_recursive_and_corrupt_image(tmp_path: Path, blip_dir: Path, caplog):
    train = _images(tmp_path / "t")
    _images(train / "sub")
    (train / "bad.webp").write_bytes(b"RIFF0000WEBPjunk")
    make_captions.main([str(train), "--caption_weights", str(blip_dir), "--max_length", "8", "--recursive"])
    assert set(_captions(train / "sub")) == {"a", "b", "c"}
    assert "bad.webp" in caplog.text and not (train / "bad.caption").exists()


def test_clear_errors(tmp_path: Path):
    train = _images(tmp_path / "t")
    with pytest.raises(SystemExit, match="original BLIP .pth checkpoints are not supported"):
        make_captions.main([str(train), "--caption_weights", "https://x/model_large_caption.pth"])
    with pytest.raises(SystemExit, match="--min_length 9 must be between 0 and --max_length 5"):
        make_captions.main([str(train), "--min_length", "9", "--max_length", "5"])
    with pytest.raises(SystemExit, match=f"--caption_weights {tmp_path / 'nothing'}: cannot load"):
        make_captions.main([str(train), "--caption_weights", str(tmp_path / "nothing")])
