"""check_lora_weights.py: print every module of a LoRA file (dims, alpha, norms) and flag problems.

    python networks/check_lora_weights.py my_lora.safetensors [--arch sd1|sd2|sdxl | --sd_model model.safetensors]

Flags NaN/inf values and all-zero deltas; with --arch or --sd_model also module names that match no layer of
that model and shapes that do not fit. Exits with status 1 when a problem is found. See
docs/check_lora_weights.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks.lora_check import check_lora, format_table, reference_from_arch, reference_from_checkpoint
from networks.lora_cli import check_inputs, run_main

logger = logging.getLogger(__name__)
ARCH_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="check_lora_weights.py",
                                     description="Show a LoRA file's modules and flag NaN/inf, zero deltas and keys "
                                                 "that match no layer of a model.")
    parser.add_argument("file", help="LoRA file (.safetensors or .ckpt)")
    ref = parser.add_argument_group("reference model (optional, one of)")
    ref.add_argument("--arch", default=None, choices=tuple(ARCH_NAMES),
                     help="check names and shapes against this architecture at its real size")
    ref.add_argument("--sd_model", default=None, help="check names and shapes against this checkpoint (header only)")
    out = parser.add_argument_group("output")
    out.add_argument("--problems_only", action="store_true", help="print only the modules with a problem")
    return parser


def run(args: argparse.Namespace) -> None:
    check_inputs([args.file], "file")
    check_inputs([args.sd_model], "--sd_model")
    if args.arch and args.sd_model:
        raise ValueError("give --arch or --sd_model, not both")
    reference, ref_name = None, ""
    if args.arch:
        reference, ref_name = reference_from_arch(args.arch), f"{ARCH_NAMES[args.arch]} (--arch {args.arch})"
    elif args.sd_model:
        reference, ref_name = reference_from_checkpoint(args.sd_model), args.sd_model
    result = check_lora(args.file, reference, ref_name)
    print(format_table(result, args.problems_only))
    if not result.ok:
        for p in result.problems:
            logger.warning(p)
        raise SystemExit(1)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(run, setup_parser(), argv)


if __name__ == "__main__":
    main()
