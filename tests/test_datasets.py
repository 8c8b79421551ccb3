"""Datasets: epoch arithmetic, regularization balance, bucket batches, determinism, images and batches."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from library.datasets import build_dataset_group, make_data_loader
from library.images import SIZE_CACHE_NAME, ImageError, load_image, read_image_sizes
from library.sd_configs import make_clip_tokenizer
from tests.data_helpers import make_images, parse, write_toml


@pytest.fixture(scope="module")
def tok():
    return make_clip_tokenizer("clip")


def legacy(tmp_path, *argv, tokenizers=None, sdxl=False):
    return build_dataset_group(parse("--train_data_dir", tmp_path / "train", "--resolution", "64", *argv),
                               tokenizers, sdxl=sdxl)


def test_epoch_steps_with_repeats(tmp_path):
    make_images(tmp_path / "train" / "10_sls frog", 3)
    make_images(tmp_path / "train" / "5_cpc rabbit", 2)
    g = legacy(tmp_path, "--train_batch_size", "4")
    assert g.num_train_images == 3 * 10 + 2 * 5 and g.num_reg_images == 0
    assert len(g) == 10  # 40 samples / batch 4, one bucket
    seen = Counter(p for i in range(len(g)) for p in g[i]["image_paths"])
    assert sorted(seen.values()) == [5, 5, 10, 10, 10]
    assert "batches (steps) per epoch: 10" in g.describe(log=False)


def test_reg_images_extra_unused(tmp_path):
    make_images(tmp_path / "train" / "2_sls frog", 3)
    make_images(tmp_path / "reg" / "1_frog", 10)
    g = legacy(tmp_path, "--reg_data_dir", tmp_path / "reg", "--prior_loss_weight", "0.5")
    assert (g.num_train_images, g.num_reg_images, len(g)) == (6, 6, 12)  # 6 of 10 reg images used
    weights = {}
    for i in range(len(g)):
        b = g[i]
        for path, w in zip(b["image_paths"], b["loss_weights"].tolist()):
            weights[path] = w
    assert sorted(set(weights.values())) == [0.5, 1.0]
    assert sum(1 for p, w in weights.items() if w == 0.5) == 6
    assert "6 of 10 images used" in g.describe(log=False)


def test_reg_images_fewer_are_repeated(tmp_path):
    make_images(tmp_path / "train" / "7_sls frog", 1)  # 7 training samples
    make_images(tmp_path / "reg" / "2_frog", 3)
    g = legacy(tmp_path, "--reg_data_dir", tmp_path / "reg")
    # first pass: each reg image counts its 2 repeats (2, 4, 6); second pass adds one repeat to img0 -> 7
    reg = [i for i in g.images if i.is_reg]
    assert [i.num_repeats for i in reg] == [3, 2, 2]
    assert g.num_reg_images == 7 and len(g) == 14


def test_bucket_splitting_adds_steps(tmp_path):
    make_images(tmp_path / "train" / "1_sq", 3, size=(100, 100))
    make_images(tmp_path / "train" / "1_wide", 5, size=(320, 100), seed=1)
    g = legacy(tmp_path, "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso",
               "256", "--train_batch_size", "2")
    # buckets of 128x128 area, steps 64: 64x192, 64x256, 128x128, 192x64, 256x64; 320x100 (3.2) -> 192x64
    assert sorted(g.datasets[0].buckets) == [(128, 128), (192, 64)]
    assert len(g) == 2 + 3  # ceil(3/2) + ceil(5/2), not ceil(8/2)
    shapes = Counter(tuple(g[i]["images"].shape) for i in range(len(g)))
    assert shapes == {(2, 3, 128, 128): 1, (1, 3, 128, 128): 1, (2, 3, 64, 192): 2, (1, 3, 64, 192): 1}


def test_sdxl_size_conditioning(tmp_path):
    make_images(tmp_path / "train" / "1_wide", 1, size=(320, 100))
    g = legacy(tmp_path, "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso",
               "256", "--bucket_reso_steps", "64", sdxl=True)
    b = g[0]
    # 320x100 -> bucket 192x64, resized to int(320 * 0.64 + .5) = 205 x 64, centre crop left (205 - 192) // 2 = 6
    assert b["original_sizes_hw"].tolist() == [[100, 320]]
    assert b["target_sizes_hw"].tolist() == [[64, 192]]
    assert b["crop_top_lefts"].tolist() == [[0, 6]]
    g2 = legacy(tmp_path, "--resolution", "128", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso",
                "256", "--flip_aug", sdxl=True)
    lefts = {tuple(g2.make_batch(g2.datasets[0], [0], np.random.default_rng(s))["crop_top_lefts"][0].tolist())
             for s in range(12)}
    assert lefts == {(0, 6), (0, 7)}  # flipped: 205 - 192 - 6


def test_fixed_resolution_and_pixel_range(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    half = np.zeros((80, 100, 3), np.uint8)
    half[:, 50:] = 255
    Image.fromarray(half).save(folder / "half.png")
    g = legacy(tmp_path)
    x = g[0]["images"]
    # 100x80 covers 64x64 at 80x64, centre crop left 8: columns 0..31 black, 32.. white (one blended column)
    assert x.shape == (1, 3, 64, 64) and x[0, :, :, :31].max() == -1 and x[0, :, :, 33:].min() == 1
    with pytest.raises(ValueError, match="resolution 96x96: width and height must be multiples of 64"):
        legacy(tmp_path, "--resolution", "96")


def test_order_depends_only_on_seed_and_epoch(tmp_path, tok):
    make_images(tmp_path / "train" / "3_a", 4, captions={i: f"t{i}, x, y, z" for i in range(4)})
    args = ("--train_batch_size", "2", "--shuffle_caption", "--seed", "7")
    g1, g2 = legacy(tmp_path, *args, tokenizers=[tok]), legacy(tmp_path, *args, tokenizers=[tok])
    assert g1.epoch_batches(1) == g2.epoch_batches(1) and g1.epoch_batches(3) == g2.epoch_batches(3)
    assert g1.epoch_batches(1) != g1.epoch_batches(2)
    g1.set_epoch(3)
    g2.set_epoch(3)
    assert [g1[i]["captions"] for i in range(len(g1))] == [g2[i]["captions"] for i in range(len(g2))]
    assert len({tuple(g1[i]["captions"]) for i in range(len(g1))}) > 1
    g3 = legacy(tmp_path, "--train_batch_size", "2", "--seed", "8")
    assert g3.epoch_batches(1) != g1.epoch_batches(1)
    with pytest.raises(ValueError, match="epochs count from 1"):
        g1.set_epoch(0)


def test_loader_skip_and_shared_epoch_with_worker(tmp_path):
    make_images(tmp_path / "train" / "3_a", 4)
    g = legacy(tmp_path, "--train_batch_size", "2")
    g.set_epoch(2)
    expected = [g[i]["image_paths"] for i in range(len(g))]
    assert [b["image_paths"] for b in make_data_loader(g, skip_batches=4)] == expected[4:]
    loader = make_data_loader(g, n_workers=1, persistent=True)
    g.set_epoch(1)
    first = [b["image_paths"] for b in loader]
    g.set_epoch(2)
    assert [b["image_paths"] for b in loader] == expected  # the worker sees the new epoch
    assert first == [g.epoch_batches(1) and g.make_batch(g.datasets[0], m, np.random.default_rng(0))["image_paths"]
                     for _, m in g.epoch_batches(1)]


def test_captions_files_fallback_and_tokens(tmp_path, tok):
    make_images(tmp_path / "train" / "2_sls frog", 2, captions={0: "a green frog\n"}, caption_ext=".txt")
    g = legacy(tmp_path, "--caption_extension", ".txt", "--max_token_length", "150", tokenizers=[tok, tok])
    caps = {c for i in range(len(g)) for c in g[i]["captions"]}
    assert caps == {"a green frog", "sls frog"}
    b = g[0]
    assert len(b["input_ids"]) == 2 and b["input_ids"][0].shape == (1, 154)
    assert "input_weights" not in b


def test_weighted_captions_give_weights(tmp_path, tok):
    make_images(tmp_path / "train" / "1_(sls:1.5) frog", 1)
    g = legacy(tmp_path, "--weighted_captions", tokenizers=[tok])
    b = g[0]
    assert b["captions"] == ["(sls:1.5) frog"]
    assert b["input_weights"][0][0, 1:4].tolist() == [1.5, 1.5, 1.5] and b["input_weights"][0][0, 5].item() == 1.0


def test_token_warmup_follows_current_step(tmp_path):
    make_images(tmp_path / "train" / "1_x", 1, captions={0: "a, b, c, d, e"})
    g = legacy(tmp_path, "--token_warmup_step", "4", "--token_warmup_min", "1")
    assert g[0]["captions"] == ["a"]
    g.set_current_step(2)  # floor(2 * 4 / 4) + 1 = 3 tags
    assert g[0]["captions"] == ["a, b, c"]


def test_fine_tuning_metadata(tmp_path):
    make_images(tmp_path / "ft", 2, size=(128, 64))
    meta = {"img0": {"caption": "a frog", "tags": "green, pond"}, str(tmp_path / "ft" / "img1.png"): {"tags": "x, y"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    toml = write_toml(tmp_path / "ft.toml", f"""
