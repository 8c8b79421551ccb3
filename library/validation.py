"""Validation loss on held-out images: deterministic, so two LoRAs (or two saves of one run) compare fairly.

The held-out images are a share of each dataset's training images (`--validation_split F`, chosen by
`--validation_seed`, default `--seed`, from the sorted file names) plus every subset marked `validation = true` in
the dataset TOML; none of them is trained on. They are read without augmentation (no flip, colour, random crop,
caption shuffle or dropout) and each image is scored at fixed timesteps spread over the trained range with a
fixed noise of its own (a generator seeded by the validation seed, the image's index and the timestep), with the
network in eval mode (no dropout), in no-grad, inside a forked RNG: the same weights always get the same number
and nothing the validation does changes the training stream. The loss is the training loss (loss type, masks,
SNR weightings) without the random noise options. It is logged as `loss/validation`, written to
`<output_name>.validation.json` in the output folder (read by `library.quality_report`) and printed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

NUM_TIMESTEPS = 4  # each image is scored at this many timesteps spread evenly over the trained range


def add_validation_arguments(group: Any) -> None:
    group.add_argument("--validation_split", type=float, default=0.0,
                       help="hold out this share of each dataset's images for the validation loss (e.g. 0.1)")
    group.add_argument("--validation_seed", type=int, default=None,
                       help="seed of the held-out choice and the validation noise (default --seed)")
    group.add_argument("--validate_every_n_steps", type=int, default=None, help="validation loss every n steps")
    group.add_argument("--validate_every_n_epochs", type=int, default=None,
                       help="validation loss every n epochs (default: every epoch when validating)")
    group.add_argument("--max_validation_steps", type=int, default=None,
                       help="use at most this many validation batches (default all)")


def validate(args: Any) -> None:
    split = getattr(args, "validation_split", 0.0) or 0.0
    if not 0.0 <= split < 1.0:
        raise ValueError(f"--validation_split {split}: expected a share in [0, 1) (e.g. 0.1)")
    for flag in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ValueError(f"--{flag} {value}: must be at least 1")


def validate_split(config: Any, args: argparse.Namespace) -> None:
    """Dataset-level checks: a validation subset is no regularization subset, and something is left to train."""
    for ds in config.datasets:
        for sub in ds.subsets:
            if sub.validation and sub.is_reg:
                raise ValueError(f"{sub.where}: validation = true cannot be used with is_reg = true")
        if all(s.validation or s.is_reg for s in ds.subsets):
            raise ValueError(f"{ds.where}: every subset is validation (or regularization); keep one to train on")
    if HoldOut.from_args(args, config) is None:
        for flag in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps", "validation_seed"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag} needs held-out images: --validation_split (e.g. 0.1) or a subset with "
                                 "validation = true in the dataset config")


class EmptyPart(ValueError):
    """A dataset has no held-out images (it then has no validation part)."""


@dataclasses.dataclass(frozen=True)
class HoldOut:
    """Which images of a dataset are held out: the `validation = true` subsets and a seeded share of the rest."""

    fraction: float
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, config: Any) -> "HoldOut | None":
        fraction = getattr(args, "validation_split", 0.0) or 0.0
        marked = any(s.validation for ds in config.datasets for s in ds.subsets)
        if fraction <= 0 and not marked:
            return None
        seed = getattr(args, "validation_seed", None)
        seed = getattr(args, "seed", None) if seed is None else seed
        return cls(fraction, 0 if seed is None else int(seed))

    def held_out(self, images: list[Any]) -> set[str]:
        """Paths of the held-out images among `images` (one dataset's)."""
        marked = {i.path for i in images if i.subset.validation}
        pool = sorted({i.path for i in images if not i.is_reg and not i.subset.validation})
        count = int(round(self.fraction * len(pool)))
        if self.fraction > 0 and len(pool) >= 2:
            count = min(max(count, 1), len(pool) - 1)
        else:
            count = 0
        order = np.random.default_rng([self.seed, 0x76616C]).permutation(len(pool))
        return marked | {pool[k] for k in order[:count]}

    def select(self, images: list[Any], validation: bool) -> list[Any]:
        """The training part (held-out images removed) or the validation part (each image once, no repeats)."""
        held = self.held_out(images)
        if not validation:
            kept = [i for i in images if i.path not in held]
            if not any(not i.is_reg for i in kept):
                raise ValueError(f"{images[0].subset.where}: every training image is held out for validation; "
                                 "lower --validation_split")
            return kept
        chosen, seen = [], set()
        for info in images:
            if info.path in held and info.path not in seen and not info.is_reg:
                seen.add(info.path)
                chosen.append(dataclasses.replace(info, num_repeats=1))
        if not chosen:
            raise EmptyPart("no held-out images")
        return chosen


_NO_AUGMENTATION = {"flip_aug": False, "color_aug": False, "random_crop": False, "shuffle_caption": False,
                    "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0, "caption_tag_dropout_rate": 0.0,
                    "face_crop_aug_range": None, "token_warmup_step": 0, "num_repeats": 1}


def build_validation_group(args: argparse.Namespace, tokenizers: Any, sdxl: bool, config: Any,
                           holdout: HoldOut) -> Any | None:
    """A DatasetGroup of the held-out images (augmentation off), or None when no dataset holds any out."""
    from library.datasets import DatasetGroup, ImageDataset

    parts = []
    for ds in config.datasets:
        subsets = [dataclasses.replace(s, **_NO_AUGMENTATION) for s in ds.subsets if not s.is_reg]
        try:
            parts.append(ImageDataset(dataclasses.replace(ds, subsets=subsets, where=ds.where + " (validation)"),
                                      sdxl, holdout=holdout, validation=True))
        except EmptyPart:
            continue
    if not parts:
        return None
    return DatasetGroup(parts, tokenizers, sdxl=sdxl, seed=holdout.seed,
                        max_token_length=getattr(args, "max_token_length", None),
                        weighted_captions=bool(getattr(args, "weighted_captions", False)), source=config.source)


def validation_timesteps(args: argparse.Namespace, num_train_timesteps: int) -> list[int]:
    """NUM_TIMESTEPS timesteps spread evenly over [min_timestep, max_timestep)."""
    lo = getattr(args, "min_timestep", None) or 0
    hi = num_train_timesteps if getattr(args, "max_timestep", None) is None else args.max_timestep
    return [int(lo + (hi - lo) * (k + 0.5) / NUM_TIMESTEPS) for k in range(NUM_TIMESTEPS)]


def _image_noise(shape: tuple[int, ...], seed: int, image_index: int, k: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, image_index, k]).generate_state(1)[0]))
    return torch.randn(shape, generator=generator)


