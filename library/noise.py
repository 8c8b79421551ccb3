"""Diffusion training noise and loss weighting, as sd-scripts' train_util / custom_train_functions.

Noise offset (with adaptive scale), multi-resolution (pyramid) noise, input perturbation, timestep range,
the training target (noise or v), Min-SNR-gamma, v-prediction loss scaling, v-pred-like loss and debiased
estimation weights. Every random draw takes an optional `torch.Generator`, so a run is reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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
    ip_noise_gamma_random_strength: bool = False
    immiscible_noise: int | None = None
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
                               generator: torch.Generator | list[torch.Generator] | None = None,
                               noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, noisy_latents, timesteps) for one batch, with every configured noise option.

    `generator` may be a list, one per sample: each sample's draws (and the multires renormalisation) are then
    its own, independent of the batch it is in (library.distributed). Immiscible noise is the exception: it
    assigns the samples' first draws across the batch (this process's share of it), then each sample goes on
    with its own generator. `noise`: the base noise, already drawn."""
    if isinstance(generator, list):
        base = [None] * len(generator)
        if settings.immiscible_noise:
            from library.immiscible import assign_noise

            draws = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in generator]).to(latents)
            base = list(assign_noise(latents, draws, settings.immiscible_noise, generator[0]))
            settings = replace(settings, immiscible_noise=None)
        rows = [_sample_one(latents[i:i + 1], noise_scheduler, settings, g, None if base[i] is None else base[i][None])
                for i, g in enumerate(generator)]
        return tuple(torch.cat(parts) for parts in zip(*rows))  # type: ignore[return-value]
    return _sample_one(latents, noise_scheduler, settings, generator, noise)


def _sample_one(latents: torch.Tensor, noise_scheduler: Any, settings: NoiseSettings,
                generator: torch.Generator | None, noise: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sample_noise_and_timesteps with one generator for the whole batch."""
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator).to(latents)
    if settings.immiscible_noise:  # library.immiscible: noise assigned to the nearest latents
        from library.immiscible import assign_noise

        noise = assign_noise(latents, noise, settings.immiscible_noise, generator)
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
        gamma = settings.ip_noise_gamma
        if settings.ip_noise_gamma_random_strength:
            gamma = float(torch.rand((), generator=generator)) * gamma
        noised_input = noise + gamma * torch.randn(latents.shape, generator=generator).to(latents)
    noisy = noise_scheduler.add_noise(latents, noised_input, timesteps.to(latents.device))
    return noise, noisy, timesteps


def training_target(latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                    v_parameterization: bool) -> torch.Tensor:
    """What the U-Net should predict: the velocity for v-parameterization, the noise otherwise."""
    if v_parameterization:
        return noise_scheduler.get_velocity(latents, noise, timesteps.to(latents.device))
    return noise


SNR_MAX = 1000.0  # as sd-scripts: the SNR of the first timesteps (~1175) is clipped to 1000 in the weights
SNR_MIN = 1e-3  # zero_terminal_snr makes the last SNR exactly 0; the SD schedule's smallest SNR is 0.0047


def _snr(timesteps: torch.Tensor, noise_scheduler: Any) -> torch.Tensor:
    return noise_scheduler.all_snr.to(timesteps.device)[timesteps]


def _bounded_snr(timesteps: torch.Tensor, noise_scheduler: Any) -> torch.Tensor:
    """SNR clipped to [SNR_MIN, SNR_MAX], for the weights that divide by it (finite at a zero terminal SNR)."""
    return _snr(timesteps, noise_scheduler).clamp(min=SNR_MIN, max=SNR_MAX)


def apply_snr_weight(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any, gamma: float,
                     v_prediction: bool = False) -> torch.Tensor:
    """Min-SNR-gamma: weight min(snr, gamma)/snr (v-prediction: min(snr, gamma)/(snr+1)).

    Written as gamma/max(snr, gamma) for epsilon, which is the same number and its limit 1 at snr 0.
    """
    snr = _snr(timesteps, noise_scheduler)
    if v_prediction:
        weight = torch.minimum(snr, torch.full_like(snr, gamma)) / (snr + 1)
    else:
        weight = gamma / torch.maximum(snr, torch.full_like(snr, gamma))
    return loss * weight.float().to(loss.device)


def scale_v_prediction_loss_like_noise_prediction(loss: torch.Tensor, timesteps: torch.Tensor,
                                                  noise_scheduler: Any) -> torch.Tensor:
    """Weight snr/(snr+1) (SNR clipped at SNR_MAX); 0 at a zero terminal SNR."""
    snr = _snr(timesteps, noise_scheduler).clamp(max=SNR_MAX)
    return loss * (snr / (snr + 1)).to(loss.device)


def add_v_prediction_like_loss(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                               v_pred_like_loss: float) -> torch.Tensor:
    """loss * (1 + W * (snr+1)/snr): the v error is the epsilon error times (snr+1)/snr (SNR bounded)."""
    snr = _bounded_snr(timesteps, noise_scheduler)
    return loss + loss * ((snr + 1) / snr).to(loss.device) * v_pred_like_loss


def apply_debiased_estimation(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any) -> torch.Tensor:
    """Weight 1/sqrt(snr) (SNR bounded: at most 1/sqrt(SNR_MIN) = 31.6)."""
    snr = _bounded_snr(timesteps, noise_scheduler)
    return loss * (1.0 / torch.sqrt(snr)).to(loss.device)


def weight_loss(loss: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any, args: Any,
                v_prediction: bool | None = None) -> torch.Tensor:
    """Apply every configured per-sample loss weighting of `args` to `loss` (B,); `v_prediction` (the model's,
    which a 768-v checkpoint implies) overrides `args.v_parameterization`."""
    v = bool(getattr(args, "v_parameterization", False)) if v_prediction is None else v_prediction
    if getattr(args, "min_snr_gamma", None):
        loss = apply_snr_weight(loss, timesteps, noise_scheduler, args.min_snr_gamma, v)
    if getattr(args, "scale_v_pred_loss_like_noise_pred", False):
        loss = scale_v_prediction_loss_like_noise_prediction(loss, timesteps, noise_scheduler)
    if getattr(args, "v_pred_like_loss", None):
        loss = add_v_prediction_like_loss(loss, timesteps, noise_scheduler, args.v_pred_like_loss)
    if getattr(args, "debiased_estimation_loss", False):
        loss = apply_debiased_estimation(loss, timesteps, noise_scheduler)
    return loss
