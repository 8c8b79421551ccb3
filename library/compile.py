"""`--torch_compile` / `--dynamo_backend`: compile the U-Net's repeated blocks with torch.compile.

Regional compilation (as diffusers' `compile_repeated_blocks`): every transformer block and every ResNet block is
compiled on its own, in place (`nn.Module.compile`: same module objects, same state-dict keys). Blocks of one class
and shape share the compiled code, so compiling costs a few graphs instead of the whole U-Net, and the units are the
ones diffusers' gradient checkpointing wraps, so checkpointing keeps working around compiled code. The LoRA modules
are applied before compiling: their forward replaces the adapted layers' forward and is traced with the block.
Attention stays PyTorch's SDPA, which the compilers understand.

The backend names are accelerate's (`--dynamo_backend`, lower case): `inductor` generates kernels (on CPU it needs
a C compiler), `eager` / `aot_eager` only trace (checks, no speed-up).
"""
from __future__ import annotations

import logging
import shutil

import torch

logger = logging.getLogger(__name__)

COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")  # diffusers classes compiled one by one
RECOMPILE_LIMIT = 128  # compiled variants per block class (shapes x bucket resolutions)


def compile_problem(backend: str, device: torch.device) -> str | None:
    """Why `--torch_compile --dynamo_backend backend` cannot run on `device` (None when it can)."""
    if backend == "inductor" and device.type == "cpu" and not (shutil.which("gcc") or shutil.which("cc")
                                                                 or shutil.which("clang")):
        return ("--torch_compile with --dynamo_backend inductor needs a C compiler on CPU (gcc, clang); "
                "install one or use --dynamo_backend aot_eager")
    if backend in ("cudagraphs", "aot_ts_nvfuser", "nvprims_nvfuser", "fx2trt", "tensorrt", "tensort") and device.type != "cuda":
        return f"--dynamo_backend {backend} needs a CUDA GPU; use inductor (the default) on {device.type}"
    return None


def compile_unet(unet: torch.nn.Module, backend: str) -> int:
    """Compile the U-Net's transformer and ResNet blocks in place with `backend`; returns how many blocks."""
    import torch._dynamo

    backend = {"tensort": "tensorrt"}.get(backend, backend)  # sd-scripts' spelling
    # One forward function serves every block of a class; each distinct shape is its own compiled variant
    # (static shapes: the fastest kernels). An SDXL U-Net has a few dozen; the default limit (8) would leave
    # the rest running uncompiled.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    count = 0
    for module in unet.modules():
        if type(module).__name__ in COMPILED_BLOCKS:
            module.compile(backend=backend, dynamic=False)
            count += 1
    if count == 0:
        raise ValueError(f"--torch_compile: found no {' / '.join(COMPILED_BLOCKS)} in the U-Net to compile")
    logger.info("torch.compile (%s): %d U-Net blocks; the first steps include compiling", backend, count)
    return count
