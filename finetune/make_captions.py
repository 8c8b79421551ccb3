"""Caption images with BLIP (transformers) and write one caption file per image.

    python finetune/make_captions.py --batch_size 8 ../train_data

See docs/make_captions.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import sys

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

from library.dataprep import blip_captions as blip
from library.dataprep.metadata import list_images, report_failures, sidecar_path

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a BLIP caption <image name><caption_extension> beside "
                                                 "each image. Existing caption files are kept unless --overwrite.")
    parser.add_argument("train_data_dir", help="folder holding the images")
    model = parser.add_argument_group("model")
    model.add_argument("--caption_weights", default=blip.DEFAULT_CAPTION_WEIGHTS,
                       help=f"transformers BLIP captioning model: hub id or local folder "
                            f"(default {blip.DEFAULT_CAPTION_WEIGHTS})")
    model.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--beam_search", action="store_true",
                     help="beam search (deterministic); default is nucleus sampling")
    gen.add_argument("--num_beams", type=int, default=1, help="beams for --beam_search (more: better, slower)")
    gen.add_argument("--top_p", type=float, default=0.9, help="top_p of nucleus sampling (default 0.9)")
    gen.add_argument("--max_length", type=int, default=75, help="maximum caption length in tokens (default 75)")
    gen.add_argument("--min_length", type=int, default=5, help="minimum caption length in tokens (default 5)")
    gen.add_argument("--seed", type=int, default=42, help="random seed; same seed, same captions (default 42)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=1, help="images per batch (default 1)")
    run.add_argument("--max_data_loader_n_workers", type=int, default=None,
                     help="threads reading images ahead (default 2)")
    run.add_argument("--caption_extension", default=".caption", help="caption file extension (default .caption)")
    run.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old misspelling
    run.add_argument("--overwrite", action="store_true", help="replace existing caption files (default: skip)")
    run.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    run.add_argument("--debug", action="store_true", help="log each caption")
    return parser


def validate(args: argparse.Namespace) -> None:
    blip.check_weights_argument(args.caption_weights)
    for flag in ("batch_size", "num_beams", "max_length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if not 0 <= args.min_length <= args.max_length:
        raise ValueError(f"--min_length {args.min_length} must be between 0 and --max_length {args.max_length}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p {args.top_p} must be in (0, 1]")


def run(args: argparse.Namespace) -> blip.CaptionResult:
    extension = args.caption_extention or args.caption_extension
    validate(args)
    images = list_images(args.train_data_dir, args.recursive)
    todo = images if args.overwrite else [p for p in images if not sidecar_path(p, extension).exists()]
    logger.info("found %d images in %s; %d to caption", len(images), args.train_data_dir, len(todo))
    if len(todo) < len(images):
        logger.info("%d images already have a %s file and are skipped (--overwrite replaces them)",
                    len(images) - len(todo), extension)
    result = blip.CaptionResult(skipped_existing=len(images) - len(todo))
    if not todo:
        return result
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, processor = blip.load_captioner(args.caption_weights, device)
    opts = blip.GenerationOptions(args.beam_search, args.num_beams, args.top_p, args.max_length, args.min_length)
    workers = 2 if args.max_data_loader_n_workers is None else args.max_data_loader_n_workers
    done = blip.caption_images(todo, model, processor, opts, extension, args.batch_size, workers)
    done.skipped_existing = result.skipped_existing
    report_failures(done.failures)
    logger.info("wrote %d caption files (%s)", done.written, extension)
    return done


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if args.debug:
        logging.getLogger("library.dataprep").setLevel(logging.DEBUG)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
