"""merge_lora.py: merge LoRAs into a Stable Diffusion 1.x / 2.x checkpoint, or merge LoRAs into one LoRA.

    python networks/merge_lora.py --sd_model model.safetensors --save_to merged.safetensors \\
        --models a.safetensors b.safetensors --ratios 0.8 0.5
    python networks/merge_lora.py --save_to ab.safetensors --models a.safetensors b.safetensors \\
        --ratios 1.0 -1.0 --concat --shuffle

`sdxl_merge_lora.py` is the same tool for SDXL (it calls `main(sdxl=True)`). See docs/merge_lora.md.
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
from networks.lora_math import minimal_metadata
from networks.lora_cli import (add_lbws_argument, add_precision_arguments, check_inputs, check_output, refuse_lbws,
                                run_main, save_dtype)
from networks.lora import save_lora_file
from networks.lora_merge_ops import check_ratios, merge_loras

logger = logging.getLogger(__name__)


def setup_parser(sdxl: bool = False) -> argparse.ArgumentParser:
    name = "sdxl_merge_lora.py" if sdxl else "merge_lora.py"
    model = "an SDXL checkpoint" if sdxl else "a Stable Diffusion 1.x/2.x checkpoint"
    parser = argparse.ArgumentParser(
        prog=name, description=f"Merge LoRA models into {model} (--sd_model), or into one LoRA (without --sd_model).")
    io = parser.add_argument_group("models")
    io.add_argument("--sd_model", default=None,
                    help=f"{model} (.safetensors or .ckpt) to merge into; omit to merge the LoRAs into one LoRA")
    io.add_argument("--save_to", default=None, help="output file (.safetensors or .ckpt, chosen by extension)")
    io.add_argument("--models", nargs="*", default=None, help="LoRA files to merge, in order")
    io.add_argument("--ratios", nargs="*", type=float, default=None,
                    help="one ratio per LoRA (default 1.0 each); negative values subtract")
    if not sdxl:
        io.add_argument("--v2", action="store_true", help="--sd_model is a Stable Diffusion 2.x model")
    how = parser.add_argument_group("merging LoRAs into one LoRA")
    how.add_argument("--concat", action="store_true",
                     help="stack the ranks instead of adding the factors: rank and file size are the sum of the "
                          "inputs', and the result is exactly the ratio-weighted sum of the LoRAs")
    how.add_argument("--shuffle", action="store_true",
                     help="randomly permute the rank dimension (same result, the inputs cannot be read back)")
    prec = parser.add_argument_group("precision and metadata")
    add_precision_arguments(prec)
    prec.add_argument("--no_metadata", action="store_true",
                      help="write only the minimal ss_ metadata (no merged training metadata, no merge recipe)")
    if sdxl:
        add_lbws_argument(how)
    return parser


def run(args: argparse.Namespace, sdxl: bool = False) -> None:
    refuse_lbws(args)
    if args.models is None or not args.models:
        raise ValueError("--models: give at least one LoRA file")
    ratios = check_ratios(args.models, args.ratios)
    check_inputs(args.models, "--models")
    check_inputs([args.sd_model], "--sd_model")
    check_output(args.save_to, [*args.models, args.sd_model])
    merge_dtype = precision_dtype(args.precision)
    out_dtype = save_dtype(args.save_precision, args.precision)
    if args.sd_model is not None:
        if args.concat or args.shuffle:
            raise ValueError("--concat / --shuffle apply when merging LoRAs into one LoRA; omit --sd_model or these flags")
        from networks.lora_checkpoint_ops import merge_into_checkpoint

        family = "sdxl" if sdxl else ("sd2" if args.v2 else "sd1")
        merge_into_checkpoint(args.sd_model, args.save_to, args.models, ratios, family=family,
                              merge_dtype=merge_dtype, save_dtype=out_dtype)
        return
    tensors, metadata = merge_loras(args.models, ratios, dtype=merge_dtype, concat=args.concat, shuffle=args.shuffle,
                                    families=("sdxl",) if sdxl else ("sd1", "sd2"))
    if args.no_metadata:
        metadata = minimal_metadata(metadata)
    logger.info("saving merged LoRA to %s", args.save_to)
    save_lora_file(tensors, args.save_to, out_dtype, metadata)


def main(argv: Sequence[str] | None = None, sdxl: bool = False) -> None:
    run_main(lambda args: run(args, sdxl), setup_parser(sdxl), argv)


if __name__ == "__main__":
    main()
