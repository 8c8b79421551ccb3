"""Diffusion training noise and loss weighting, as sd-scripts' train_util / custom_train_functions.

Noise offset (with adaptive scale), multi-resolution (pyramid) noise, input perturbation, timestep range,
the training target (noise or v), Min-SNR-gamma, v-prediction loss scaling, v-pred-like loss and debiased
estimation weights. Every random draw takes an optional `torch.Generator`, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class NoiseSettings:
    noise_offset: float | None = None
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float | None = None
    multires_noise_iterations: int | None = None
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float | None = None
    min_timestep: int | None = None
    max_timestep: int | None = None

    @classmethod
    def from_args(cls, args: Any) -> "NoiseSettings":
        return cls(**{k: getattr(args, k, v) for k, v in cls().__dict__.items()})


def make_noise_scheduler(scheduler_config: dict[str, Any] | None = None, v_parameterization: bool = False,
                         zero_terminal_snr: bool = False):
    """The DDPM training scheduler of Stable Diffusion, with per-timestep SNR cached as `all_snr`."""
    from diffusers import DDPMScheduler

    cfg = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
           "num_train_timesteps": 1000, "clip_sample": False}
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        if scheduler_config and key in scheduler_config:
            cfg[key] = scheduler_config[key]
    cfg["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    if zero_terminal_snr:
        cfg["rescale_betas_zero_snr"] = True
    scheduler = DDPMScheduler(**cfg)
    alphas = scheduler.alphas_cumprod
    scheduler.all_snr = alphas / (1.0 - alphas).clamp(min=1e-12)
    return scheduler


def apply_noise_offset(latents: torch.Tensor, noise: torch.Tensor, noise_offset: float,
                       adaptive_noise_scale: float | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """noise + offset * N(0,1) per sample and channel; adaptive: offset += scale * |mean(latents)|, clipped >= 0."""
    offset: float | torch.Tensor = noise_offset
    if adaptive_noise_scale is not None:
        mean = latents.mean(dim=(2, 3), keepdim=True).abs()
        offset = torch.clamp(noise_offset + adaptive_noise_scale * mean, min=0.0)
    draw = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=generator).to(latents)
    return noise + offset * draw


def pyramid_noise_like(noise: torch.Tensor, iterations: int = 6, discount: float = 0.4,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise: add upsampled coarser noise with weight discount**i, renormalise to std 1."""
    b, c, h, w = noise.shape
    upsample = torch.nn.Upsample(size=(h, w), mode="bilinear")
    noise = noise.clone()
    for i in range(iterations):
        r = float(torch.rand((), generator=generator)) * 2 + 2
        hn, wn = max(1, int(h / (r**i))), max(1, int(w / (r**i)))
        coarse = torch.randn((b, c, hn, wn), generator=generator).to(noise)
        noise += upsample(coarse) * discount**i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()


def sample_noise_and_timesteps(latents: torch.Tensor, noise_scheduler: Any, settings: NoiseSettings,
                               generator: torch.Generator | list[torch.Generator] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, noisy_latents, timesteps) for one batch, with every configured noise option.

    `generator` may be a list, one per sample: each sample's draws (and the multires renormalisation) are then
    its own, independent of the batch it is in (library.distributed)."""
    if isinstance(generator, list):
        rows = [sample_noise_and_timesteps(latents[i:i + 1], noise_scheduler, settings, g)
                for i, g in enumerate(generator)]
        return tuple(torch.cat(parts) for parts in zip(*rows))  # type: ignore[return-value]
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    if settings.noise_offset:
        offset = settings.noise_offset
        if settings.noise_offset_random_strength:
            offset = float(torch.rand((), generator=generator)) * offset
        noise = apply_noise_offset(latents, noise, offset, settings.adaptive_noise_scale, generator)
    if settings.multires_noise_iterations:
        noise = pyramid_noise_like(noise, settings.multires_noise_iterations, settings.multires_noise_discount,
                                   generator)
    lo = settings.min_timestep or 0
    hi = noise_scheduler.config.num_train_timesteps if settings.max_timestep is None else settings.max_timestep
    timesteps = torch.randint(lo, hi, (latents.shape[0],), generator=generator).long()
    noised_input = noise
    if settings.ip_noise_gamma:
        noised_input = noise + settings.ip_noise_gamma * torch.randn(latents.shape, generator=generator).to(latents)
    noisy = noise_scheduler.add_noise(latents, noised_input, timesteps.to(latents.device))
    return noise, noisy, timesteps


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                    v_parameterization: bool) -> torch.Tensor:
    """What the U-Net should predict: the velocity for v-parameterization, the noise otherwise."""
    if v_parameterization:
        return noise_scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
    return noise


def _snr(timesteps: torch.Tensor, noise_scheduler: Any) -> torch.Tensor:
    return noise_scheduler.all_snr.to(timesteps.device)[timesteps]


def apply_snr_weight(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any, gamma: float,
                     v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma: weight min(snr, gamma)/snr (v-prediction: /(snr+1))."""
    snr = _snr(timesteps, noise_scheduler)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    weight = clipped / (snr + 1) if v_prediction else clipped / snr
    return loss * weight.float().to(loss.device)


def scale_v_prediction_loss_like_noise_prediction(loss: torch.Tensor, timesteps: torch.Tensor,
                                                  noise_scheduler: Any) -> torch.Tensor:
    snr = _snr(timesteps, noise_scheduler).clamp(max=1000)
    return loss * (snr / (snr + 1)).to(loss.device)


def add_v_prediction_like_loss(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                               v_pred_like_loss: float) -> torch.Tensor:
    snr = _snr(timesteps, noise_scheduler).clamp(max=1000)
    return loss + loss / (snr + 1).to(loss.device) * v_pred_like_loss


def apply_debiased_estimation(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any) -> torch.Tensor:
    snr = _snr(timesteps, noise_scheduler).clamp(max=1000)
    return loss * (1.0 / torch.sqrt(snr)).to(loss.device)


def weight_loss(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any, args: Any) -> torch.Tensor:
    """Apply every configured per-sample loss weighting of `args` to `loss` (B,)."""
    v = bool(getattr(args, "v_parameterization", False))
    if getattr(args, "min_snr_gamma", None):
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, v)
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False):
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
    if getattr(args, "v_pred_like_loss", None):
        loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
    if getattr(args, "debiased_estimation_loss", False):
        loss = apply_debiased_estimation(loss, timesteps, noise_scheduler)
    return loss
