"""extract_lora_from_models.py: approximate the difference of two models (e.g. before / after fine-tuning) by a LoRA.

    python networks/extract_lora_from_models.py --model_org base.safetensors --model_tuned tuned.safetensors \\
        --save_to extracted.safetensors --dim 4 [--conv_dim 4] [--v2 | --sdxl]

The two checkpoints are read tensor by tensor (never as whole models); each targeted layer's difference is
factored by truncated SVD (randomised where that is exact enough; the retained Frobenius norm is reported).
Text encoders equal in both models (max difference <= --min_diff) are left out, giving a UNet-only LoRA.
See docs/extract_lora_from_models.md.
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
from networks.lora import save_lora_file
from networks.lora_cli import PRECISION_CHOICES, check_inputs, check_output, run_main
from networks.lora_math import minimal_metadata, resolve_device

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extract_lora_from_models.py",
                                     description="Extract a LoRA from the difference of two models.")
    io = parser.add_argument_group("models")
    io.add_argument("--model_org", default=None, help="original model (.safetensors or .ckpt); the LoRA applies to it")
    io.add_argument("--model_tuned", default=None, help="fine-tuned model (.safetensors or .ckpt)")
    io.add_argument("--save_to", default=None, help="output LoRA file (.safetensors or .ckpt)")
    io.add_argument("--v2", action="store_true", help="the models are Stable Diffusion 2.x")
    io.add_argument("--sdxl", action="store_true", help="the models are SDXL")
    io.add_argument("--v_parameterization", action="store_true",
                    help="record a v-prediction (768-v) base model in the metadata")
    rank = parser.add_argument_group("rank and approximation")
    rank.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    rank.add_argument("--conv_dim", type=int, default=None,
                      help="also extract Conv2d 3x3 layers (LoRA-C3Lier) at this rank")
    rank.add_argument("--clamp_quantile", type=float, default=0.99,
                      help="clip the factors' entries to this quantile of their absolute values (default 0.99, as "
                           "the original script; 1 disables clipping)")
    rank.add_argument("--min_diff", type=float, default=0.01,
                      help="a text encoder whose largest weight difference is <= this is treated as unchanged and "
                           "left out (default 0.01)")
    rank.add_argument("--svd_solver", default="auto", choices=("auto", "exact", "randomized"),
                      help="SVD solver: auto (randomised for large layers, exact for small), exact, randomized")
    dev = parser.add_argument_group("device and precision")
    dev.add_argument("--device", default=None, help="device for the SVD: cpu (default), cuda, cuda:N")
    dev.add_argument("--load_precision", default=None, choices=PRECISION_CHOICES,
                     help="precision the weights are read in (default: as stored; differences are taken in float)")
    dev.add_argument("--save_precision", default=None, choices=PRECISION_CHOICES,
                     help="precision of the saved LoRA (default float)")
    dev.add_argument("--load_original_model_to", default=None,
                     help="accepted for compatibility; tensors are streamed, so nothing is loaded to a device")
    dev.add_argument("--load_tuned_model_to", default=None, help="accepted for compatibility (see above)")
    dev.add_argument("--no_metadata", action="store_true", help="write only the minimal ss_ metadata")
    dev.add_argument("--verbose", action="store_true", help="log every module's retained Frobenius norm")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise ValueError(f"--dim {args.dim} / --conv_dim {args.conv_dim}: ranks must be positive integers")
    if not 0 < args.clamp_quantile <= 1:
        raise ValueError(f"--clamp_quantile {args.clamp_quantile}: must be in (0, 1]")
    if args.min_diff < 0:
        raise ValueError(f"--min_diff {args.min_diff}: must be >= 0")
    if args.v2 and args.sdxl:
        raise ValueError("--v2 and --sdxl exclude each other")
    for flag, value in (("--model_org", args.model_org), ("--model_tuned", args.model_tuned)):
        if value is None:
            raise ValueError(f"{flag} is required")
    check_inputs([args.model_org], "--model_org")
    check_inputs([args.model_tuned], "--model_tuned")
    check_output(args.save_to, [args.model_org, args.model_tuned])
    from networks.lora_checkpoint_ops import ExtractOptions, extract_lora
    from networks.lora_merge_ops import summarize

    options = ExtractOptions(dim=args.dim, conv_dim=args.conv_dim, device=resolve_device(args.device),
                             load_dtype=precision_dtype(args.load_precision), clamp_quantile=args.clamp_quantile,
                             min_diff=args.min_diff, solver=args.svd_solver)
    family = "sdxl" if args.sdxl else "sd2" if args.v2 else "sd1"
    tensors, metadata, reports = extract_lora(args.model_org, args.model_tuned, family, options,
                                              args.v_parameterization)
    for r in reports:
        logger.debug("%s: rank %d, retained %.4f, relative error %.3g (%s SVD)", r.name, r.new_rank,
                     r.fro_retained, r.relative_error, r.solver)
    logger.info("extract: %s", summarize(reports))
    if args.no_metadata:
        metadata = minimal_metadata(metadata)
    logger.info("saving LoRA to %s", args.save_to)
    save_lora_file(tensors, args.save_to, precision_dtype(args.save_precision or "float"), metadata)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(run, setup_parser(), argv)


if __name__ == "__main__":
    main()
