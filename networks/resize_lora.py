"""resize_lora.py: change the rank of a LoRA by SVD, to a fixed rank or one chosen per module.

    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 8
    python networks/resize_lora.py --model in.safetensors --save_to out.safetensors --new_rank 32 \\
        --dynamic_method sv_fro --dynamic_param 0.9 --verbose

The delta of each module keeps its scale (alpha / rank); with --verbose each module's retained Frobenius norm
is printed. See docs/resize_lora.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.file_io import precision_dtype
from networks.lora_cli import PRECISION_CHOICES, check_inputs, check_output, run_main
from networks.lora import save_lora_file
from networks.lora_math import DYNAMIC_METHODS, resolve_device, validate_dynamic
from networks.lora_merge_ops import resize_lora, summarize

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resize_lora.py", description="Resize a LoRA's rank by SVD.")
    io = parser.add_argument_group("models")
    io.add_argument("--model", default=None, help="LoRA file to resize (.safetensors or .ckpt)")
    io.add_argument("--save_to", default=None, help="output LoRA file (.safetensors or .ckpt)")
    io.add_argument("--save_precision", default=None, choices=PRECISION_CHOICES,
                    help="precision of the saved file (default float)")
    rank = parser.add_argument_group("rank")
    rank.add_argument("--new_rank", type=int, default=4,
                      help="rank of the result; with --dynamic_method the largest rank allowed (default 4)")
    rank.add_argument("--new_conv_rank", type=int, default=None,
                      help="rank of the 3x3 conv modules (default: --new_rank)")
    rank.add_argument("--dynamic_method", default=None, choices=DYNAMIC_METHODS,
                      help="choose each module's rank: sv_ratio (keep singular values > largest / param), "
                           "sv_fro (keep a fraction param of the Frobenius norm), sv_cumulative (keep a fraction "
                           "param of the sum of singular values)")
    rank.add_argument("--dynamic_param", type=float, default=None, help="the value for --dynamic_method")
    run_ = parser.add_argument_group("device and output")
    run_.add_argument("--device", default=None, help="device for the SVD: cpu (default), cuda, cuda:N")
    run_.add_argument("--verbose", action="store_true",
                      help="print each module's new rank and retained Frobenius norm")
    return parser


def run(args: argparse.Namespace) -> None:
    for flag, value in (("--new_rank", args.new_rank), ("--new_conv_rank", args.new_conv_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    validate_dynamic(args.dynamic_method, args.dynamic_param)
    check_inputs([args.model], "--model")
    if args.model is None:
        raise ValueError("--model is required (the LoRA to resize)")
    check_output(args.save_to, [args.model])
    device = resolve_device(args.device)
    tensors, metadata, reports = resize_lora(args.model, args.new_rank, dynamic_method=args.dynamic_method,
                                             dynamic_param=args.dynamic_param, device=device,
                                             new_conv_rank=args.new_conv_rank)
    if args.verbose:
        for r in reports:
            print(f"{r.name}: rank {r.old_rank} -> {r.new_rank}, retained Frobenius norm {r.fro_retained:.2%}")
    logger.info("resize: %s", summarize(reports))
    logger.info("saving resized LoRA to %s", args.save_to)
    save_lora_file(tensors, args.save_to, precision_dtype(args.save_precision or "float"), metadata)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(run, setup_parser(), argv)


if __name__ == "__main__":
    main()
