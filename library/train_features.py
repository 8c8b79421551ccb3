"""The options of the newer training features in one argument group, their up-front checks and ss_* metadata.

Each feature lives in its own module (`networks.loraplus`, `library.loss_functions`, `library.validation`,
`library.ema`, `library.immiscible`, `library.quality_report`); this module only gathers what the command line,
`validate_args` and the metadata need from them, so `library.train_args` calls one function for each.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from library import ema, immiscible, loss_functions, validation


logger = logging.getLogger(__name__)


def add_feature_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training features", "loss types, validation loss, EMA, immiscible noise, "
                                  "masked loss (LoRA+ is a --network_args setting)")
    loss_functions.add_loss_arguments(g)
    validation.add_validation_arguments(g)
    ema.add_ema_arguments(g)
    immiscible.add_immiscible_arguments(g)
    if "--masked_loss" not in g._option_string_actions:
        g.add_argument("--masked_loss", action="store_true",
                       help="weight the loss by mask images (conditioning_data_dir of a subset) or alpha masks")


def validate_feature_args(args: argparse.Namespace) -> None:
    """One-line errors for every feature option (before any model loads)."""
    loss_functions.validate(args)
    validation.validate(args)
    ema.validate(args)
    immiscible.validate(args)


def feature_metadata(args: argparse.Namespace, network_args: dict[str, Any]) -> dict[str, Any]:
    """ss_* keys of the features that change the trained weights."""
    from networks.loraplus import metadata as loraplus_metadata, parse_ratios

    meta: dict[str, Any] = dict(loraplus_metadata(parse_ratios(network_args)))
    meta.update(loss_functions.metadata(args))
    meta.update(ema.metadata(args))
    meta.update(immiscible.metadata(args))
    if getattr(args, "validation_split", 0):
        meta["ss_validation_split"] = str(args.validation_split)  # fewer images trained on
        seed = args.validation_seed if args.validation_seed is not None else args.seed
        meta["ss_validation_seed"] = str(seed)
    if getattr(args, "masked_loss", False):
        meta["ss_masked_loss"] = "True"
    if getattr(args, "ip_noise_gamma_random_strength", False):
        meta["ss_ip_noise_gamma_random_strength"] = "True"
    if getattr(args, "noise_offset_random_strength", False):
        meta["ss_noise_offset_random_strength"] = "True"
    return meta


class TrainingFeatures:
    """The trainer's calls into EMA, validation and the quality report (one object, a few call sites).

    `cache_inputs()` while the VAE / text encoders are loaded, `start(progress)` before the first step (after a
    resume), `after_step` / `after_epoch`, `saving(path, progress)` around each save, `eval_weights()` around
    samples, `save_state(folder)` and `finish(progress)` at the end.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.args = trainer.args
        self.ema: ema.LoRAEMA | None = None
        self.validator: validation.Validator | None = None

    def _net(self) -> Any:
        return self.trainer.accelerator.unwrap_model(self.trainer.network)

    def cache_inputs(self) -> None:
        """Build the held-out batches and cache their latents / text-encoder outputs like the training ones."""
        t, args = self.trainer, self.args
        self.validator = validation.Validator.build(args, t.components.tokenizers, t.sdxl, t.data_config)
        if self.validator is None:
            return
        group = self.validator.group
        if getattr(args, "cache_latents", False):
            with torch.no_grad():
                group.cache_latents(t.components.vae, vae_batch_size=getattr(args, "vae_batch_size", 1),
                                    cache_to_disk=getattr(args, "cache_latents_to_disk", False), progress=False)
        if t.te_cache is not None:
            from library.te_cache import TextEncoderOutputCache

            self.validator.te_cache = TextEncoderOutputCache.build(group, t.components, args, t.device)

    def start(self, progress: Any) -> None:
        self.ema = ema.LoRAEMA.from_args(self.args, self._net())
        if self.ema is not None and self.args.resume:
            self.ema.load(self.args.resume)
        if self.validator is not None and self.args.resume:
            self.validator.load_records(self.args.output_dir, self.args.output_name, progress.global_step)

    def eval_weights(self) -> Any:
        """The weights samples and validation use: the EMA's when it is on."""
        import contextlib

        return self.ema.applied() if self.ema is not None else contextlib.nullcontext()

    def validate(self, progress: Any) -> float | None:
        if self.validator is None:
            return None
        cached = self.validator.loss_at(progress.global_step)
        if cached is not None:
            return cached
        with self.eval_weights():
            loss = self.validator.loss(self.trainer)
        self.validator.record(loss, progress.global_step, progress.epoch)
        t = self.trainer
        if t.accelerator.is_main_process:
            self.validator.write(self.args.output_dir, self.args.output_name)
        if self.args.log_with or self.args.logging_dir:
            t.accelerator.log({"loss/validation": loss}, step=progress.global_step)
        logger.info("validation loss at step %d: %.6f", progress.global_step, loss)
        return loss

    def after_step(self, progress: Any) -> None:
        if self.ema is not None:
            self.ema.update()
        every = self.args.validate_every_n_steps
        if every and progress.global_step % every == 0:
            self.validate(progress)

    def after_epoch(self, epoch: int, progress: Any) -> None:
        every = self.args.validate_every_n_epochs
        if every is None and not self.args.validate_every_n_steps:
            every = 1  # validating and no cadence given: every epoch
        if every and epoch % every == 0:
            self.validate(progress)

    def save_network(self, save: Any, path: str, progress: Any) -> str:
        """Write the LoRA file with `save(path)`: the EMA weights (and the raw ones with --save_ema_and_raw);
        the validation loss of what was saved is recorded for the quality report. Returns the path written
        (another folder when the output folder is full: library.file_io.save_with_fallback)."""
        if self.ema is None:
            path = save(path)
        else:
            if self.args.save_ema_and_raw:
                save(ema.raw_path(path))
            with self.ema.applied():
                path = save(path)
        self.validate(progress)
        return path

    def save_state(self, folder: str) -> None:
        if self.ema is not None and self.trainer.accelerator.is_main_process:
            self.ema.save(folder)

    def finish(self, progress: Any) -> None:
        """Final validation, the printed summary and the quality report of the output folder."""
        if self.validator is not None:
            loss = self.validate(progress)
            print(f"validation loss (step {progress.global_step}): {loss:.6f}")
        if self.trainer.accelerator.is_main_process:
            from library.quality_report import write_report

            write_report(self.args.output_dir, self.args.output_name)
