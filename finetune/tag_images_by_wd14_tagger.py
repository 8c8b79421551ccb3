"""Tag images with the WD14 tagger (ONNX, onnxruntime) and write one tag file per image.

    python finetune/tag_images_by_wd14_tagger.py --batch_size 4 train_data

See docs/tag_images_by_wd14_tagger.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.dataprep import wd14_tagger as wd14
from library.dataprep.metadata import list_images, report_failures

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Tag images with SmilingWolf's WD14 tagger (ONNX) and write "
                                                 "<image name><caption_extension> beside each image.")
    parser.add_argument("train_data_dir", help="folder holding the images")
    model = parser.add_argument_group("model")
    model.add_argument("--repo_id", default=wd14.DEFAULT_REPO_ID, help=f"Hugging Face repo of the tagger "
                       f"(default {wd14.DEFAULT_REPO_ID})")
    model.add_argument("--model_dir", default="wd14_tagger_model",
                       help="folder for the model: files in <model_dir>/<repo_id with _>/, or directly in "
                            "model_dir (default wd14_tagger_model)")
    model.add_argument("--force_download", action="store_true", help="download the model again")
    model.add_argument("--onnx", action="store_true",
                       help="use the ONNX model (the only backend here; accepted for compatibility)")
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=int, default=1, help="images per inference batch (default 1)")
    run.add_argument("--max_data_loader_n_workers", type=int, default=None,
                     help="threads reading images ahead (default 2)")
    run.add_argument("--recursive", action="store_true", help="also tag images in subfolders")
    run.add_argument("--debug", action="store_true", help="log each image's tags")
    run.add_argument("--frequency_tags", action="store_true", help="print how often each tag was written")
    out = parser.add_argument_group("tags")
    out.add_argument("--thresh", type=float, default=0.35, help="confidence needed to add a tag (default 0.35)")
    out.add_argument("--general_threshold", type=float, default=None,
                     help="threshold for general tags (default: --thresh)")
    out.add_argument("--character_threshold", type=float, default=None,
                     help="threshold for character tags (default: --thresh)")
    out.add_argument("--caption_extension", default=".txt", help="extension of the tag files (default .txt)")
    out.add_argument("--caption_extention", default=None, help=argparse.SUPPRESS)  # kohya's old misspelling
    out.add_argument("--remove_underscore", action="store_true",
                     help="write tags with spaces instead of underscores (long_hair -> long hair)")
    out.add_argument("--undesired_tags", default="", help="comma separated tags never to write")
    out.add_argument("--caption_separator", default=", ", help="separator between tags (default ', ')")
    out.add_argument("--append_tags", action="store_true",
                     help="keep the tags already in an existing tag file and add the new ones after them")
    out.add_argument("--use_rating_tags", action="store_true", help="add the most likely rating tag first")
    out.add_argument("--use_rating_tags_as_last_tag", action="store_true", help="add the rating tag last")
    out.add_argument("--character_tags_first", action="store_true", help="write character tags before general")
    out.add_argument("--always_first_tags", default=None,
                     help="comma separated tags put first when present, e.g. '1girl,1boy'")
    return parser


def tag_options(args: argparse.Namespace) -> wd14.TagOptions:
    def split(text: str | None) -> list[str]:
        return [t.strip() for t in (text or "").split(args.caption_separator.strip() or ",") if t.strip()]

    thresholds = {"--thresh": args.thresh, "--general_threshold": args.general_threshold,
                  "--character_threshold": args.character_threshold}
    for flag, value in thresholds.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} {value} must be between 0 and 1")
    return wd14.TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        remove_underscore=args.remove_underscore, undesired_tags=set(split(args.undesired_tags)),
        separator=args.caption_separator, use_rating_tags=args.use_rating_tags,
        use_rating_tags_as_last_tag=args.use_rating_tags_as_last_tag,
        character_tags_first=args.character_tags_first, always_first_tags=split(args.always_first_tags))


def run(args: argparse.Namespace) -> wd14.TaggingResult:
    extension = args.caption_extention or args.caption_extension
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1 (got {args.batch_size})")
    opts = tag_options(args)
    images = list_images(args.train_data_dir, args.recursive)
    logger.info("found %d images in %s", len(images), args.train_data_dir)
    folder = wd14.ensure_model(args.model_dir, args.repo_id, args.force_download)
    table = wd14.read_tag_table(folder / wd14.TAGS_FILE)
    tagger = wd14.OnnxTagger(folder / wd14.MODEL_FILE, len(table.names))
    if tagger.fixed_batch and tagger.fixed_batch != args.batch_size:
        logger.warning("the model takes batches of %d; using that instead of --batch_size %d", tagger.fixed_batch,
                       args.batch_size)
    workers = 2 if args.max_data_loader_n_workers is None else args.max_data_loader_n_workers
    result = wd14.tag_images(images, tagger, table, opts, extension, args.batch_size, args.append_tags, workers)
    report_failures(result.failures)
    if args.frequency_tags:
        print("Tag frequencies:")
        for tag, n in sorted(result.frequency.items(), key=lambda kv: -kv[1]):
            print(f"{tag}: {n}")
    logger.info("wrote %d tag files (%s)", result.written, extension)
    return result


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
