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


def test_v_pred_like_loss_adds_the_v_error_weight(scheduler):
    """weight 1 + W*(snr+1)/snr (the v error is the epsilon error times (snr+1)/snr), by hand at three steps."""
    t = torch.tensor([100, 500, 900])
    ac = scheduler.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    expected = 1 + 0.3 * (snr + 1) / snr
    got = N.add_v_prediction_like_loss(torch.ones(3), t, scheduler, 0.3)
    assert torch.allclose(got.double(), expected, rtol=1e-5)
    assert got[1].item() == pytest.approx(2.086, abs=1e-3)  # t=500: SNR 0.382
    args = SimpleNamespace(v_pred_like_loss=0.3, v_parameterization=False)
    assert torch.allclose(N.weight_loss(torch.full((3,), 2.0), t, scheduler, args), 2 * got)


_WEIGHTINGS = {
    "min_snr_gamma": dict(min_snr_gamma=5.0),
    "debiased_estimation_loss": dict(debiased_estimation_loss=True),
    "v_pred_like_loss": dict(v_pred_like_loss=0.1),
    "scale_v_pred_loss_like_noise_pred": dict(scale_v_pred_loss_like_noise_pred=True),
    "all": dict(min_snr_gamma=5.0, debiased_estimation_loss=True, v_pred_like_loss=0.1,
                scale_v_pred_loss_like_noise_pred=True),
}


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
@pytest.mark.parametrize("v", [False, True])
@pytest.mark.parametrize("name", sorted(_WEIGHTINGS))
def test_every_weighting_is_finite_at_every_timestep(name, v, zero_terminal_snr):
    sched = N.make_noise_scheduler(v_parameterization=v, zero_terminal_snr=zero_terminal_snr)
    t = torch.arange(sched.config.num_train_timesteps)
    args = SimpleNamespace(v_parameterization=v, **_WEIGHTINGS[name])
    w = N.weight_loss(torch.ones(len(t)), t, sched, args)
    assert torch.isfinite(w).all() and (w >= 0).all()
    snr = sched.all_snr.double()
    if zero_terminal_snr:
        assert snr[-1] == 0  # the case that divided by zero
    # the documented limits at the noisiest step and the bounds of the clipped SNR
    if name == "min_snr_gamma":
        assert w[-1].item() == pytest.approx(0.0 if (v and zero_terminal_snr) else (
            min(snr[-1].item(), 5) / (snr[-1].item() + 1) if v else 1.0), abs=1e-6)
    if name == "debiased_estimation_loss":
        assert w.max().item() <= N.SNR_MIN ** -0.5 * (1 + 1e-5)
    if name == "v_pred_like_loss":
        assert w.max().item() <= 1 + 0.1 * (1 + N.SNR_MIN) / N.SNR_MIN * (1 + 1e-5)
    if name == "scale_v_pred_loss_like_noise_pred" and zero_terminal_snr:
        assert w[-1].item() == 0.0
    if not zero_terminal_snr and name != "all":  # the SD schedule's SNR is above SNR_MIN: no clipping there
        assert snr.min() > N.SNR_MIN