[general]
shuffle_caption = false
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '{tmp_path / "ft"}'
  metadata_file = '{tmp_path / "meta.json"}'
""")
    g = build_dataset_group(parse("--dataset_config", toml), None)
    assert {c for i in range(len(g)) for c in g[i]["captions"]} == {"a frog, green, pond", "x, y"}
    meta["img0"]["train_resolution"] = [128, 64]
    meta[str(tmp_path / "ft" / "img1.png")]["train_resolution"] = [128, 64]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    g = build_dataset_group(parse("--dataset_config", toml), None)
    assert list(g.datasets[0].buckets) == [(128, 64)] and g[0]["images"].shape[-2:] == (64, 128)
    meta["missing"] = {"caption": "?"}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError, match="image 'missing' not found"):
        build_dataset_group(parse("--dataset_config", toml), None)


def test_corrupt_images_fail_at_build_naming_the_file(tmp_path):
    make_images(tmp_path / "train" / "1_x", 1)
    bad = tmp_path / "train" / "1_x" / "broken.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="broken.png: cannot read image"):
        legacy(tmp_path)
    good = (tmp_path / "train" / "1_x" / "img0.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])  # truncated: the header is fine, the pixels are not
    with pytest.raises(ImageError, match="broken.png: cannot read image"):
        legacy(tmp_path)


def test_image_formats(tmp_path):
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.PNG")
    out = load_image(tmp_path / "t.PNG")
    assert out.shape == (4, 6, 3) and out[0, 0].tolist() == [200, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
    gray16 = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png")[0, :, 0].tolist() == [0, 128, 255]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").tolist() == [[[255, 255, 255], [40, 50, 60]]]
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (30, 10, 3)
    assert read_image_sizes([str(tmp_path / "r.jpg")]) == [(10, 30)]  # bucketing sees the upright size
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg")
    data = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: cannot read image .*truncated"):
        read_image_sizes([str(tmp_path / "cut.jpg")])
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "b.bmp")
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "w.webp")
    assert load_image(tmp_path / "b.bmp").shape == load_image(tmp_path / "w.webp").shape == (5, 5, 3)


def test_alpha_mask_batches(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    rgba = np.full((64, 64, 4), 255, np.uint8)
    rgba[:, :32, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    g = legacy(tmp_path, "--alpha_mask")
    m = g[0]["alpha_masks"]
    assert m.shape == (1, 64, 64) and torch.allclose(m[0, :, :32].mean(), torch.tensor(0.0)) and m[0, :, 40:].min() == 1


def test_face_crop_centres_the_face(tmp_path):
    folder = tmp_path / "train" / "1_x"
    folder.mkdir(parents=True)
    ramp = np.zeros((200, 200, 3), np.uint8)
    ramp[..., 0] = (np.arange(200) * 255 // 199)[None, :]  # red = x
    ramp[..., 1] = (np.arange(200) * 255 // 199)[:, None]  # green = y
    Image.fromarray(ramp).save(folder / "face_100_60_40_40.png")
    (folder / "face.caption").write_text("a face")  # caption of the name without the face numbers
    g = legacy(tmp_path, "--face_crop_aug_range", "2.0,2.0")
    b = g[0]
    assert b["captions"] == ["a face"]
    img = ((b["images"][0].permute(1, 2, 0) + 1) * 127.5).numpy()
    # face 40 px, short side 64: scale 64 / (40 * 2) = 0.8 -> 160x160, face centre (80, 48);
    # crop left 80 - 32 = 48, top 48 - 32 = 16 (scaled), i.e. original x 60..140, y 20..100
    assert abs(img[0, 0, 0] - 60 * 255 / 199) < 4 and abs(img[0, 0, 1] - 20 * 255 / 199) < 4
    assert abs(img[63, 63, 0] - 139 * 255 / 199) < 4 and abs(img[63, 63, 1] - 99 * 255 / 199) < 4


def test_several_datasets_add_their_steps(tmp_path):
    make_images(tmp_path / "a", 3)
    make_images(tmp_path / "b", 4, size=(128, 128))
    toml = write_toml(tmp_path / "two.toml", f"""
