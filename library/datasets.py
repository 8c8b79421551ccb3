"""Training datasets: images, captions, repeats, regularization balance, buckets and ready-made batches.

`build_dataset_group(args, tokenizers, sdxl)` turns the validated config (library.dataset_config) into a
`DatasetGroup`, a torch Dataset whose items are whole batches (use `make_data_loader`, or a DataLoader with
`batch_size=None, shuffle=False`). `len(group)` is the number of steps per epoch. A batch never mixes buckets.

Epoch arithmetic (as the training guide): an epoch holds every training image `num_repeats` times; the
regularization images of the same `[[datasets]]` are drawn to match that count (first come first, extra ones
unused, fewer ones repeated) and carry `prior_loss_weight`. Each bucket is cut into batches of the dataset's
`batch_size` (the last one may be smaller), so bucketing adds steps.

Randomness (order, captions, flips, crops, color) depends only on (seed, epoch, step position): epoch `e`
of a resumed run is the same as in the first run, and a trainer can skip the first k batches. Epochs count
from 1, as in the original (`caption_dropout_every_n_epochs` drops at epochs n, 2n, ...).

Several processes (`shard(rank, world)`, library.distributed): batches are cut at `world` times the batch size
(one global batch per step, as one process with that batch size) and `__getitem__` returns this process's share
of it. A sample's flips, crops and caption draws, and the seed of its noise (`noise_seeds`), are keyed by
(seed, epoch, batch index, position in the global batch), so they do not depend on the number of processes.
"""
from __future__ import annotations

import argparse
import logging
import math
import multiprocessing
import os
import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from library.buckets import BucketManager, Reso, cover_size, flipped_crop_top_left
from library.captions import process_caption
from library.dataset_config import DataConfig, DatasetConfig, SubsetConfig, load_dataset_config, read_metadata_file
from library.distributed import STREAM_DATA, STREAM_NOISE, sample_seed, shard_bounds
from library.images import IMAGE_EXTENSIONS, SizeCache, list_images, read_image_sizes
from library.loss_masks import uses_mask
from library.training_images import color_augment, load_training_image, to_tensor
from library.text_encoding import tokenize, tokenize_weighted

logger = logging.getLogger(__name__)


@dataclass
class ImageInfo:
    """One image of a subset, with what bucketing and caching decided for it."""

    path: str
    caption: str
    subset: SubsetConfig
    num_repeats: int
    size: tuple[int, int] | None = None  # upright (w, h)
    bucket_reso: Reso | None = None
    resized_size: Reso | None = None
    latents: torch.Tensor | None = None  # in-memory cache (C, h, w)
    latents_flipped: torch.Tensor | None = None
    alpha_mask: torch.Tensor | None = None  # cached alpha mask (H, W)
    npz_path: str | None = None  # valid disk cache
    face: tuple[int, int, int, int] | None = None  # cx, cy, w, h from the file name

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg

    @property
    def cached(self) -> bool:
        return self.latents is not None or self.npz_path is not None


def _read_caption(image_path: str, extension: str, wildcard: bool) -> str | None:
    """The caption file beside the image (also for face-crop names `name_cx_cy_w_h`), or None."""
    base = os.path.splitext(image_path)[0]
    candidates = [base + extension]
    parts = base.split("_")
    if len(parts) >= 5:
        candidates.append("_".join(parts[:-4]) + extension)
    for cap in candidates:
        if os.path.isfile(cap):
            try:
                with open(cap, encoding="utf-8-sig") as f:
                    lines = [line.strip() for line in f.read().splitlines() if line.strip()]
            except UnicodeDecodeError:
                raise ValueError(f"{cap}: caption file is not UTF-8 text") from None
            if not lines:
                raise ValueError(f"{cap}: caption file is empty (write a caption or delete the file)")
            return "\n".join(lines) if wildcard else lines[0]
    return None


def _face_from_name(path: str) -> tuple[int, int, int, int] | None:
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(parts) >= 5 and all(p.isdigit() for p in parts[-4:]):
        cx, cy, w, h = (int(p) for p in parts[-4:])
        return cx, cy, w, h
    return None


