"""svd_merge_lora.py: merge LoRAs (any ranks) into one LoRA of a chosen rank by SVD.

    python networks/svd_merge_lora.py --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 0.6 0.4 --new_rank 32 --device cuda

Each module's `sum_i ratio_i * delta_i` is re-factored to --new_rank (3x3 convs: --new_conv_rank) with the
optimal (truncated SVD) error; the retained Frobenius norm is reported. See docs/svd_merge_lora.md.
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
from networks.lora_cli import (add_lbws_argument, add_precision_arguments, check_inputs, check_output, refuse_lbws,
                                run_main, save_dtype)
from networks.lora import save_lora_file
from networks.lora_math import minimal_metadata, resolve_device
from networks.lora_merge_ops import check_ratios, summarize, svd_merge_loras

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd_merge_lora.py",
                                     description="Merge LoRAs of any ranks into one LoRA of --new_rank by SVD.")
    io = parser.add_argument_group("models")
    io.add_argument("--models", nargs="*", default=None, help="LoRA files to merge")
    io.add_argument("--ratios", nargs="*", type=float, default=None, help="one ratio per LoRA (default 1.0 each)")
    io.add_argument("--save_to", default=None, help="output LoRA file (.safetensors or .ckpt)")
    io.add_argument("--v2", action="store_true", help="the LoRAs are for SD 2.x (checked against their content)")
    io.add_argument("--sdxl", action="store_true", help="the LoRAs are for SDXL (checked against their content)")
    rank = parser.add_argument_group("rank and device")
    rank.add_argument("--new_rank", type=int, default=4, help="rank of the merged LoRA (default 4)")
    rank.add_argument("--new_conv_rank", type=int, default=None,
                      help="rank of Conv2d 3x3 modules (default: --new_rank)")
    rank.add_argument("--device", default=None, help="device for the SVD: cpu (default), cuda, cuda:N")
    prec = parser.add_argument_group("precision and metadata")
    add_precision_arguments(prec)
    prec.add_argument("--no_metadata", action="store_true", help="write only the minimal ss_ metadata")
    prec.add_argument("--verbose", action="store_true", help="log every module's retained Frobenius norm")
    add_lbws_argument(rank)
    return parser


def run(args: argparse.Namespace) -> None:
    refuse_lbws(args)
    ratios = check_ratios(args.models or [], args.ratios)
    for flag, value in (("--new_rank", args.new_rank), ("--new_conv_rank", args.new_conv_rank)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be a positive integer")
    if args.v2 and args.sdxl:
        raise ValueError("--v2 and --sdxl exclude each other")
    check_inputs(args.models, "--models")
    check_output(args.save_to, args.models)
    device = resolve_device(args.device)
    families = ("sdxl",) if args.sdxl else ("sd2",) if args.v2 else None
    tensors, metadata, reports = svd_merge_loras(args.models, ratios, args.new_rank, args.new_conv_rank,
                                                 device=device, dtype=precision_dtype(args.precision),
                                                 families=families)
    for r in reports:
        logger.debug("%s: rank %d -> %d, retained %.4f, relative error %.3g", r.name, r.old_rank, r.new_rank,
                     r.fro_retained, r.relative_error)
    logger.info("svd merge: %s", summarize(reports))
    if args.no_metadata:
        metadata = minimal_metadata(metadata)
    logger.info("saving merged LoRA to %s", args.save_to)
    save_lora_file(tensors, args.save_to, save_dtype(args.save_precision, args.precision), metadata)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(run, setup_parser(), argv)


if __name__ == "__main__":
    main()