[[datasets]]
resolution = 64
batch_size = 2
  [[datasets.subsets]]
  image_dir = '{tmp_path / "a"}'
  num_repeats = 3
[[datasets]]
resolution = 128
batch_size = 4
  [[datasets.subsets]]
  image_dir = '{tmp_path / "b"}'
""")
    g = build_dataset_group(parse("--dataset_config", toml), None)
    assert len(g) == 5 + 1  # ceil(9 / 2) + ceil(4 / 4)
    sizes = Counter(tuple(g[i]["images"].shape) for i in range(len(g)))
    assert sizes == {(2, 3, 64, 64): 4, (1, 3, 64, 64): 1, (4, 3, 128, 128): 1}


def test_cache_info_skips_checked_images(tmp_path, monkeypatch):
    from library import datasets

    make_images(tmp_path / "imgs", 3, size=(64, 32))
    toml = write_toml(tmp_path / "c.toml", f"[[datasets]]\nresolution = 64\nenable_bucket = true\n"
                                          f"min_bucket_reso = 64\nmax_bucket_reso = 128\n[[datasets.subsets]]\n"
                                          f"image_dir = '{tmp_path / 'imgs'}'\ncache_info = true\n")
    g = build_dataset_group(parse("--dataset_config", toml), None)
    assert (tmp_path / "imgs" / SIZE_CACHE_NAME).is_file()
    decoded: list[list[str]] = []
    real = datasets.read_image_sizes
    monkeypatch.setattr(datasets, "read_image_sizes", lambda paths: decoded.append(list(paths)) or real(paths))
    g2 = build_dataset_group(parse("--dataset_config", toml), None)
    assert decoded == [[]] and [i.size for i in g2.images] == [i.size for i in g.images] == [(64, 32)] * 3
    make_images(tmp_path / "imgs", 1, size=(32, 64), seed=5)  # img0 rewritten: decoded again
    g3 = build_dataset_group(parse("--dataset_config", toml), None)
    assert [p.rsplit("/", 1)[1] for p in decoded[-1]] == ["img0.png"] and g3.images[0].size == (32, 64)