def _dreambooth_images(sub: SubsetConfig) -> list[ImageInfo]:
    infos, missing = [], []
    for path in list_images(sub.image_dir):
        caption = _read_caption(path, sub.caption_extension, sub.enable_wildcard)
        if caption is None:
            missing.append(os.path.basename(path))
            caption = sub.class_tokens or ""
        infos.append(ImageInfo(path, caption, sub, sub.num_repeats, face=_face_from_name(path)))
    if missing and (len(missing) < len(infos) or not sub.class_tokens):
        fallback = f"class tokens {sub.class_tokens!r}" if sub.class_tokens else "an empty caption"
        logger.warning("%s: %d of %d images have no %s caption file, using %s (e.g. %s)", sub.where, len(missing),
                       len(infos), sub.caption_extension, fallback, ", ".join(missing[:3]))
    return infos


def _metadata_image_path(key: str, sub: SubsetConfig) -> str | None:
    if os.path.isfile(key):
        return key
    if sub.image_dir is None:
        return None
    direct = os.path.join(sub.image_dir, key)
    if os.path.isfile(direct):
        return direct
    for ext in IMAGE_EXTENSIONS:
        for cand in (direct + ext, direct + ext.upper()):
            if os.path.isfile(cand):
                return cand
    return None


def _finetuning_images(sub: SubsetConfig) -> list[ImageInfo]:
    meta = read_metadata_file(sub.metadata_file, sub.where)
    infos = []
    for key, md in meta.items():
        path = _metadata_image_path(key, sub)
        if path is None:
            raise FileNotFoundError(f"{sub.where}: metadata_file {sub.metadata_file}: image {key!r} not found "
                                    f"(as a path or in image_dir {sub.image_dir})")
        caption, tags = md.get("caption"), md.get("tags")
        if caption is None:
            caption = tags
        elif tags:
            caption = caption + ", " + tags
        info = ImageInfo(path, caption or "", sub, sub.num_repeats)
        reso = md.get("train_resolution")
        if reso is not None:
            if not (isinstance(reso, (list, tuple)) and len(reso) == 2 and all(isinstance(v, int) for v in reso)):
                raise ValueError(f"{sub.where}: metadata_file {sub.metadata_file}: {key!r}: train_resolution "
                                 f"{reso!r}: expected [width, height]")
            info.bucket_reso = (int(reso[0]), int(reso[1]))
        infos.append(info)
    return infos


def _balance_regularization(train: list[ImageInfo], reg: list[ImageInfo]) -> list[ImageInfo]:
    """Draw reg images until they match the training count: extra ones unused, fewer ones repeated."""
    target = sum(i.num_repeats for i in train)
    used: list[ImageInfo] = []
    if not reg or target == 0:
        return used
    n, first = 0, True
    while n < target:
        for info in reg:
            if first:
                used.append(info)
                n += info.num_repeats
            else:
                info.num_repeats += 1
                n += 1
            if n >= target:
                break
        first = False
    return used


