"""`--fp8_base` / `--fp8_base_unet`: frozen weights stored in float8 (e4m3), upcast one layer at a time for compute.

Every frozen `nn.Linear` and `nn.Conv2d` weight of the U-Net (and, with --fp8_base, of the text encoders) is kept as
`torch.float8_e4m3fn`: a quarter of fp32's memory, half of bf16's. The layer's forward casts its weight to the
compute dtype (the autocast dtype under mixed precision, else the input's) just for that call, so only one layer's
upcast copy exists at a time (plus what autograd keeps for the input gradient). Biases, norms, embeddings and the
U-Net's first and last convolution (which decide the model's reported dtype) stay in the training precision, as do
the LoRA weights, which wrap the upcasting forward like any other.

The cast is exact (every e4m3 value is a bf16 / fp32 value), so training on fp8 storage gives the weights training
on the rounded model gives (tests compare both); the rounding itself (3 mantissa bits) is the only change.
Works where the device can store and cast float8: CUDA, and CPU with torch >= 2.1; elsewhere one-line error.
"""
from __future__ import annotations

import logging
import types

import torch

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
KEEP = ("conv_in", "conv_out")  # U-Net layers whose dtype diffusers and the samplers read as the model's


def fp8_problem(device: torch.device) -> str | None:
    """Why --fp8_base cannot run on `device` (None when float8 storage and the upcast work there)."""
    try:
        _roundtrip(device)
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return f"--fp8_base / --fp8_base_unet: this device ({device.type}) cannot store float8 weights ({e})"
    return None


def _roundtrip(device: torch.device) -> None:
    x = torch.tensor([0.5, -1.25, 3.0], device=device)
    if not torch.equal(x.to(FP8).to(torch.float32), x):
        raise RuntimeError("float8 round trip changed exact values")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _linear_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, self.weight.to(_compute_dtype(x)), self.bias)


def _conv_forward(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return self._conv_forward(x, self.weight.to(_compute_dtype(x)), self.bias)


def store_in_fp8(model: torch.nn.Module, keep: tuple[str, ...] = ()) -> int:
    """Frozen Linear / Conv2d weights of `model` to float8 with an upcasting forward; returns how many layers.

    Call before LoRA modules are applied (they wrap the layer's forward as it is then)."""
    count = 0
    for name, module in model.named_modules():
        if type(module) not in (torch.nn.Linear, torch.nn.Conv2d) or name in keep or module.weight.requires_grad:
            continue
        module.weight = torch.nn.Parameter(module.weight.detach().to(FP8), requires_grad=False)
        forward = _linear_forward if isinstance(module, torch.nn.Linear) else _conv_forward
        module.forward = types.MethodType(forward, module)
        count += 1
    return count


def round_to_fp8(model: torch.nn.Module, keep: tuple[str, ...] = ()) -> None:
    """The weights `store_in_fp8` would store, left in their own dtype (the reference of the tests)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) in (torch.nn.Linear, torch.nn.Conv2d) and name not in keep:
                module.weight.copy_(module.weight.to(FP8).to(module.weight.dtype))


def apply_fp8_base(components, unet_only: bool) -> None:
    """--fp8_base (U-Net and text encoders) / --fp8_base_unet (U-Net only) on frozen, placed models."""
    layers = store_in_fp8(components.unet, KEEP)
    tes = 0
    if not unet_only:
        tes = sum(store_in_fp8(te) for te in components.text_encoders if te is not None)
    logger.info("fp8 base: %d U-Net and %d text-encoder layers stored as float8_e4m3fn", layers, tes)
