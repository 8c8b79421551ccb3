"""Clean the captions and tags of a fine-tuning metadata JSON (rules in library/dataprep/clean_tags.py).

    python finetune/clean_captions_and_tags.py meta_cap_dd.json meta_clean.json

See docs/clean_captions_and_tags.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.dataprep.clean_tags import clean_metadata
from library.dataprep.metadata import load_metadata, save_metadata

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Clean every caption and tag list of a metadata JSON: underscores, rating tags, duplicate "
                    "tags, ambiguous per-person tags, caption wording (girl/woman/lady variants).")
    parser.add_argument("in_json", help="metadata JSON to read")
    parser.add_argument("out_json", help="metadata JSON to write (may equal in_json; written atomically)")
    parser.add_argument("--debug", action="store_true", help="log each change (FROM / TO)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = setup_parser()
    args, unknown = parser.parse_known_args(argv)
    if len(unknown) == 1 and not unknown[0].startswith("-"):
        # Old form `train_data_dir in_json out_json`: the folder is no longer needed.
        logger.warning("the train_data_dir argument is no longer used; give only in_json and out_json")
        args.in_json, args.out_json = args.out_json, unknown[0]
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        metadata = load_metadata(args.in_json)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    without_tags = sum(1 for v in metadata.values() if "tags" not in v)
    without_caption = sum(1 for v in metadata.values() if "caption" not in v)
    if without_tags or without_caption:
        logger.info("%d entries have no tags and %d no caption (left as they are)", without_tags, without_caption)
    tags_changed, captions_changed = clean_metadata(metadata, args.debug)
    save_metadata(metadata, args.out_json)
    logger.info("wrote %s: %d entries, %d tag lists and %d captions changed", args.out_json, len(metadata),
                tags_changed, captions_changed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