class ImageDataset:
    """The images of one `[[datasets]]` table, bucketed."""

    def __init__(self, config: DatasetConfig, sdxl: bool = False, holdout: Any = None, validation: bool = False) -> None:
        self.config = config
        self.sdxl = sdxl
        images: list[ImageInfo] = []
        for sub in config.subsets:
            images += _finetuning_images(sub) if sub.is_finetuning else _dreambooth_images(sub)
        if holdout is not None:  # library.validation.HoldOut: the training part, or the held-out part
            images = holdout.select(images, validation)
        train = [i for i in images if not i.is_reg]
        reg = [i for i in images if i.is_reg]
        if not train:
            raise ValueError(f"{config.where}: only regularization subsets (is_reg = true); add training images")
        used_reg = _balance_regularization(train, reg)
        self.images = train + used_reg
        self.reg_available = {id(s): sum(1 for i in reg if i.subset is s) for s in config.subsets if s.is_reg}
        if len(used_reg) < len(reg):
            logger.info("%s: %d of %d regularization images are used (they only need to match the %d training "
                        "samples)", config.where, len(used_reg), len(reg), sum(i.num_repeats for i in train))
        self._read_sizes()
        self._assign_buckets()

    @property
    def num_train_images(self) -> int:
        return sum(i.num_repeats for i in self.images if not i.is_reg)

    @property
    def num_reg_images(self) -> int:
        return sum(i.num_repeats for i in self.images if i.is_reg)

    def _read_sizes(self) -> None:
        """Upright sizes of every image; `cache_info` subsets remember checked files (images.SizeCache)."""
        caches = {id(s): SizeCache(s.image_dir) for s in self.config.subsets if s.cache_info and s.image_dir}
        todo = []
        for info in self.images:
            cache = caches.get(id(info.subset))
            info.size = cache.get(info.path) if cache else None
            if info.size is None:
                todo.append(info)
        for info, size in zip(todo, read_image_sizes([i.path for i in todo])):
            info.size = size
            if id(info.subset) in caches:
                caches[id(info.subset)].put(info.path, size)
        for cache in caches.values():
            cache.save()

    def _assign_buckets(self) -> None:
        cfg = self.config
        preset = [i.bucket_reso for i in self.images]
        if all(r is not None for r in preset):  # fine tuning metadata with precomputed buckets
            if cfg.bucket_no_upscale:
                raise ValueError(f"{cfg.where}: bucket_no_upscale cannot be used: the metadata file already "
                                 "holds the buckets (train_resolution)")
            self.manager = BucketManager(preset[0], predefined=preset)
            if not cfg.enable_bucket:
                logger.info("%s: the metadata holds the buckets (train_resolution): bucketing enabled", cfg.where)
                cfg.enable_bucket = True
        else:
            if any(r is not None for r in preset):
                logger.warning("%s: only some metadata entries have train_resolution; bucketing all images anew",
                               cfg.where)
                for info in self.images:
                    info.bucket_reso = None
            if cfg.resolution is None:
                raise ValueError(f"{cfg.where}: no resolution and the metadata has no train_resolution for every "
                                 "image; set resolution or --resolution")
            min_steps = 32 if self.sdxl else 64
            if not cfg.enable_bucket and (cfg.resolution[0] % min_steps or cfg.resolution[1] % min_steps):
                raise ValueError(f"{cfg.where}: resolution {cfg.resolution[0]}x{cfg.resolution[1]}: width and height "
                                 f"must be multiples of {min_steps} without bucketing")
            self.manager = BucketManager(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso,
                                         cfg.bucket_reso_steps, cfg.bucket_no_upscale, cfg.enable_bucket)
        self.buckets: dict[Reso, list[int]] = {}
        self.ar_errors = []
        too_small: list[str] = []
        for idx, info in enumerate(self.images):
            if info.bucket_reso is not None:  # the metadata's bucket for this image
                info.resized_size = cover_size(info.size, info.bucket_reso)
                self.ar_errors.append(info.bucket_reso[0] / info.bucket_reso[1] - info.size[0] / info.size[1])
            else:
                try:
                    choice = self.manager.select(*info.size)
                except ValueError as e:  # bucket_no_upscale and an image smaller than one bucket step
                    too_small.append(f"{info.path}: {e}")
                    continue
                info.bucket_reso, info.resized_size = choice.bucket_reso, choice.resized_size
                self.ar_errors.append(choice.ar_error)
            self.buckets.setdefault(info.bucket_reso, []).extend([idx] * info.num_repeats)
        if too_small:
            more = f" (and {len(too_small) - 3} more images)" if len(too_small) > 3 else ""
            raise ValueError(f"{cfg.where}: {len(too_small)} image(s) too small: " + "; ".join(too_small[:3]) + more)

    def batches(self, rng: np.random.Generator, processes: int = 1) -> list[list[int]]:
        """This epoch's (global) batches of image indices, bucket contents shuffled by `rng`."""
        out = []
        bs = self.config.batch_size * processes
        for reso in sorted(self.buckets):
            members = np.array(self.buckets[reso])
            rng.shuffle(members)
            out += [members[k:k + bs].tolist() for k in range(0, len(members), bs)]
        return out

    def num_batches(self, processes: int = 1) -> int:
        return sum(math.ceil(len(m) / (self.config.batch_size * processes)) for m in self.buckets.values())


