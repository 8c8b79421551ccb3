"""finetune/prepare_buckets_latents.py: buckets in the metadata, .npz caches that the training dataset reuses."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import prepare_buckets_latents as script
from library import latent_cache
from library.dataset_config import add_dataset_arguments
from library.datasets import build_dataset_group
from library.model_loading import load_vae

SIZES = {"wide": (90, 40), "tall": (40, 80), "square": (70, 70), "small": (30, 20)}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny SD1 single-file checkpoint, like the model.ckpt of the guide."""
    from tools.make_tiny_model import make_model

    out = tmp_path_factory.mktemp("model") / "model.safetensors"
    make_model("sd1", "tiny", "ldm", out)  # also writes model_tokenizers/ beside it
    return out


@pytest.fixture
def data(tmp_path: Path, request) -> tuple[Path, Path]:
    train = tmp_path / "train_data"
    train.mkdir()
    rng = np.random.default_rng(0)
    meta = {}
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(train / f"{name}.png")
        meta[str((train / f"{name}.png").resolve())] = {"caption": f"a {name} picture", "tags": "tag"}
    if getattr(request, "param", True):
        meta["/elsewhere/other.png"] = {"caption": "kept"}
    path = tmp_path / "meta_clean.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return train, path


def _run(train: Path, in_json: Path, out_json: Path, model: Path, *extra: str):
    return script.run(script.setup_parser().parse_args(
        ["--full_path", str(train), str(in_json), str(out_json), str(model), "--batch_size", "2",
         "--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps",
         "32", "--mixed_precision", "no", *extra]))


def test_guide_example_as_command(data, model: Path, tmp_path: Path, monkeypatch, capsys):
    """docs/prepare_buckets_latents.md's example (with a tiny model), as a user types it: bucket table printed."""
    train, in_json = data
    monkeypatch.chdir(tmp_path)
    script.main(["--full_path", "train_data", "meta_clean.json", "meta_lat.json", str(model), "--batch_size", "4",
                 "--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
                 "--bucket_reso_steps", "32", "--mixed_precision", "no"])
    printed = capsys.readouterr().out
    assert "bucket 0 (32, 96): 1\nbucket 1 (64, 64): 2\nbucket 2 (96, 32): 1\n" in printed
    assert "mean ar error:" in printed
    meta = json.loads((tmp_path / "meta_lat.json").read_text(encoding="utf-8"))
    assert meta["/elsewhere/other.png"] == {"caption": "kept"}  # entries of other folders kept
    wide = meta[str((train / "wide.png").resolve())]
    assert wide == {"caption": "a wide picture", "tags": "tag", "train_resolution": [96, 32]}
    assert sorted(p.name for p in train.glob("*.npz")) == ["small.npz", "square.npz", "tall.npz", "wide.npz"]


