"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py: fill the disk caches before training.

Both take the training script's options (model, dataset, precision), so the caches they write are exactly the
ones a later `train_network.py` / `sdxl_train_network.py` run with `--cache_latents_to_disk` /
`--cache_text_encoder_outputs_to_disk` finds valid and reuses without recomputing. Under `accelerate launch`
(or torchrun) each process encodes its share on its own device and writes its files (library.distributed).
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

logger = logging.getLogger(__name__)


def build_parser(kind: str) -> argparse.ArgumentParser:
    from library import train_args
    from library.dataset_config import add_dataset_arguments

    what = "VAE latents" if kind == "latents" else "text encoder outputs"
    parser = argparse.ArgumentParser(description=f"Cache the {what} of a dataset to disk ahead of training "
                                     "(same options as the training scripts).",
                                     epilog="Every other option of the training scripts is accepted and ignored, so "
                                            "a training command line or --config_file works as it is.")
    g = parser.add_argument_group("cache")
    g.add_argument("--sdxl", action="store_true", help="the model is SDXL")
    g.add_argument("--skip_existing", action="store_true",
                   help="accepted for compatibility: valid cache files are always reused")
    add_dataset_arguments(parser)
    train_args.add_all_training_arguments(parser)
    _hide_unused_options(parser)
    return parser


USED_GROUPS = ("cache", "dataset", "model", "config file", "text encoder output caching")
USED_TRAINING_OPTIONS = ("mixed_precision", "full_fp16", "full_bf16", "clip_skip", "lowram")


def _hide_unused_options(parser: argparse.ArgumentParser) -> None:
    """--help shows what caching uses; the training-only options stay accepted (a training command line works)."""
    for group in parser._action_groups:
        if group.title in USED_GROUPS or group.title in ("options", "positional arguments"):
            continue
        group.description = None
        for action in group._group_actions:
            if action.dest not in USED_TRAINING_OPTIONS:
                action.help = argparse.SUPPRESS


def cache_to_disk(args: argparse.Namespace, kind: str) -> int:
    """Validate, load the model, and write the caches; returns the number of entries computed now."""
    from library import network_trainer, train_args
    from library.dataset_config import load_dataset_config
    from library.datasets import build_dataset_group

    if not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required")
    train_args._exists(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    train_args._exists(args.vae, "--vae")
    config = load_dataset_config(args)
    if kind == "text_encoder_outputs":
        train_args.check_captions_fixed(config)
        if args.weighted_captions:
            raise ValueError("--weighted_captions cannot be cached (as in training with cached outputs)")
    from accelerate import PartialState

    from library.distributed import cpu_only_multiprocess

    processes = PartialState(cpu=cpu_only_multiprocess())  # one process, or this one of a launch
    device = processes.device
    model_dtype, _ = network_trainer.weight_dtypes(args, device)
    components = network_trainer.load_components(args, args.sdxl, torch.float32)
    group = build_dataset_group(args, components.tokenizers, args.sdxl, config=config)
    with torch.no_grad():
        if kind == "latents":
            vae_dtype = torch.float32 if args.no_half_vae or args.sdxl else model_dtype
            components.vae.to(device=device, dtype=vae_dtype)
            started = time.time()
            group.cache_latents(components.vae, vae_batch_size=args.vae_batch_size, cache_to_disk=True,
                                processes=processes)
            written = {i.npz_path for i in group.images if i.npz_path}
            return sum(1 for path in written if os.path.getmtime(path) >= started)
        from library.te_cache import TextEncoderOutputCache

        for te in components.text_encoders:
            te.to(device=device, dtype=model_dtype)
        cache = TextEncoderOutputCache.build(group, components, args, device, to_disk=True, processes=processes)
        return cache.computed


def main(kind: str, argv: list[str] | None = None) -> None:
    from library import train_args

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser(kind)
    try:
        args = train_args.parse_args(parser, argv)
        computed = cache_to_disk(args, kind)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"cached {kind.replace('_', ' ')}: {computed} computed, the rest were valid already")
