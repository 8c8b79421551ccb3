"""merge_captions_to_metadata.py, merge_dd_tags_to_metadata.py, clean_captions_and_tags.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune import clean_captions_and_tags, merge_captions_to_metadata, merge_dd_tags_to_metadata
from library.dataprep.clean_tags import clean_caption, clean_tags

ROOT = Path(__file__).resolve().parents[1]


def _folder(root: Path, name: str, stems: list[str]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for i, stem in enumerate(stems):
        Image.fromarray(np.full((8, 8, 3), i * 20, np.uint8)).save(d / f"{stem}.png")
        (d / f"{stem}.caption").write_text(f"a photo of {stem}\n", encoding="utf-8")
        (d / f"{stem}.txt").write_text(f"1girl, {stem}_tag, long_hair", encoding="utf-8")
    return d


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_guide_workflow_two_folders(tmp_path: Path, monkeypatch):
    """The guide's sequence: captions of two folders, then tags, with --full_path; nothing is lost."""
    d1 = _folder(tmp_path, "train_data1", ["a", "b"])
    d2 = _folder(tmp_path, "train_data2", ["c"])
    monkeypatch.chdir(tmp_path)
    merge_captions_to_metadata.main(["--full_path", "train_data1", "meta_cap1.json"])
    merge_captions_to_metadata.main(["--full_path", "--in_json", "meta_cap1.json", "train_data2", "meta_cap2.json"])
    merge_dd_tags_to_metadata.main(["--full_path", "--in_json", "meta_cap2.json", "train_data1", "meta_cap_dd1.json"])
    merge_dd_tags_to_metadata.main(["--full_path", "--in_json", "meta_cap_dd1.json", "train_data2",
                                    "meta_cap_dd2.json"])
    meta = _read(tmp_path / "meta_cap_dd2.json")
    keys = {str((d1 / "a.png").resolve()), str((d1 / "b.png").resolve()), str((d2 / "c.png").resolve())}
    assert set(meta) == keys
    a = meta[str((d1 / "a.png").resolve())]
    assert a == {"caption": "a photo of a", "tags": "1girl, a_tag, long_hair"}
    assert set(_read(tmp_path / "meta_cap1.json")) == {k for k in keys if "train_data1" in k}  # inputs unchanged


def test_without_in_json_updates_existing_output(tmp_path: Path):
    d = _folder(tmp_path, "imgs", ["a", "b"])
    out = tmp_path / "meta.json"
    out.write_text(json.dumps({"keep_me": {"caption": "old", "train_resolution": [512, 512]},
                               "a": {"tags": "x", "caption": "stale"}}), encoding="utf-8")
    (d / "b.caption").unlink()  # b has no caption: listed, not added, nothing crashes
    merge_captions_to_metadata.main([str(d), str(out)])
    meta = _read(out)
    assert meta["keep_me"] == {"caption": "old", "train_resolution": [512, 512]}
    assert meta["a"] == {"tags": "x", "caption": "a photo of a"}
    assert "b" not in meta


def test_recursive_needs_full_path_and_stem_clash(tmp_path: Path):
    d = _folder(tmp_path, "imgs", ["a"])
    with pytest.raises(SystemExit, match="--recursive requires --full_path"):
        merge_captions_to_metadata.main(["--recursive", str(d), str(tmp_path / "m.json")])
    Image.new("RGB", (4, 4)).save(d / "a.jpg")
    with pytest.raises(SystemExit, match="both have the metadata key 'a'"):
        merge_captions_to_metadata.main([str(d), str(tmp_path / "m.json")])
    assert not (tmp_path / "m.json").exists()


def test_recursive_full_path_and_bad_json(tmp_path: Path):
    d = _folder(tmp_path, "imgs", ["a"])
    _folder(d, "sub", ["z"])
    out = tmp_path / "m.json"
    merge_dd_tags_to_metadata.main(["--recursive", "--full_path", str(d), str(out)])
    assert sorted(Path(k).name for k in _read(out)) == ["a.png", "z.png"]
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SystemExit, match="bad.json: metadata must be a JSON object"):
        merge_dd_tags_to_metadata.main(["--in_json", str(bad), str(d), str(out)])


def test_clean_tag_rules():
    assert clean_tags("1girl, long_hair, ^_^, rating:safe, long_hair") == "1girl, long hair, ^_^"
    assert clean_tags("1girl, shirt, white_shirt, hair_ornament, star hair ornament") == \
        "1girl, white shirt, star hair ornament"
    # several people: two hair colours and two eye colours cannot be attributed -> dropped, one length kept
    assert clean_tags("2girls, blonde_hair, black_hair, long_hair, blue_eyes, red_eyes, closed_eyes, smile") == \
        "2girls, long hair, closed eyes, smile"
    # one person: colours stay
    assert clean_tags("1girl, blonde_hair, black_hair") == "1girl, blonde hair, black hair"


def test_clean_caption_rules():
    assert clean_caption("a young anime woman holding a ladybug") == "a girl holding a ladybug"
    assert clean_caption("two anime women and a person") == "two girls and a girl"
    assert clean_caption("a cartoon drawing of a female") == "a drawing of a girl"
    assert clean_caption("a girl girl girl") == "a girl"


def test_clean_script_keeps_entries(tmp_path: Path):
    src = tmp_path / "meta_cap_dd.json"
    src.write_text(json.dumps({"a": {"caption": "an anime girl", "tags": "1girl, rating:safe"},
                               "b": {"train_resolution": [512, 512]}}), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, str(ROOT / "finetune/clean_captions_and_tags.py"), "meta_cap_dd.json",
                    "meta_clean.json"], check=True, cwd=tmp_path, env=env)
    assert _read(tmp_path / "meta_clean.json") == {"a": {"caption": "a girl", "tags": "1girl"},
                                                   "b": {"train_resolution": [512, 512]}}
    assert _read(src)["a"]["tags"] == "1girl, rating:safe"
    with pytest.raises(SystemExit, match="missing.json: metadata file not found"):
        clean_captions_and_tags.main([str(tmp_path / "missing.json"), str(tmp_path / "o.json")])


def test_full_path_updates_entries_keyed_by_relative_path(tmp_path: Path, monkeypatch):
    """Metadata written by older tools keyed `train_data/a.png` (relative) is updated in place, not duplicated."""
    _folder(tmp_path, "train_data", ["a"])
    monkeypatch.chdir(tmp_path)
    Path("meta.json").write_text(json.dumps({"train_data/a.png": {"caption": "old"}}), encoding="utf-8")
    merge_dd_tags_to_metadata.main(["--full_path", "train_data", "meta.json"])
    assert _read(tmp_path / "meta.json") == {"train_data/a.png": {"caption": "old", "tags": "1girl, a_tag, long_hair"}}
