"""Cached (in memory, on disk) and freshly encoded latents reach the U-Net identical: the VAE's scaling factor
is applied once, by the trainer."""
from __future__ import annotations

import torch

from tests.train_helpers import base_args, solid_dataset, train


def _deterministic_vae_model(root) -> str:
    """A tiny SD1 model whose VAE has (almost) zero variance, so encoding is deterministic."""
    from library.model_loading import save_models
    from library.sd_configs import build_models

    m = build_models("sd1", "tiny", seed=3)
    with torch.no_grad():  # quant_conv's second half is the log-variance: make it -30 everywhere
        m.vae.quant_conv.weight[4:].zero_()
        m.vae.quant_conv.bias[4:].fill_(-30.0)
    save_models(m, str(root / "model"))
    return str(root / "model")


def test_cached_and_encoded_latents_are_the_same(tmp_path):
    model = _deterministic_vae_model(tmp_path)
    data = solid_dataset(tmp_path / "data", colours=((200, 40, 40), (30, 30, 220)))
    steps = ["--max_train_steps", "1"]
    cached = train(base_args(model, data, tmp_path / "a", *steps))  # base_args caches latents
    argv = [a for a in base_args(model, data, tmp_path / "b", *steps) if a != "--cache_latents"]
    fresh = train(argv)
    for t in (cached, fresh):
        t.dataset.set_epoch(1)
    batch_cached, batch_fresh = cached.dataset[0], fresh.dataset[0]
    assert "latents" in batch_cached and "images" in batch_fresh
    a, b = cached.latents(batch_cached), fresh.latents(batch_fresh)
    assert a.shape == b.shape == (1, 4, 8, 8)
    assert torch.allclose(a, b, atol=1e-4), (a.abs().mean().item(), b.abs().mean().item())


def test_memory_disk_and_fresh_latents_reach_the_noise_step_identical(tmp_path, monkeypatch):
    from library import noise

    model = _deterministic_vae_model(tmp_path)
    data = solid_dataset(tmp_path / "data", colours=((200, 40, 40),))
    seen: dict[str, list] = {}
    original = noise.sample_noise_and_timesteps

    def record(latents, *a, **kw):
        seen[run].append(latents.detach().clone())
        return original(latents, *a, **kw)

    monkeypatch.setattr(noise, "sample_noise_and_timesteps", record)
    plain = [a for a in base_args(model, data, tmp_path / "x", "--max_train_steps", "2") if a != "--cache_latents"]
    runs = {"fresh": [], "memory": ["--cache_latents"], "disk": ["--cache_latents", "--cache_latents_to_disk"]}
    for run, extra in runs.items():
        seen[run] = []
        argv = plain + extra
        argv[argv.index("--output_dir") + 1] = str(tmp_path / run)
        train(argv)
    assert list((tmp_path / "data" / "img").glob("*.npz"))  # the disk run read its latents from files
    for run in ("memory", "disk"):
        assert len(seen[run]) == 2
        for a, b in zip(seen[run], seen["fresh"]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    import numpy as np

    npz = np.load(next((tmp_path / "data" / "img").glob("*.npz")))  # unscaled, as sd-scripts writes them
    unscaled = torch.from_numpy(npz["latents"]).unsqueeze(0)
    torch.testing.assert_close(seen["fresh"][0], unscaled * 0.18215, atol=1e-4, rtol=0)  # scaled exactly once
