"""Speed and memory options of the trainers: --fused_backward_pass, --torch_compile / --dynamo_backend, --fp8_base /
--fp8_base_unet, --blocks_to_swap. Their argument block and their checks (run before any model loads); the features
live in `library.fused_backward`, `library.compile`, `library.fp8`, `library.block_swap`.
"""
from __future__ import annotations

import argparse

from library.train_args import _add, _need

DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt", "tensorrt", "tensort", "ipex", "tvm")  # accelerate's names; sd-scripts spells
# tensorrt "tensort": both are accepted (library.compile maps it)


def add_performance_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("performance", "speed and memory: fused backward, torch.compile, fp8, block swap")
    _add(g, "--fused_backward_pass", action="store_true",
         help="update each LoRA tensor as soon as its gradient is ready (needs --max_grad_norm 0)")
    _add(g, "--torch_compile", action="store_true", help="compile the U-Net with torch.compile")
    _add(g, "--dynamo_backend", type=str.lower, default="inductor", choices=DYNAMO_BACKENDS,
         help="torch.compile backend (default inductor; eager / aot_eager compile nothing to machine code)")
    _add(g, "--fp8_base", action="store_true",
         help="store the frozen U-Net and text encoders in float8 (e4m3), upcast per layer")
    _add(g, "--fp8_base_unet", action="store_true", help="store only the frozen U-Net in float8 (e4m3)")
    _add(g, "--blocks_to_swap", type=int, default=None,
         help="SDXL on CUDA: keep the last N U-Net blocks' frozen weights in CPU memory, moved in before use")


def validate_performance_args(args: argparse.Namespace, sdxl: bool, optimizer_name: str) -> None:
    """One-line ValueErrors for combinations that cannot work (device checks happen once the device is known)."""
    from library.fused_backward import fused_backward_problem

    problem = fused_backward_problem(args, optimizer_name)
    if problem:
        raise ValueError(problem)
    swap = getattr(args, "blocks_to_swap", None)
    if swap is not None:
        from library.block_swap import SDXL_BLOCKS, check_blocks_to_swap

        _need(sdxl, "--blocks_to_swap is for SDXL (sdxl_train_network.py); SD 1.x / 2.x U-Nets fit without it")
        check_blocks_to_swap(swap, SDXL_BLOCKS)
        _need(args.gradient_checkpointing, "--blocks_to_swap needs --gradient_checkpointing (without it autograd "
              "keeps every swapped layer's weights on the GPU until backward)")
        _need(not getattr(args, "torch_compile", False), "--blocks_to_swap cannot be combined with --torch_compile "
              "(the swap hooks change weights between compiled calls)")


def check_device_options(args: argparse.Namespace, device) -> None:
    """The checks that need the training device (known once accelerate has picked it), before models load."""
    problem = None
    if getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False):
        from library.fp8 import fp8_problem

        problem = fp8_problem(device)
    if problem is None and getattr(args, "torch_compile", False):
        from library.compile import compile_problem

        problem = compile_problem(args.dynamo_backend, device)
    if problem:
        raise ValueError(problem)