class DatasetGroup(torch.utils.data.Dataset):
    """All datasets of a run as one torch Dataset of ready batches (see the module docstring)."""

    def __init__(self, datasets: list[ImageDataset], tokenizers: Sequence[Any] | None, *, sdxl: bool = False,
                 seed: int = 0, max_token_length: int | None = None, weighted_captions: bool = False,
                 prior_loss_weight: float = 1.0, source: str = "") -> None:
        self.datasets = datasets
        self.tokenizers = list(tokenizers) if tokenizers else []
        self.sdxl = sdxl
        self.seed = seed
        self.max_token_length = max_token_length
        self.weighted_captions = weighted_captions
        self.prior_loss_weight = prior_loss_weight
        self.source = source
        self.cache_to_disk = False
        self.max_train_steps: int | None = None
        # shared with data loader workers, as the trainer changes them between epochs / steps
        self._epoch = multiprocessing.Value("i", 1)
        self._step = multiprocessing.Value("i", 0)
        self._order: tuple[int, list[tuple[int, list[int]]]] | None = None
        self.rank, self.world = 0, 1
        self.whole_batches = False  # True: __getitem__ returns whole global batches (caching all captions)

    def shard(self, rank: int, world: int) -> None:
        """Process `rank` of `world`: global batches of `world` x batch size, this process trains its share."""
        self.rank, self.world = rank, world
        self._order = None

    # ----------------------------------------------------------------------------------------- counts
    def __len__(self) -> int:
        return sum(ds.num_batches(self.world) for ds in self.datasets)

    @property
    def num_train_images(self) -> int:
        """Training images x repeats: the samples of one epoch without regularization."""
        return sum(ds.num_train_images for ds in self.datasets)

    @property
    def num_reg_images(self) -> int:
        return sum(ds.num_reg_images for ds in self.datasets)

    @property
    def images(self) -> list[ImageInfo]:
        return [i for ds in self.datasets for i in ds.images]

    # ---------------------------------------------------------------------------------------- control
    def set_epoch(self, epoch: int) -> None:
        """Select the 1-based epoch whose batches __getitem__ returns."""
        if epoch < 1:
            raise ValueError(f"set_epoch({epoch}): epochs count from 1 (as caption_dropout_every_n_epochs does)")
        self._epoch.value = epoch

    set_current_epoch = set_epoch

    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_current_step(self, step: int) -> None:
        """The global step (for token warmup)."""
        self._step.value = step

    def set_max_train_steps(self, max_train_steps: int) -> None:
        """Needed when token_warmup_step is a fraction (< 1) of the training steps."""
        self.max_train_steps = max_train_steps

    def verify_bucket_reso_steps(self, min_steps: int) -> None:
        """Raise unless every bucketed dataset's bucket_reso_steps is a multiple of `min_steps` (64 SD, 32 SDXL)."""
        _check_bucket_steps(DataConfig(self.source, [ds.config for ds in self.datasets]), min_steps)

    def epoch_batches(self, epoch: int) -> list[tuple[int, list[int]]]:
        """The (dataset index, image indices) of every batch of `epoch`, in order; depends on (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = [(d, b) for d, ds in enumerate(self.datasets) for b in ds.batches(rng, self.world)]
        return [batches[p] for p in rng.permutation(len(batches))]

    def _batch_order(self) -> list[tuple[int, list[int]]]:
        epoch = self._epoch.value
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.epoch_batches(epoch))
        return self._order[1]

    # ----------------------------------------------------------------------------------------- batches
    def __getitem__(self, index: int) -> dict[str, Any]:
        order = self._batch_order()
        if not 0 <= index < len(order):
            raise IndexError(index)
        d, members = order[index]
        epoch = self._epoch.value
        start, stop = (0, len(members)) if self.whole_batches else shard_bounds(len(members), self.rank, self.world)
        positions = list(range(start, stop)) or [0]  # an empty share trains one padding row with loss weight 0
        rngs = [np.random.default_rng(sample_seed(self.seed, STREAM_DATA, epoch, index, p)) for p in positions]
        batch = self.make_batch(self.datasets[d], [members[p] for p in positions], rngs, epoch, self._step.value)
        batch["noise_seeds"] = torch.tensor([sample_seed(self.seed, STREAM_NOISE, epoch, index, p)
                                             for p in positions], dtype=torch.long)
        batch["global_batch_size"] = len(members)
        if start == stop:
            batch["loss_weights"] = torch.zeros_like(batch["loss_weights"])
        return batch

    def make_batch(self, ds: ImageDataset, members: list[int], rng: np.random.Generator | list[np.random.Generator],
                   epoch: int = 1, step: int = 0, load_images: bool = True) -> dict[str, Any]:
        """Build the batch dict of these images (see docs/design.md for the keys); `rng`: one generator for
        the batch or one per image."""
        from library.latent_cache import load_cached_latents

        infos = [ds.images[i] for i in members]
        rngs = rng if isinstance(rng, list) else [rng] * len(infos)
        caption_rngs = [random.Random(int(r.integers(2**63))) for r in rngs]
        latents, images, alphas, orig, crops, targets, flips = [], [], [], [], [], [], []
        use_bucket_crop = ds.config.enable_bucket
        for info, rng in zip(infos, rngs):
            flip = info.subset.flip_aug and rng.random() < 0.5
            flips.append(flip)
            if info.cached:
                lat, crop, alpha = load_cached_latents(info, flip)
                latents.append(lat)
            else:
                loaded = load_training_image(info, use_bucket_crop, rng)
                img = loaded.image[:, ::-1] if flip else loaded.image
                if info.subset.color_aug:
                    img = color_augment(np.ascontiguousarray(img), rng)
                images.append(to_tensor(np.ascontiguousarray(img)))
                crop = loaded.crop
                alpha = None if loaded.alpha is None else torch.from_numpy(
                    np.ascontiguousarray(loaded.alpha[:, ::-1] if flip else loaded.alpha))
            reso = info.bucket_reso
            top_left = flipped_crop_top_left(crop, reso) if flip else crop.crop_top_left
            orig.append(crop.original_size_hw)
            crops.append(top_left)
            targets.append((reso[1], reso[0]))
            if uses_mask(info.subset):
                alphas.append(alpha if alpha is not None else torch.ones(reso[1], reso[0]))
        captions = [process_caption(i.caption, i.subset.caption_options(), caption_rng, epoch, step,
                                    self.max_train_steps) for i, caption_rng in zip(infos, caption_rngs)]
        batch: dict[str, Any] = {
            "captions": captions,
            "image_paths": [i.path for i in infos],
            "loss_weights": torch.tensor([self.prior_loss_weight if i.is_reg else 1.0 for i in infos]),
            "original_sizes_hw": torch.tensor(orig, dtype=torch.long),
            "crop_top_lefts": torch.tensor(crops, dtype=torch.long),
            "target_sizes_hw": torch.tensor(targets, dtype=torch.long),
            "flipped": flips,
            "bucket_reso": infos[0].bucket_reso,
        }
        if latents and len(latents) != len(infos):
            raise RuntimeError(f"{ds.config.where}: some images of a batch have cached latents and some not")
        if latents:
            batch["latents"] = torch.stack(latents)  # unscaled, as the VAE gives them (the trainer scales)
        else:
            batch["images"] = torch.stack(images)
        if alphas:
            batch["alpha_masks"] = torch.stack(alphas)
        self._add_tokens(batch, captions)
        return batch

    def _add_tokens(self, batch: dict[str, Any], captions: list[str]) -> None:
        if not self.tokenizers:
            return
        if self.weighted_captions:
            pairs = [tokenize_weighted(t, captions, self.max_token_length) for t in self.tokenizers]
            batch["input_ids"] = [p[0] for p in pairs]
            batch["input_weights"] = [p[1] for p in pairs]
        else:
            batch["input_ids"] = [tokenize(t, captions, self.max_token_length) for t in self.tokenizers]

    # ------------------------------------------------------------------------------------------ report
    def describe(self, log: bool = True) -> str:
        """The bucket table and the epoch/step arithmetic (logged, and returned)."""
        lines = [f"dataset: {self.source}"]
        for d, ds in enumerate(self.datasets):
            cfg = ds.config
            mode = "buckets" if cfg.enable_bucket else "fixed resolution"
            res = f"{cfg.resolution[0]}x{cfg.resolution[1]}" if cfg.resolution else "from metadata"
            lines.append(f"[{d}] {cfg.where}: {len(ds.images)} images, resolution {res}, {mode}, "
                         f"batch size {cfg.batch_size}")
            for sub in cfg.subsets:
                used = [i for i in ds.images if i.subset is sub]
                if sub.is_reg:
                    lines.append(f"    reg   {sub.image_dir}: {len(used)} of {ds.reg_available[id(sub)]} images used, "
                                 f"{sum(i.num_repeats for i in used)} samples")
                else:
                    lines.append(f"    train {sub.image_dir or sub.metadata_file}: {len(used)} images x "
                                 f"{sub.num_repeats} repeats")
            lines.append("    bucket      images  batches")
            for reso in sorted(ds.buckets):
                count = len(ds.buckets[reso])
                lines.append(f"    {reso[0]:>4}x{reso[1]:<4} {count:>8} {math.ceil(count / cfg.batch_size):>8}")
            if cfg.enable_bucket and ds.ar_errors:
                lines.append(f"    mean aspect ratio error: {np.mean(np.abs(ds.ar_errors)):.4f}")
        lines.append(f"train images x repeats: {self.num_train_images}, reg images: {self.num_reg_images}, "
                     f"batches (steps) per epoch: {len(self)}")
        text = "\n".join(lines)
        if log:
            logger.info("%s", text)
        return text

    # -------------------------------------------------------------------------------------- latents
    def cache_latents(self, vae: Any, vae_batch_size: int = 1, cache_to_disk: bool = False,
                      device: str | torch.device | None = None, progress: bool = True, processes: Any = None) -> None:
        """Encode every image once (see library.latent_cache); batches then hold `latents` instead of `images`,
        unscaled, as the VAE's latent distribution gives them and the .npz files hold them (the trainer alone
        multiplies every latent, cached or fresh, by the VAE's scaling factor).
        `processes`: accelerate's PartialState, to split the work across processes."""
        from library.latent_cache import cache_group_latents

        self.cache_to_disk = cache_to_disk
        cache_group_latents(self, vae, vae_batch_size, cache_to_disk, device=device, progress=progress,
                            processes=processes)


