"""Latent caching: memory and disk, reuse, invalidation, flip variant, refusals, interruption."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from library import latent_cache
from library.datasets import build_dataset_group
from tests.data_helpers import make_images, parse


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    from library.sd_configs import arch_config

    torch.manual_seed(seed)
    return AutoencoderKL(**arch_config("sd1").vae).eval()


@pytest.fixture(scope="module")
def vae():
    return tiny_vae()


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts the images it encodes (optionally failing at a given call)."""

    def __init__(self, vae, fail_at: int | None = None):
        super().__init__()
        self.vae, self.encoded, self.calls, self.fail_at = vae, 0, 0, fail_at
        self.encoder, self.config = vae.encoder, vae.config

    def encode(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.encoded += x.shape[0]
        return self.vae.encode(x)


def group(tmp_path, *argv):
    return build_dataset_group(parse("--train_data_dir", tmp_path / "train", "--resolution", "64", *argv), None)


def test_disk_cache_reused_and_invalidated(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 3, size=(80, 64))
    g = group(tmp_path)
    v = CountingVAE(vae)
    g.cache_latents(v, vae_batch_size=2, cache_to_disk=True, progress=False)
    assert v.encoded == 3
    npz = sorted(p for p in os.listdir(tmp_path / "train" / "1_x") if p.endswith(".npz"))
    assert npz == ["img0.npz", "img1.npz", "img2.npz"]
    with np.load(tmp_path / "train" / "1_x" / "img0.npz") as f:
        assert f["latents"].shape == (4, 8, 8) and f["bucket_reso"].tolist() == [64, 64]
        assert f["crop_top_left"].tolist() == [0, 8] and f["original_size_hw"].tolist() == [64, 80]
    b = g[0]
    assert "latents" in b and "images" not in b and b["latents"].shape == (1, 4, 8, 8)
    assert b["crop_top_lefts"].tolist() == [[0, 8]]

    v2 = CountingVAE(vae)  # a second run (or another script) reuses every file
    group(tmp_path).cache_latents(v2, cache_to_disk=True, progress=False)
    assert v2.encoded == 0

    v3 = CountingVAE(vae)  # another bucket size: every file is stale
    group(tmp_path, "--resolution", "128").cache_latents(v3, cache_to_disk=True, progress=False)
    assert v3.encoded == 3
    with np.load(tmp_path / "train" / "1_x" / "img0.npz") as f:
        assert f["latents"].shape == (4, 16, 16)

    v4 = CountingVAE(vae)  # flip_aug needs the flipped latents: recomputed once, with both stored
    g4 = group(tmp_path, "--resolution", "128", "--flip_aug")
    g4.cache_latents(v4, cache_to_disk=True, progress=False)
    assert v4.encoded == 6
    with np.load(tmp_path / "train" / "1_x" / "img0.npz") as f:
        assert f["latents_flipped"].shape == (4, 16, 16)
        assert not np.allclose(f["latents"], f["latents_flipped"])
    v5 = CountingVAE(vae)  # without flip_aug the richer file is still valid
    group(tmp_path, "--resolution", "128").cache_latents(v5, cache_to_disk=True, progress=False)
    assert v5.encoded == 0


def test_other_vae_invalidates(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 1)
    group(tmp_path).cache_latents(vae, cache_to_disk=True, progress=False)
    other = tiny_vae(seed=1)
    v = CountingVAE(other)
    group(tmp_path).cache_latents(v, cache_to_disk=True, progress=False)
    assert v.encoded == 1


def test_memory_cache_and_flip_variant(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 2)
    g = group(tmp_path, "--flip_aug")
    g.cache_latents(vae, vae_batch_size=4, cache_to_disk=False, progress=False)
    assert not any(p.endswith(".npz") for p in os.listdir(tmp_path / "train" / "1_x"))
    info = g.images[0]
    seen = set()
    for seed in range(10):
        b = g.make_batch(g.datasets[0], [0], np.random.default_rng(seed))
        expected = info.latents_flipped if b["flipped"][0] else info.latents
        assert torch.allclose(b["latents"][0], expected)  # unscaled: the trainer alone scales
        seen.add(b["flipped"][0])
    assert seen == {True, False}


def test_cached_latents_match_direct_encoding(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 1)
    g = group(tmp_path)
    image = g[0]["images"]
    g.cache_latents(vae, cache_to_disk=False, progress=False)
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    z = (g[0]["latents"] - dist.mean) / dist.std  # batches hold unscaled latents, as the VAE gives them  # a sample of this image's latent distribution
    assert z.shape == (1, 4, 8, 8) and abs(z.mean().item()) < 0.3 and 0.7 < z.std().item() < 1.3
    again = group(tmp_path)
    again.cache_latents(vae, cache_to_disk=False, progress=False)
    assert torch.equal(again[0]["latents"], g[0]["latents"])  # seeded: the same sample every run


def test_refuses_color_aug_and_random_crop(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 1)
    for flag in ("--color_aug", "--random_crop"):
        g = group(tmp_path, flag)
        with pytest.raises(ValueError, match=f"{flag[2:]} cannot be used with latent caching: a cached latent is "
                                             "one fixed image"):
            g.cache_latents(vae, cache_to_disk=True, progress=False)


def test_interrupted_cache_keeps_whole_files_and_resumes(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 4)
    folder = tmp_path / "train" / "1_x"
    v = CountingVAE(vae, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        group(tmp_path).cache_latents(v, vae_batch_size=1, cache_to_disk=True, progress=False)
    files = sorted(os.listdir(folder))
    assert [f for f in files if f.endswith(".npz")] == ["img0.npz", "img1.npz"]
    assert not [f for f in files if f.startswith(".")]  # no half-written (hidden temporary) file
    v2 = CountingVAE(vae)
    group(tmp_path).cache_latents(v2, vae_batch_size=1, cache_to_disk=True, progress=False)
    assert v2.encoded == 2


def test_truncated_cache_file_is_recomputed(tmp_path, vae):
    make_images(tmp_path / "train" / "1_x", 1)
    group(tmp_path).cache_latents(vae, cache_to_disk=True, progress=False)
    path = tmp_path / "train" / "1_x" / "img0.npz"
    path.write_bytes(path.read_bytes()[:100])
    v = CountingVAE(vae)
    group(tmp_path).cache_latents(v, cache_to_disk=True, progress=False)
    assert v.encoded == 1 and latent_cache.is_valid(path, (64, 64), flip_aug=False)


def test_image_in_two_datasets_gets_one_file_per_bucket(tmp_path, vae):
    from tests.data_helpers import write_toml

    make_images(tmp_path / "imgs", 2)
    toml = write_toml(tmp_path / "multi.toml", "".join(
        f"[[datasets]]\nresolution = {r}\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'imgs'}'\n"
        f"flip_aug = {str(r == 64).lower()}\n" for r in (64, 128)))
    g = build_dataset_group(parse("--dataset_config", toml), None)
    v = CountingVAE(vae)
    g.cache_latents(v, cache_to_disk=True, progress=False)
    assert v.encoded == 2 * 2 + 2  # four units, the 64 px ones also flipped
    names = sorted(p for p in os.listdir(tmp_path / "imgs") if p.endswith(".npz"))
    assert names == ["img0_128x128.npz", "img0_64x64.npz", "img1_128x128.npz", "img1_64x64.npz"]
    assert all(i.npz_path for i in g.images)
    assert g[0]["latents"].shape[-1] in (8, 16)
    v2 = CountingVAE(vae)
    build_dataset_group(parse("--dataset_config", toml), None).cache_latents(v2, cache_to_disk=True, progress=False)
    assert v2.encoded == 0
