"""Noise offset, multires noise, timestep range, v target and loss weightings against their formulas."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from library import noise as N


@pytest.fixture(scope="module")
def scheduler():
    return N.make_noise_scheduler()


def test_noise_offset_and_adaptive_scale():
    latents = torch.full((2, 4, 8, 8), 3.0)
    base = torch.zeros_like(latents)
    g = torch.Generator().manual_seed(1)
    draw = torch.randn((2, 4, 1, 1), generator=torch.Generator().manual_seed(1))
    out = N.apply_noise_offset(latents, base, 0.1, None, g)
    assert torch.allclose(out, 0.1 * draw.expand_as(out))
    out = N.apply_noise_offset(latents, base, 0.1, 0.5, torch.Generator().manual_seed(1))
    assert torch.allclose(out, (0.1 + 0.5 * 3.0) * draw.expand_as(out))
    clipped = N.apply_noise_offset(latents, base, 0.1, -1.0, torch.Generator().manual_seed(1))
    assert torch.count_nonzero(clipped) == 0  # negative offsets are clipped at 0


def test_pyramid_noise_is_normalised_and_correlated():
    noise = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    out = N.pyramid_noise_like(noise, 6, 0.8, torch.Generator().manual_seed(0))
    assert out.std().item() == pytest.approx(1.0, abs=1e-5)
    # low-frequency energy added: neighbouring pixels correlate much more than in white noise
    corr = lambda x: torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1].item()
    assert corr(out) > corr(noise) + 0.2


def test_timestep_range_and_reproducibility(scheduler):
    latents = torch.randn(64, 4, 4, 4)
    settings = N.NoiseSettings(min_timestep=200, max_timestep=300)
    n1, noisy1, t1 = N.sample_noise_and_timesteps(latents, scheduler, settings, torch.Generator().manual_seed(5))
    n2, noisy2, t2 = N.sample_noise_and_timesteps(latents, scheduler, settings, torch.Generator().manual_seed(5))
    assert t1.min() >= 200 and t1.max() < 300 and torch.equal(t1, t2) and torch.equal(noisy1, noisy2)
    a = scheduler.alphas_cumprod[t1].view(-1, 1, 1, 1)
    assert torch.allclose(noisy1, a.sqrt() * latents + (1 - a).sqrt() * n1, atol=1e-5)


def test_v_target(scheduler):
    latents, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([10, 900])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = N.training_target(latents, noise, t, scheduler, True)
    assert torch.allclose(v, a.sqrt() * noise - (1 - a).sqrt() * latents, atol=1e-6)
    assert N.training_target(latents, noise, t, scheduler, False) is noise


def test_min_snr_weights(scheduler):
    t = torch.tensor([5, 500, 990])
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])
    loss = torch.ones(3)
    eps = N.apply_snr_weight(loss, t, scheduler, 5.0, False)
    assert torch.allclose(eps, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert eps[0] < 1 and eps[2] == pytest.approx(1.0)  # high-noise steps keep weight 1
    v = N.apply_snr_weight(loss, t, scheduler, 5.0, True)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    args = SimpleNamespace(min_snr_gamma=5.0, v_parameterization=False)
    assert torch.allclose(N.weight_loss(loss, t, scheduler, args), eps)
    scaled = N.scale_v_prediction_loss_like_noise_prediction(loss, t, scheduler)
    assert torch.allclose(scaled, snr.clamp(max=1000) / (snr.clamp(max=1000) + 1))


def test_v_prediction_scheduler_and_zero_snr():
    sched = N.make_noise_scheduler(v_parameterization=True, zero_terminal_snr=True)
    assert sched.config.prediction_type == "v_prediction"
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-6)
