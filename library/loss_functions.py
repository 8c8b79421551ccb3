"""Element-wise training losses: `--loss_type l2|l1|huber|smooth_l1` with the Huber threshold schedules.

The option names and formulas are sd-scripts' (`--huber_schedule constant|exponential|snr`, `--huber_c`,
`--huber_scale`): the pseudo-Huber loss `2c (sqrt(d^2 + c^2) - c)` and the "smooth L1" `2 (sqrt(d^2 + c^2) - c)`
with a threshold `c` per sample that depends on its timestep. They are computed in the algebraically equal form
`2c d^2 / (sqrt(d^2 + c^2) + c)`, which has no cancellation: finite for every timestep and every c, and equal to
the L2 loss to rounding when c is large. The result is element-wise (B, C, H, W); masks, the mean and the
per-sample weightings (`library.noise.weight_loss`) apply after it, as for L2.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


@dataclass(frozen=True)
class LossSettings:
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0

    @classmethod
    def from_args(cls, args: Any) -> "LossSettings":
        return cls(**{k: getattr(args, k, None) if getattr(args, k, None) is not None else v
                      for k, v in cls().__dict__.items()})


def add_loss_arguments(group: Any) -> None:
    """The loss options (into the trainer's "training" argument group)."""
    group.add_argument("--loss_type", type=str, default="l2", choices=LOSS_TYPES,
                       help="element-wise loss: l2 (default), l1, huber (pseudo-Huber) or smooth_l1")
    group.add_argument("--huber_schedule", type=str, default="snr", choices=HUBER_SCHEDULES,
                       help="how the Huber threshold c follows the timestep (default snr)")
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber threshold c (default 0.1)")
    group.add_argument("--huber_scale", type=float, default=1.0,
                       help="scale of the constant / exponential Huber threshold (default 1)")


def validate(args: Any) -> None:
    """One-line errors for impossible loss settings (before any model loads)."""
    s = LossSettings.from_args(args)
    if s.loss_type not in LOSS_TYPES:
        raise ValueError(f"--loss_type {s.loss_type}: expected one of {', '.join(LOSS_TYPES)}")
    if s.huber_schedule not in HUBER_SCHEDULES:
        raise ValueError(f"--huber_schedule {s.huber_schedule}: expected one of {', '.join(HUBER_SCHEDULES)}")
    if not (math.isfinite(s.huber_c) and s.huber_c > 0):
        raise ValueError(f"--huber_c {s.huber_c}: expected a positive number (default 0.1)")
    if not (math.isfinite(s.huber_scale) and s.huber_scale > 0):
        raise ValueError(f"--huber_scale {s.huber_scale}: expected a positive number (default 1)")
    if s.huber_schedule == "exponential" and s.huber_c > 1:
        raise ValueError(f"--huber_c {s.huber_c}: the exponential schedule decays from huber_scale to "
                         "huber_c x huber_scale, so c must be in (0, 1]")


def huber_threshold(timesteps: torch.Tensor, noise_scheduler: Any, settings: LossSettings) -> torch.Tensor:
    """c per sample (B,): constant c x scale; exponential scale x exp(log(c) t / T) (1 at t=0, c at t=T);
    snr (1 - c) / (1 + sigma_t)^2 + c with sigma_t = sqrt((1 - abar_t) / abar_t) (c at pure noise)."""
    t = timesteps.detach().cpu().long()
    if settings.huber_schedule == "constant":
        return torch.full(t.shape, settings.huber_c * settings.huber_scale, dtype=torch.float32)
    if settings.huber_schedule == "exponential":
        total = noise_scheduler.config.num_train_timesteps
        return torch.exp(math.log(settings.huber_c) * t.float() / total) * settings.huber_scale
    abar = noise_scheduler.alphas_cumprod.float()[t]
    sigma = torch.sqrt((1.0 - abar) / abar.clamp(min=1e-20))
    return (1.0 - settings.huber_c) / (1.0 + sigma) ** 2 + settings.huber_c


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler: Any,
                     settings: LossSettings) -> torch.Tensor:
    """The loss of each element (B, C, H, W) in float32."""
    pred, target = pred.float(), target.float()
    if settings.loss_type == "l2":
        return torch.nn.functional.mse_loss(pred, target, reduction="none")
    if settings.loss_type == "l1":
        return torch.nn.functional.l1_loss(pred, target, reduction="none")
    c = huber_threshold(timesteps, noise_scheduler, settings).to(pred.device).view(-1, *([1] * (pred.dim() - 1)))
    sq = (pred - target) ** 2
    smooth = 2.0 * sq / (torch.sqrt(sq + c * c) + c)  # = 2 (sqrt(d^2 + c^2) - c), without cancellation
    return smooth * c if settings.loss_type == "huber" else smooth


def metadata(args: Any) -> dict[str, str]:
    s = LossSettings.from_args(args)
    meta = {"ss_loss_type": s.loss_type}
    if s.loss_type in ("huber", "smooth_l1"):
        meta.update({"ss_huber_schedule": s.huber_schedule, "ss_huber_c": str(s.huber_c),
                     "ss_huber_scale": str(s.huber_scale)})
    return meta
