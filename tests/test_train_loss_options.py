"""Loss and noise options change a training step exactly as their formulas say (same seed, same first batch)."""
from __future__ import annotations

import pytest
import torch

from library import noise
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("data"), repeats=2)


def _first_step(tmp_path, monkeypatch, dataset, *extra) -> dict:
    """Loss, latents, noise, timesteps and target of the first step (the network starts at zero: same prediction)."""
    seen: dict = {}
    sample, target = noise.sample_noise_and_timesteps, noise.training_target

    def record_sample(latents, *a, **kw):
        out = sample(latents, *a, **kw)
        if "noise" not in seen:
            seen.update(latents=latents.clone(), noise=out[0].clone(), t=out[2].clone())
        return out

    def record_target(*a, **kw):
        out = target(*a, **kw)
        seen.setdefault("target", out.clone())
        return out

    monkeypatch.setattr(noise, "sample_noise_and_timesteps", record_sample)
    monkeypatch.setattr(noise, "training_target", record_target)
    out = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    trainer = train(base_args(tiny_model_dir(), dataset, out, "--max_train_steps", "1", "--network_train_unet_only",
                              *extra))
    monkeypatch.undo()
    seen["loss"] = trainer.step_losses[0]
    seen["snr"] = trainer.noise_scheduler.all_snr[seen["t"]].double()
    seen["trainer"] = trainer
    return seen


@pytest.fixture(scope="module")
def plain(tmp_path_factory, dataset):
    mp = pytest.MonkeyPatch()
    try:
        return _first_step(tmp_path_factory.mktemp("plain"), mp, dataset)
    finally:
        mp.undo()


def test_min_snr_gamma_and_debiased_weights(plain, dataset, tmp_path, monkeypatch):
    snr = plain["snr"].item()
    run = _first_step(tmp_path, monkeypatch, dataset, "--min_snr_gamma", "5")
    assert torch.equal(run["t"], plain["t"])
    assert run["loss"] / plain["loss"] == pytest.approx(min(snr, 5.0) / snr, rel=1e-5)
    run = _first_step(tmp_path, monkeypatch, dataset, "--debiased_estimation_loss")
    assert run["loss"] / plain["loss"] == pytest.approx(1 / min(snr, 1000) ** 0.5, rel=1e-5)
    run = _first_step(tmp_path, monkeypatch, dataset, "--v_pred_like_loss", "0.2")
    assert run["loss"] / plain["loss"] == pytest.approx(1 + 0.2 * (snr + 1) / snr, rel=1e-5)


def test_noise_offset_shifts_each_channel_by_a_constant(plain, dataset, tmp_path, monkeypatch):
    run = _first_step(tmp_path, monkeypatch, dataset, "--noise_offset", "0.1", "--adaptive_noise_scale", "0.01")
    shift = run["noise"] - plain["noise"]  # the same first draw, plus offset * N(0,1) per sample and channel
    assert shift.abs().max() > 1e-3
    torch.testing.assert_close(shift, shift.mean(dim=(2, 3), keepdim=True).expand_as(shift), atol=1e-6, rtol=0)
    run = _first_step(tmp_path, monkeypatch, dataset, "--multires_noise_iterations", "3")
    assert not torch.allclose(run["noise"], plain["noise"]) and run["noise"].std().item() == pytest.approx(1, abs=1e-5)


def test_v_parameterization_trains_on_the_velocity(plain, dataset, tmp_path, monkeypatch):
    run = _first_step(tmp_path, monkeypatch, dataset, "--v_parameterization")
    sched = run["trainer"].noise_scheduler
    expected = sched.get_velocity(run["latents"], run["noise"], run["t"])
    torch.testing.assert_close(run["target"], expected)
    assert torch.equal(plain["target"], plain["noise"]) and not torch.allclose(expected, run["noise"])
