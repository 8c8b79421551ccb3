"""Assign aspect-ratio buckets to the images of a metadata file and cache their VAE latents as .npz.

    python finetune/prepare_buckets_latents.py --full_path train_data meta_clean.json meta_lat.json model.ckpt \
        --batch_size 4 --max_resolution 512,512 --mixed_precision no

See docs/prepare_buckets_latents.md.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger(__name__)


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Bucket the training images, write train_resolution into the metadata and cache VAE latents "
                    "beside each image (<image name>.npz) in the format the training scripts read.")
    parser.add_argument("train_data_dir", help="folder holding the training images")
    parser.add_argument("in_json", help="metadata JSON to read (from the merge / clean scripts)")
    parser.add_argument("out_json", help="metadata JSON to write (may equal in_json; written atomically)")
    parser.add_argument("model_name_or_path",
                        help="model whose VAE encodes the latents: .safetensors/.ckpt checkpoint, VAE file, or "
                             "Diffusers folder")
    parser.add_argument("--v2", action="store_true", help="not used (kept for command-line compatibility)")
    buckets = parser.add_argument_group("buckets")
    buckets.add_argument("--max_resolution", default="512,512",
                         help="training resolution 'width,height'; no bucket has a larger area (default 512,512)")
    buckets.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    buckets.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    buckets.add_argument("--bucket_reso_steps", type=int, default=64,
                         help="bucket sides are multiples of this (default 64; 32 works for SDXL)")
    buckets.add_argument("--bucket_no_upscale", action="store_true",
                         help="buckets follow the image sizes, never enlarging (min/max_bucket_reso ignored)")
    run = parser.add_argument_group("encoding")
    run.add_argument("--batch_size", type=int, default=1, help="images per VAE batch (default 1)")
    run.add_argument("--max_data_loader_n_workers", type=int, default=None,
                     help="threads loading images ahead (default 2)")
    run.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"],
                     help="VAE precision (default no = float32)")
    run.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    run.add_argument("--flip_aug", action="store_true",
                     help="also cache the latents of the horizontally mirrored image (for flip_aug training)")
    run.add_argument("--skip_existing", action="store_true",
                     help="do not re-encode images whose .npz is already valid for their bucket (and flip)")
    keys = parser.add_argument_group("image keys")
    keys.add_argument("--full_path", action="store_true",
                      help="metadata keys are absolute image paths (as written by the merge scripts' --full_path)")
    keys.add_argument("--recursive", action="store_true", help="also process images in subfolders (needs --full_path)")
    return parser


def validate(args: argparse.Namespace):
    """Everything checkable before the VAE loads; returns the parsed max resolution."""
    from library.dataprep.bucket_latents import parse_max_resolution

    reso = parse_max_resolution(args.max_resolution)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1 (got {args.batch_size})")
    if args.bucket_reso_steps < 8 or args.bucket_reso_steps % 8:
        raise ValueError(f"--bucket_reso_steps {args.bucket_reso_steps} must be a positive multiple of 8 "
                         "(64 default, 32 for SDXL)")
    if args.bucket_reso_steps % 32:
        logger.warning("--bucket_reso_steps %d is not a multiple of 32: SDXL cannot train on these buckets",
                       args.bucket_reso_steps)
    if not args.bucket_no_upscale and not 0 < args.min_bucket_reso <= args.max_bucket_reso:
        raise ValueError(f"--min_bucket_reso {args.min_bucket_reso} must be positive and at most "
                         f"--max_bucket_reso {args.max_bucket_reso}")
    if args.recursive and not args.full_path:
        raise ValueError("--recursive requires --full_path (file names alone are not unique across subfolders)")
    if not Path(args.in_json).is_file():
        raise FileNotFoundError(f"{args.in_json}: metadata file not found (make it with merge_captions_to_metadata.py "
                                "/ merge_dd_tags_to_metadata.py)")
    if not Path(args.model_name_or_path).exists():
        raise FileNotFoundError(f"{args.model_name_or_path}: no such model file or folder")
    return reso


def run(args: argparse.Namespace):
    import torch

    from library.buckets import BucketManager
    from library.dataprep import bucket_latents as bl
    from library.dataprep.metadata import list_images, load_metadata, report_failures, save_metadata
    from library.model_loading import load_vae

    max_reso = validate(args)
    metadata = load_metadata(args.in_json)
    images = list_images(args.train_data_dir, args.recursive)
    logger.info("found %d images in %s; %d metadata entries in %s", len(images), args.train_data_dir,
                len(metadata), args.in_json)
    if args.bucket_no_upscale:
        logger.info("bucket_no_upscale: buckets follow the image sizes; min/max_bucket_reso are not used")
    manager = BucketManager(max_reso, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
                            args.bucket_no_upscale)
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    vae = load_vae(args.model_name_or_path, dtype).to(device).eval()
    result = bl.prepare(images, metadata, vae, manager, full_path=args.full_path,
                        batch_size=args.batch_size, flip_aug=args.flip_aug, skip_existing=args.skip_existing,
                        workers=2 if args.max_data_loader_n_workers is None else args.max_data_loader_n_workers)
    bl.print_bucket_table(result)
    if result.not_in_metadata:
        logger.warning("%d images were not in %s: added with train_resolution only (no caption or tags)",
                       result.not_in_metadata, args.in_json)
    report_failures(result.failures)
    save_metadata(metadata, args.out_json)
    logger.info("wrote %s (%d entries); latents encoded for %d images, %d already valid", args.out_json,
                len(metadata), result.encoded, result.skipped_valid)
    return result


def main(argv: list[str] | None = None) -> int:
    from library.file_io import CheckpointError

    args = setup_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        run(args)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
