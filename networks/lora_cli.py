"""Command-line plumbing shared by the LoRA tool scripts: logging, early checks of paths, errors as one line."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

from library.file_io import CheckpointError, precision_dtype, refuse_overwrite

SAVE_EXTENSIONS = (".safetensors", ".ckpt", ".pt")
PRECISION_CHOICES = ("float", "fp16", "bf16")


def setup_logging(verbose: bool = False) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s")


def run_main(run: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
             argv: Sequence[str] | None = None) -> None:
    """Parse, run, and turn the expected errors into a one-line `SystemExit` (no traceback)."""
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    try:
        run(args)
    except (ValueError, FileNotFoundError, CheckpointError, KeyError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise SystemExit(f"error: {message}") from None


def check_inputs(paths: Sequence[str | None], flag: str) -> None:
    """Every given input exists and is a file."""
    for p in paths:
        if p is None:
            continue
        if not os.path.exists(p):
            raise FileNotFoundError(f"{flag} {p}: no such file")
        if os.path.isdir(p):
            raise ValueError(f"{flag} {p}: is a folder, expected a .safetensors or .ckpt file")


def check_output(path: str | None, inputs: Sequence[str | None], flag: str = "--save_to") -> None:
    """The output path is given, has a known extension, and is none of the inputs."""
    if not path:
        raise ValueError(f"{flag} is required (a .safetensors or .ckpt file)")
    if Path(path).suffix.lower() not in SAVE_EXTENSIONS:
        raise ValueError(f"{flag} {path}: unknown extension; use .safetensors, .ckpt or .pt")
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a folder, give a file name")
    refuse_overwrite(path, [p for p in inputs if p], flag)


def save_dtype(save_precision: str | None, precision: str | None = "float"):
    """`--save_precision`, defaulting to `--precision` (both float / fp16 / bf16)."""
    return precision_dtype(save_precision or precision)


def add_precision_arguments(parser: argparse.ArgumentParser, with_compute: bool = True) -> None:
    if with_compute:
        parser.add_argument("--precision", default="float", choices=PRECISION_CHOICES,
                            help="precision of the merge arithmetic (default float; fp16/bf16 use less memory)")
    parser.add_argument("--save_precision", default=None, choices=PRECISION_CHOICES,
                        help="precision of the saved file" + (" (default: same as --precision)" if with_compute
                                                              else " (default float)"))



LBWS_REFUSAL = ("--lbws: per-block weights of each merged LoRA (LoRA Block Weight) are not supported; weight "
                "whole LoRAs with --ratios")


def add_lbws_argument(parser: argparse._ActionsContainer) -> None:
    """sd-scripts' --lbws, recognised so that a user's command stops with the reason, not 'unrecognized'."""
    parser.add_argument("--lbws", nargs="*", default=None, help="refused: per-block merge weights are not supported")


def refuse_lbws(args: argparse.Namespace) -> None:
    if getattr(args, "lbws", None) is not None:
        raise ValueError(LBWS_REFUSAL)
