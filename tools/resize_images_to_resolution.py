"""Resize training images to one or more target areas, keeping the originals (kohya-compatible command line).

    python tools/resize_images_to_resolution.py --max_resolution 512x512,384x384,256x256 --save_as_png \
        --copy_associated_files SRC_FOLDER DST_FOLDER

See docs/resize_images_to_resolution.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.dataprep.resize_images import INTERPOLATIONS, parse_resolutions, resize_folder


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Copy each image of SRC to DST together with downscaled copies whose area is at most each "
                    "--max_resolution, named <name>+<WxH>. Images are never upscaled; sources are never modified.")
    parser.add_argument("src_img_folder", help="folder holding the original images")
    parser.add_argument("dst_img_folder", help="folder to write the originals and resized copies to (not SRC)")
    out = parser.add_argument_group("output")
    out.add_argument("--max_resolution", default="512x512,384x384,256x256,128x128",
                     help="comma separated target resolutions WIDTHxHEIGHT; each copy's area is at most W*H "
                          "(default: 512x512,384x384,256x256,128x128)")
    out.add_argument("--divisible_by", type=int, default=1,
                     help="center-crop each copy so width and height are divisible by this (default 1)")
    out.add_argument("--interpolation", choices=INTERPOLATIONS, default="area",
                     help="downscaling filter (default area)")
    out.add_argument("--save_as_png", action="store_true", help="save copies as PNG (default JPEG, quality 100)")
    out.add_argument("--copy_associated_files", action="store_true",
                     help="also copy files with the image's name (captions, tags) under each copy's name")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        resolutions = parse_resolutions(args.max_resolution)
        summary = resize_folder(args.src_img_folder, args.dst_img_folder, resolutions, args.divisible_by,
                                args.interpolation, args.save_as_png, args.copy_associated_files)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    logging.info("%d images: %d resized copies written, %d files copied, %d unreadable, into %s",
                 summary.images, len(summary.written), len(summary.copied), len(summary.failures),
                 args.dst_img_folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