@pytest.mark.parametrize("data", [False], indirect=True)  # training needs every metadata image to exist
def test_caches_reused_by_training_dataset(data, model: Path, tmp_path: Path, monkeypatch):
    train, in_json = data
    out_json = tmp_path / "meta_lat.json"
    result = _run(train, in_json, out_json, model, "--flip_aug")
    assert result.encoded == 4 and not result.failures
    meta = json.loads(out_json.read_text(encoding="utf-8"))
    for name in SIZES:
        w, h = meta[str((train / f"{name}.png").resolve())]["train_resolution"]
        with np.load(train / f"{name}.npz") as npz:
            assert npz["latents"].shape == (4, h // 8, w // 8) and npz["latents_flipped"].shape == (4, h // 8, w // 8)
            assert tuple(npz["bucket_reso"].tolist()) == (w, h)
    # the training dataset (fine tuning with --in_json) reads the buckets and reuses every cache: no encoding
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    args = parser.parse_args(["--in_json", str(out_json), "--train_data_dir", str(train), "--cache_latents_to_disk",
                              "--flip_aug", "--train_batch_size", "1"])
    args.seed = 0
    group = build_dataset_group(args, None)

    def no_encoding(*a, **k):
        raise AssertionError("latents were encoded again")

    monkeypatch.setattr(latent_cache, "encode_images", no_encoding)
    vae = load_vae(model)
    group.cache_latents(vae, cache_to_disk=True)
    infos = group.images
    assert {Path(i.path).name for i in infos} == {f"{n}.png" for n in SIZES}
    for info in infos:
        assert info.npz_path == latent_cache.npz_path(info.path)
        w, h = meta[str(Path(info.path).resolve())]["train_resolution"]
        assert info.bucket_reso == (w, h)
    batch = group[0]
    assert batch["latents"].shape[1] == 4


def test_skip_existing_and_no_upscale(data, model: Path, tmp_path: Path):
    train, in_json = data
    out = tmp_path / "m.json"
    _run(train, in_json, out, model)
    stamp = {p.name: p.stat().st_mtime_ns for p in train.glob("*.npz")}
    again = _run(train, in_json, out, model, "--skip_existing")
    assert again.encoded == 0 and again.skipped_valid == 4
    assert {p.name: p.stat().st_mtime_ns for p in train.glob("*.npz")} == stamp
    flip = _run(train, in_json, out, model, "--skip_existing", "--flip_aug")  # caches lack the flipped latents
    assert flip.encoded == 4
    no_up = _run(train, in_json, out, model, "--bucket_no_upscale")
    # 30x20 is smaller than one 32-pixel step: named and skipped; the others get buckets inside their own size
    assert [(p.name, "smaller than one bucket step" in why) for p, why in no_up.failures] == [("small.png", True)]
    meta = json.loads(out.read_text(encoding="utf-8"))
    assert meta[str((train / "wide.png").resolve())]["train_resolution"] == [64, 32]
    assert meta[str((train / "square.png").resolve())]["train_resolution"] == [64, 64]


def test_errors_before_model_load(data, model: Path, tmp_path: Path):
    train, in_json = data
    with pytest.raises(SystemExit, match="--max_resolution '512x512': expected 'width,height'"):
        script.main([str(train), str(in_json), str(tmp_path / "o.json"), str(model), "--max_resolution", "512x512"])
    with pytest.raises(SystemExit, match="missing.json: metadata file not found"):
        script.main([str(train), str(tmp_path / "missing.json"), str(tmp_path / "o.json"), str(model)])
    with pytest.raises(SystemExit, match="nomodel.ckpt: no such model file or folder"):
        script.main([str(train), str(in_json), str(tmp_path / "o.json"), str(tmp_path / "nomodel.ckpt")])
    with pytest.raises(SystemExit, match="--recursive requires --full_path"):
        script.main([str(train), str(in_json), str(tmp_path / "o.json"), str(model), "--recursive"])


def test_corrupt_image_named(data, model: Path, tmp_path: Path, caplog):
    train, in_json = data
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = _run(train, in_json, tmp_path / "o.json", model)
    assert [p.name for p, _ in result.failures] == ["broken.png"] and "broken.png" in caplog.text
    assert result.encoded == 4 and not (train / "broken.npz").exists()


@pytest.mark.parametrize("data", [False], indirect=True)
def test_train_network_uses_prepared_caches(data, model: Path, tmp_path: Path, monkeypatch):
    """The issue's check: train_network.py --in_json with the prepared metadata trains without encoding again."""
    from library.network_trainer import main as train_main

    train, in_json = data
    out_json = tmp_path / "meta_lat.json"
    _run(train, in_json, out_json, model)

    def no_encoding(*a, **k):
        raise AssertionError("latents were encoded again")

    monkeypatch.setattr(latent_cache, "encode_images", no_encoding)
    loads = []
    real_load = latent_cache.load_cached_latents
    monkeypatch.setattr(latent_cache, "load_cached_latents", lambda info, flip: loads.append(info.npz_path)
                        or real_load(info, flip))
    out = tmp_path / "out"
    train_main(["--pretrained_model_name_or_path", str(model), "--in_json", str(out_json), "--train_data_dir",
                str(train), "--cache_latents", "--cache_latents_to_disk", "--output_dir", str(out), "--output_name", "lora",
                "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2",
                "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0",
                "--tokenizer_cache_dir", str(model.with_name("model_tokenizers")), "--resolution", "64,64"])
    assert (out / "lora.safetensors").is_file()
    assert loads and all(p is not None and p.endswith(".npz") and Path(p).parent == train for p in loads)