class Validator:
    """Scores the trainer's network on the held-out batches (`loss()`), remembers and writes the results."""

    def __init__(self, group: Any, args: argparse.Namespace, seed: int) -> None:
        self.group = group
        self.args = args
        self.seed = seed
        self.te_cache = None
        self.records: list[dict[str, Any]] = []
        count = len(group)
        if args.max_validation_steps:
            count = min(count, args.max_validation_steps)
        self.num_batches = count

    @classmethod
    def build(cls, args: argparse.Namespace, tokenizers: Any, sdxl: bool, config: Any) -> "Validator | None":
        holdout = HoldOut.from_args(args, config)
        if holdout is None:
            return None
        group = build_validation_group(args, tokenizers, sdxl, config, holdout)
        if group is None:
            logger.warning("validation: no dataset has held-out images (too few images for --validation_split)")
            return None
        logger.info("validation: %d held-out images in %d batches", len(group.images), len(group))
        return cls(group, args, holdout.seed)

    def batches(self) -> list[dict[str, Any]]:
        self.group.set_epoch(1)
        return [self.group[i] for i in range(self.num_batches)]

    @torch.no_grad()
    def loss(self, trainer: Any) -> float:
        """The mean validation loss of the trainer's current network weights."""
        net = trainer.accelerator.unwrap_model(trainer.network)
        was_training = net.training
        saved_cache = trainer.te_cache
        timesteps = validation_timesteps(self.args, trainer.noise_scheduler.config.num_train_timesteps)
        total, count, image_index = 0.0, 0, 0
        saved_train_te = trainer.train_te
        with torch.random.fork_rng(devices=[]):
            net.eval()
            trainer.train_te = False  # the text encoders' forward records no graph either
            if self.te_cache is not None:
                trainer.te_cache = self.te_cache
            try:
                for batch in self.batches():
                    latents = trainer.latents(batch)
                    b = latents.shape[0]
                    for k, t in enumerate(timesteps):
                        noise = torch.stack([_image_noise(tuple(latents.shape[1:]), self.seed, image_index + i, k)
                                             for i in range(b)]).to(latents)
                        ts = torch.full((b,), t, dtype=torch.long)
                        noisy = trainer.noise_scheduler.add_noise(latents, noise, ts.to(latents.device))
                        loss = trainer.prediction_loss(batch, latents, noise, noisy, ts.to(trainer.device))
                        total += float(loss) * b
                        count += b
                    image_index += b
            finally:
                trainer.te_cache, trainer.train_te = saved_cache, saved_train_te
                net.train(was_training)
        return total / max(count, 1)

    def record(self, loss: float, step: int, epoch: int) -> None:
        self.records = [r for r in self.records if r["step"] != step] + [{"step": step, "epoch": epoch, "loss": loss}]

    def loss_at(self, step: int) -> float | None:
        for r in self.records:
            if r["step"] == step:
                return r["loss"]
        return None

    def load_records(self, output_dir: str, output_name: str, up_to_step: int) -> None:
        """Resuming: keep the records the interrupted run wrote for steps up to `up_to_step`."""
        path = records_path(output_dir, output_name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                self.records = [r for r in json.load(f).get("records", []) if r["step"] <= up_to_step]

    def write(self, output_dir: str, output_name: str) -> str:
        from library.file_io import atomic_path

        path = records_path(output_dir, output_name)
        os.makedirs(output_dir, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"timesteps": validation_timesteps(self.args, 1000), "records": self.records}, f, indent=1)
        return path


def records_path(output_dir: str, output_name: str) -> str:
    return os.path.join(output_dir, f"{output_name}.validation.json")
