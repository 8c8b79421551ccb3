"""Mixed precision of a training run (`--mixed_precision`, `--full_fp16`, `--full_bf16`), the same code on
every device.

accelerate enables fp16 autocast and its grad scaler only on accelerators (on a CPU it silently trains in
fp32), so the trainer owns them here: `torch.autocast(device.type, dtype)` and, for fp16,
`torch.amp.GradScaler(device.type)`. A CPU run (the tests) therefore takes the same branches as a CUDA run:
scaled backward, unscale before clipping, a step skipped (and the scale lowered) when the gradients overflow,
the learning-rate schedule held on a skipped step, and `--full_fp16`'s unscaling of fp16 gradients.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch

MIXED_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    """Autocast and (fp16) gradient scaling for one run; `scaler` is None unless fp16."""

    def __init__(self, mixed_precision: str | None, device: torch.device, full_fp16: bool = False) -> None:
        self.dtype = MIXED_DTYPES.get(mixed_precision or "no")
        self.device_type = device.type
        self.scaler: Any = torch.amp.GradScaler(device.type) if self.dtype == torch.float16 else None
        if self.scaler is not None and full_fp16:
            allow_fp16_gradient_unscale(self.scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def unscale(self, optimizer: Any) -> None:
        """Before clipping: the gradients in their true units (fp16 only)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: Any) -> bool:
        """The optimizer step; False when the grad scaler skipped it (inf/NaN gradients, scale lowered)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= before


def allow_fp16_gradient_unscale(scaler: Any) -> None:
    """--full_fp16: let the grad scaler unscale fp16 gradients (torch refuses by default).

    The one private call on the training path, on purpose: torch.amp.GradScaler has no public switch for fp16
    gradients (its `unscale_` passes allow_fp16=False to `_unscale_grads_`); the public alternatives are fp32
    master weights (what --full_fp16 opts out of) or a scaler of our own. sd-scripts patches the same method."""
    original = scaler._unscale_grads_

    def unscale(optimizer, inv_scale, found_inf, allow_fp16):  # noqa: ANN001
        return original(optimizer, inv_scale, found_inf, True)

    scaler._unscale_grads_ = unscale
