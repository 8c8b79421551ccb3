"""The two merge scripts (captions -> `caption`, tags -> `tags`): one parser and one run, parameterised by field.

Rules (the guide's): the output starts from `--in_json`, or, when `--in_json` is omitted and the output file
exists, from the output file itself; otherwise from an empty object. Every entry of that input is kept; images
with a text file get their field set (added or overwritten); images without one are listed and left alone.
"""
from __future__ import annotations

import argparse
import logging

from library.dataprep.metadata import (find_key, list_images, load_metadata, merge_text_files, resolve_in_json,
                                       save_metadata)

logger = logging.getLogger(__name__)


def build_parser(field_name: str, default_extension: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("train_data_dir", help="folder holding the training images and their text files")
    parser.add_argument("out_json", help="metadata JSON to write (read first when --in_json is omitted and it exists)")
    parser.add_argument("--in_json", default=None,
                        help="metadata JSON to start from (default: out_json if it exists); never modified "
                             "unless it is also out_json")
    parser.add_argument("--caption_extension", default=default_extension,
                        help=f"extension of the {field_name} files (default {default_extension})")
    parser.add_argument("--caption_extention", dest="caption_extension_legacy", default=None,
                        help=argparse.SUPPRESS)  # kohya's old misspelling, still accepted
    parser.add_argument("--full_path", action="store_true",
                        help="key entries by the image's absolute path (needed for several folders in one file)")
    parser.add_argument("--recursive", action="store_true",
                        help="also read images in subfolders (requires --full_path)")
    parser.add_argument("--debug", action="store_true", help="log each key and its text")
    return parser


def run(args: argparse.Namespace, field_name: str) -> dict:
    """Merge and write; returns the written metadata. Errors are ValueError/FileNotFoundError with one-line text."""
    extension = args.caption_extension_legacy or args.caption_extension
    if not extension.startswith("."):
        raise ValueError(f"--caption_extension {extension!r} must start with a dot (e.g. .caption, .txt)")
    if args.recursive and not args.full_path:
        raise ValueError("--recursive requires --full_path (file names alone are not unique across subfolders)")
    images = list_images(args.train_data_dir, args.recursive)
    logger.info("found %d images in %s", len(images), args.train_data_dir)

    source = resolve_in_json(args.in_json, args.out_json)
    if source is not None:
        metadata = load_metadata(source)
        logger.info("read %d entries from %s; %s of these images will be replaced", len(metadata), source,
                    field_name)
    else:
        metadata = {}
        logger.info("creating new metadata %s", args.out_json)
    before = len(metadata)
    result = merge_text_files(metadata, images, extension, field_name, args.full_path)
    if args.debug:
        for image in images:
            key = find_key(metadata, image, args.full_path)
            logger.info("%s: %s", key, metadata.get(key, {}).get(field_name))
    if result.missing:
        logger.warning("%d images have no %s file and were left as they were, e.g. %s", len(result.missing),
                       extension, result.missing[0])
    assert len(metadata) >= before  # nothing is ever removed
    save_metadata(metadata, args.out_json)
    logger.info("wrote %s: %d entries (%d new, %d %s set)", args.out_json, len(metadata), result.added,
                result.updated, field_name)
    return metadata


def main(argv: list[str] | None, field_name: str, default_extension: str, description: str) -> int:
    args = build_parser(field_name, default_extension, description).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        run(args, field_name)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0