def build_dataset_group(args: argparse.Namespace, tokenizers: Sequence[Any] | None, sdxl: bool = False,
                        config: DataConfig | None = None, seed: int | None = None) -> DatasetGroup:
    """Validate the dataset options of `args` and build the DatasetGroup (no model needed; reads every image
    once, so a corrupt file fails here, not mid-epoch). `seed`: the run's seed (default --seed, else drawn)."""
    config = config or load_dataset_config(args)
    seed = getattr(args, "seed", None) if seed is None else seed
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
        logger.info("no --seed: the data order uses seed %d", seed)
    max_token_length = getattr(args, "max_token_length", None)
    _check_bucket_steps(config, 32 if sdxl else 64)
    from library.validation import HoldOut

    holdout = HoldOut.from_args(args, config)
    group = DatasetGroup([ImageDataset(ds, sdxl, holdout) for ds in config.datasets], tokenizers, sdxl=sdxl, seed=seed,
                         max_token_length=max_token_length,
                         weighted_captions=bool(getattr(args, "weighted_captions", False)),
                         prior_loss_weight=float(_arg(args, "prior_loss_weight", 1.0)),
                         source=config.source)
    return group  # a trainer sets the run's length (token warmup fractions) from its plan


def _check_bucket_steps(config: DataConfig, min_steps: int) -> None:
    for ds in config.datasets:
        steps = ds.bucket_reso_steps
        if ds.enable_bucket and steps % min_steps:
            raise ValueError(f"{ds.where}: bucket_reso_steps {steps}: must be a multiple of {min_steps} for this "
                             f"model ({'SDXL: 32 or 64' if min_steps == 32 else 'SD1/SD2: 64'})")


def _arg(args: argparse.Namespace, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def make_data_loader(group: DatasetGroup, n_workers: int = 0, persistent: bool = False,
                     skip_batches: int = 0) -> torch.utils.data.DataLoader:
    """A DataLoader over the group's batches in order (its own order is shuffled per epoch by seed).

    `n_workers` is capped at CPU count - 1; `skip_batches` starts the epoch at that batch (resuming).
    """
    workers = max(0, min(n_workers, (os.cpu_count() or 2) - 1))
    return torch.utils.data.DataLoader(group, batch_size=None, shuffle=False, sampler=range(skip_batches, len(group)),
                                       num_workers=workers, persistent_workers=persistent and workers > 0)

