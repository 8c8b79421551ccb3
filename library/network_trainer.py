"""LoRA network training for SD 1.x / 2.x and SDXL: one trainer, the family picks the differences.

`train(args, sdxl)` is the whole of train_network.py / sdxl_train_network.py: validate, load, cache, train,
save. Memory: frozen weights never get gradients, gradients are freed with `set_to_none`, the VAE and text
encoders are dropped once their outputs are cached and nothing else needs them, and no model is copied.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import time
from collections import deque
from typing import Any

import torch

from library import lr_schedulers, noise, optimizers, train_args, train_metadata, train_state
from library.cpu_threads import apply_default_cpu_threads
from library.malloc_tuning import keep_freed_memory_for_reuse
from library.train_setup import (_allow_fp16_gradient_unscale, _place, create_network, load_components,  # noqa: F401
                                 merge_base_weights, optimizer_groups, parse_network_args, release_memory,
                                 set_attention, weight_dtypes)
from library.trainer_io import OutputNamer, save_network

logger = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """A run stopped early (NaN loss); the message says why and where the last good save is."""


class _Interrupt:
    """SIGINT sets a flag the loop checks after each step (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_Interrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        logger.warning("Ctrl-C: saving the network after this step (press again to abort without saving)")
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class NetworkTrainer:
    """State of one training run; `run()` trains and returns the final file path."""

    def __init__(self, args: argparse.Namespace, sdxl: bool) -> None:
        self.args = args
        self.sdxl = sdxl
        self.train_unet = not args.network_train_text_encoder_only
        self.train_te = not args.network_train_unet_only
        self.loss_window: deque[float] = deque()
        self.last_save: str | None = None
        self.samples: list[str] = []
        self.step_losses: list[float] = []  # loss of the last batch of each optimizer step
        self.interrupted = False
        self.final_path = ""

    # ------------------------------------------------------------------ setup
    def setup(self, components: Any = None) -> None:
        """Everything before the first step; `components` (already built models) skips loading (benchmarks)."""
        from accelerate import Accelerator

        args = self.args
        from library.dataset_config import load_dataset_config

        self.data_config = load_dataset_config(args)  # validates the data before any model loads
        if getattr(args, "cache_text_encoder_outputs", False):
            train_args.check_captions_fixed(self.data_config)
        log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        log_dir = None
        if args.logging_dir:
            log_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        self.accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                                       mixed_precision=args.mixed_precision,
                                       log_with=None if log_with is None else ("all" if log_with == "all" else log_with),
                                       project_dir=log_dir)
        self.device = self.accelerator.device
        if self.device.type == "cpu":  # page faults on every step otherwise (library.malloc_tuning)
            keep_freed_memory_for_reuse()
        apply_default_cpu_threads(self.device)  # one thread unless OMP_NUM_THREADS says otherwise
        if args.seed is not None:
            from accelerate.utils import set_seed

            set_seed(args.seed)
        self.noise_generator = torch.Generator().manual_seed(args.seed if args.seed is not None else
                                                             int(torch.randint(0, 2**31, ()).item()))
        self.model_dtype, self.network_dtype = weight_dtypes(args, self.device)
        # Load straight into the frozen-model precision (no fp32 copy), unless the VAE must stay fp32.
        load_dtype = torch.float32 if args.no_half_vae else self.model_dtype
        self.components = components if components is not None else load_components(args, self.sdxl, load_dtype)
        self.arch = self.components.arch
        self.v_param = bool(args.v_parameterization or self.components.v_parameterization)
        args.v_parameterization = self.v_param
        from library.datasets import build_dataset_group

        self.dataset = build_dataset_group(args, self.components.tokenizers, self.sdxl, config=self.data_config)
        self.dataset.describe()
        self.noise_scheduler = noise.make_noise_scheduler(self.components.scheduler_config, self.v_param,
                                                          args.zero_terminal_snr)
        if args.base_weights:
            merge_base_weights(args, self.components)
        self._freeze_models()
        self._cache_inputs()
        if args.seed is not None:  # the network's init and the training stream must not depend on what was cached
            from accelerate.utils import set_seed

            set_seed(args.seed)
        self.network, self.network_module, self.network_kwargs = create_network(args, self.components)
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        _place(self.network, self.device, self.network_dtype)
        self._build_optimizer()

    def _freeze_models(self) -> None:
        c = self.components
        for model in (c.unet, c.vae, *c.text_encoders):
            if model is not None:
                model.requires_grad_(False).eval()
        _place(c.unet, self.device, self.model_dtype)
        for te in c.text_encoders:
            _place(te, self.device, self.model_dtype)
        set_attention(c.unet, self.args)

    def _cache_inputs(self) -> None:
        """Cache latents (and SDXL text-encoder outputs) then drop the models nothing needs any more."""
        args, c = self.args, self.components
        self.latent_scale = float(c.vae.config.scaling_factor)
        fp32_vae = args.no_half_vae or (self.sdxl and self.model_dtype == torch.float16)  # SDXL's VAE: NaN in fp16
        vae_dtype = torch.float32 if fp32_vae else self.model_dtype
        _place(c.vae, self.device, vae_dtype)
        if getattr(args, "cache_latents", False):
            with torch.no_grad():
                self.dataset.cache_latents(c.vae, vae_batch_size=getattr(args, "vae_batch_size", 1),
                                           cache_to_disk=getattr(args, "cache_latents_to_disk", False))
        self.te_cache = None
        if getattr(args, "cache_text_encoder_outputs", False) or self._te_outputs_fixed():
            from library.te_cache import TextEncoderOutputCache

            self.te_cache = TextEncoderOutputCache.build(self.dataset, c, args, self.device,
                                                         to_disk=getattr(args, "cache_text_encoder_outputs_to_disk", False))
        sampling = bool(args.sample_prompts and (args.sample_every_n_steps or args.sample_every_n_epochs
                                                  or args.sample_at_first))
        if getattr(args, "cache_latents", False) and not sampling:
            c.vae = None
        if self.te_cache is not None and not sampling:
            c.text_encoders = [None] * len(c.text_encoders)
        release_memory()

    def _te_outputs_fixed(self) -> bool:
        """U-Net-only training on cached latents with captions that never change: the text encoders' outputs
        are constants, so they are cached automatically (same results, less memory and time)."""
        args = self.args
        if not (args.network_train_unet_only and getattr(args, "cache_latents", False)) or args.weighted_captions:
            return False
        try:
            train_args.check_captions_fixed(self.data_config)
        except ValueError:
            return False
        logger.info("U-Net-only training with fixed captions: caching the text encoder outputs")
        return True

    def _enable_gradient_checkpointing(self) -> None:
        c = self.components
        c.unet.enable_gradient_checkpointing()
        c.unet.train()  # diffusers checkpoints only in training mode; dropout is 0 in SD U-Nets
        if self.train_te:
            for te in c.text_encoders:
                if te is not None:
                    if hasattr(te, "activation_checkpointing_enable"):  # transformers 5 name
                        te.activation_checkpointing_enable({"use_reentrant": False})
                    else:
                        te.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                    te.train()
        if hasattr(self.network, "enable_gradient_checkpointing"):
            self.network.enable_gradient_checkpointing()

    def _build_optimizer(self) -> None:
        args = self.args
        groups = optimizer_groups(self.network, args)
        result = optimizers.build_optimizer(train_args.optimizer_name(args), groups, args.learning_rate,
                                            args.optimizer_args, args.max_grad_norm, args.lr_scheduler)
        self.optimizer_result = result
        self.steps_per_epoch = math.ceil(len(self.dataset) / args.gradient_accumulation_steps)
        if args.max_train_epochs:
            args.max_train_steps = args.max_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(args.max_train_steps / self.steps_per_epoch)
        if args.save_n_epoch_ratio:
            args.save_every_n_epochs = max(1, self.num_epochs // args.save_n_epoch_ratio)
        name = result.scheduler_override or args.lr_scheduler_type or args.lr_scheduler
        scheduler = lr_schedulers.build_scheduler(
            name, result.optimizer, args.max_train_steps * self.accelerator.num_processes,
            args.lr_warmup_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_args,
            initial_lr=result.initial_lr, min_lr_ratio=args.lr_scheduler_min_lr_ratio, decay_steps=args.lr_decay_steps,
            timescale=args.lr_scheduler_timescale)
        if args.full_fp16:
            _allow_fp16_gradient_unscale(self.accelerator)
        self.network, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.network, result.optimizer,
                                                                                   scheduler)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ data
    def batches(self, epoch: int, skip: int):
        """The batches of `epoch` (order fixed by seed and epoch), skipping the first `skip` (resume)."""
        from library.datasets import make_data_loader

        self.dataset.set_epoch(epoch + 1)  # shared with the loader's worker processes
        args = self.args
        if args.persistent_data_loader_workers and skip == 0:  # one loader, its workers kept between epochs
            if getattr(self, "_persistent_loader", None) is None:
                self._persistent_loader = make_data_loader(self.dataset, args.max_data_loader_n_workers, True)
            loader = self._persistent_loader
        else:
            loader = make_data_loader(self.dataset, args.max_data_loader_n_workers, False, skip_batches=skip)
        with torch.random.fork_rng(devices=[]):  # the iterator draws a seed: keep the training stream unchanged
            return iter(loader)

    # ------------------------------------------------------------------ loss
    def conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.te_cache is not None:
            return self.te_cache.lookup(batch, self.device, self.model_dtype)
        from library.text_encoding import encode_tokens

        c, args = self.components, self.args
        ids = [t.to(self.device) for t in batch["input_ids"]]
        weights = batch.get("input_weights") if args.weighted_captions else None
        if weights is not None:
            weights = [w.to(self.device) for w in weights] if isinstance(weights, (list, tuple)) else weights.to(self.device)
        with torch.set_grad_enabled(self.train_te), self.accelerator.autocast():
            return encode_tokens(c.text_encoders, ids, args.clip_skip, self.sdxl, weights, tokenizers=c.tokenizers,
                                 max_token_length=args.max_token_length)

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scaled latents of the batch: cached ones (the dataset already applies the VAE's scaling factor;
        the .npz files hold them unscaled, as sd-scripts) or encoded now."""
        if batch.get("latents") is not None:
            return batch["latents"].to(self.device, dtype=torch.float32)
        vae = self.components.vae
        with torch.no_grad():
            images = batch["images"].to(self.device, dtype=next(vae.parameters()).dtype)
            latents = vae.encode(images).latent_dist.sample()
        if not torch.isfinite(latents).all():
            raise TrainingStopped("the VAE produced NaN latents (use --no_half_vae)")
        return latents.float() * self.latent_scale

    def time_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        parts = [batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]]
        return torch.cat([torch.as_tensor(p).reshape(-1, 2) for p in parts], dim=1).to(self.device, torch.float32)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        args = self.args
        latents = self.latents(batch)
        hidden, pooled = self.conditioning(batch)
        noise_t, noisy, timesteps = noise.sample_noise_and_timesteps(
            latents, self.noise_scheduler, noise.NoiseSettings.from_args(args), self.noise_generator)
        timesteps = timesteps.to(self.device)
        kwargs = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.model_dtype),
                                           "time_ids": self.time_ids(batch).to(self.model_dtype)}
        with self.accelerator.autocast():
            pred = self.components.unet(noisy.to(self.model_dtype), timesteps, hidden.to(self.model_dtype),
                                        **kwargs).sample
        target = noise.training_target(latents, noise_t, timesteps, self.noise_scheduler, self.v_param)
        elementwise = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
        masks = batch.get("alpha_masks")
        if masks is not None:  # --alpha_mask: transparent pixels do not count (mask at latent resolution)
            masks = torch.nn.functional.interpolate(masks.to(elementwise).unsqueeze(1),
                                                    size=elementwise.shape[2:], mode="area")
            elementwise = elementwise * masks
        per_sample = elementwise.mean(dim=(1, 2, 3))
        weights = batch.get("loss_weights")
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample)
        return noise.weight_loss(per_sample, timesteps, self.noise_scheduler, args).mean()

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        args = self.args
        namer = OutputNamer(args.output_dir, args.output_name, args.save_model_as)
        progress = train_state.Progress()
        if args.resume:
            progress = train_state.load_state(args.resume, network=self.accelerator.unwrap_model(self.network),
                                              optimizer=self.optimizer, scheduler=self.lr_scheduler,
                                              noise_generator=self.noise_generator, scaler=self.accelerator.scaler)
            logger.info("resumed from %s at epoch %d, step %d", args.resume, progress.epoch + 1, progress.global_step)
        self.progress = progress
        self.namer = namer
        self.metadata = self._metadata()
        if self.accelerator.is_main_process and (args.log_with or args.logging_dir):
            init_kwargs = {}
            if args.log_tracker_config:
                import toml

                init_kwargs = toml.load(args.log_tracker_config)
            if args.wandb_run_name:
                init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
            self.accelerator.init_trackers(args.log_tracker_name or "network_train", init_kwargs=init_kwargs,
                                           config=train_args.tracker_config(args) if args.log_config else None)
        logger.info("training: %d batches per epoch, %d epochs, %d steps, %d trainable tensors",
                    len(self.dataset), self.num_epochs, args.max_train_steps, len(self.trainable))
        from tqdm import tqdm

        self.bar = tqdm(total=args.max_train_steps, initial=progress.global_step, desc="steps", smoothing=0,
                        disable=not self.accelerator.is_local_main_process)
        if args.sample_at_first and progress.global_step == 0:
            self.sample(0, None)
        with _Interrupt() as interrupt:
            self._loop(progress, interrupt)
        self.bar.close()
        if interrupt.requested:
            return self.last_save or ""
        path = self.save(namer.final(), progress)
        if args.save_state or args.save_state_on_train_end:
            self.save_state(namer.state_final(), progress)
        self.accelerator.end_training()
        return path

    def _loop(self, progress: train_state.Progress, interrupt: _Interrupt) -> None:
        args = self.args
        for epoch in range(progress.epoch, self.num_epochs):
            progress.epoch = epoch
            net = self.accelerator.unwrap_model(self.network)
            if hasattr(net, "on_epoch_start"):
                net.on_epoch_start(self.components.text_encoder, self.components.unet)
            for batch in self.batches(epoch, progress.batches_in_epoch):
                self.dataset.set_current_step(progress.global_step)
                synced = self.step(batch, progress)
                progress.batches_in_epoch += 1
                if not synced:
                    continue
                self.after_step(progress)
                if interrupt.requested:
                    self.save_interrupted(progress)
                    return
                if progress.global_step >= args.max_train_steps:
                    break
            if progress.global_step >= args.max_train_steps and progress.batches_in_epoch < len(self.dataset):
                return
            progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            self.after_epoch(epoch + 1, progress)
            if progress.global_step >= args.max_train_steps:
                return

    def step(self, batch: dict[str, Any], progress: train_state.Progress) -> bool:
        """Forward and backward one batch; step the optimizer at the end of an accumulation group or epoch."""
        args = self.args
        position = progress.batches_in_epoch + 1
        sync = position % args.gradient_accumulation_steps == 0 or position == len(self.dataset)
        self.accelerator.gradient_state._set_sync_gradients(sync)  # as accumulate() does, but epochs end groups
        net = self.accelerator.unwrap_model(self.network)
        if hasattr(net, "on_step_start"):
            net.on_step_start(self.components.text_encoder, self.components.unet)
        with contextlib.nullcontext() if sync else self.accelerator.no_sync(self.network):
            loss = self.loss(batch)
            if not torch.isfinite(loss):
                raise TrainingStopped(f"loss is {loss.item()} at step {progress.global_step + 1} (epoch "
                                      f"{progress.epoch + 1}); stopped without saving. Last good save: "
                                      f"{self.last_save or 'none'}")
            self.accelerator.backward(loss)  # divides by gradient_accumulation_steps
        if sync:
            if args.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.trainable, args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.loss_window.append(loss.item())
        if len(self.loss_window) > len(self.dataset):
            self.loss_window.popleft()
        return sync

    def after_step(self, progress: train_state.Progress) -> None:
        args = self.args
        progress.global_step += 1
        logs = {"loss/current": self.loss_window[-1],
                "loss/average": sum(self.loss_window) / len(self.loss_window)}
        if args.scale_weight_norms:
            net = self.accelerator.unwrap_model(self.network)
            scaled, mean_norm, max_norm = net.apply_max_norm_regularization(args.scale_weight_norms, self.device)
            logs.update({"max_norm/keys_scaled": scaled, "max_norm/average_key_norm": mean_norm,
                         "max_norm/max_key_norm": max_norm})
        logs.update(self.lr_logs())
        self.bar.update(1)
        self.bar.set_postfix(epoch=progress.epoch + 1, loss=f"{logs['loss/average']:.4f}")
        if args.log_with or args.logging_dir:
            self.accelerator.log(logs, step=progress.global_step)
        self.step_losses.append(logs["loss/current"])
        if args.sample_every_n_steps and not args.sample_every_n_epochs and \
                progress.global_step % args.sample_every_n_steps == 0:
            self.sample(progress.global_step, None)
        if args.save_every_n_steps and progress.global_step % args.save_every_n_steps == 0 \
                and progress.global_step < args.max_train_steps:
            self.save(self.namer.step(progress.global_step), progress)
            if args.save_state:
                self.save_state(self.namer.step_state(progress.global_step), progress)
            self.namer.prune_steps(progress.global_step, args.save_every_n_steps, args.save_last_n_steps,
                                   args.save_last_n_steps_state)

    def after_epoch(self, epoch: int, progress: train_state.Progress) -> None:
        args = self.args
        if args.save_every_n_epochs and epoch % args.save_every_n_epochs == 0 and epoch < self.num_epochs:
            self.save(self.namer.epoch(epoch), progress)
            if args.save_state:
                self.save_state(self.namer.epoch_state(epoch), progress)
            self.namer.prune_epochs(epoch, args.save_every_n_epochs, args.save_last_n_epochs,
                                    args.save_last_n_epochs_state)
        if args.sample_every_n_epochs and epoch % args.sample_every_n_epochs == 0:
            self.sample(progress.global_step, epoch)

    def lr_logs(self) -> dict[str, float]:
        names = getattr(self.accelerator.unwrap_model(self.network), "lr_descriptions", None) or []
        if len(names) != len(self.optimizer.param_groups):
            names = _group_names(self.optimizer.param_groups, self.train_te, self.train_unet)
        logs = {f"lr/{n}": float(g["lr"] or 0.0) for n, g in zip(names, self.optimizer.param_groups)}
        if optimizers.is_adaptive(train_args.optimizer_name(self.args)):
            for n, value in zip(names, optimizers.effective_lrs(self.optimizer)):
                logs[f"lr/d*lr/{n}"] = value
        return logs

    # ------------------------------------------------------------------ outputs
    def _metadata(self) -> dict[str, str]:
        return train_metadata.training_metadata(
            self.args, arch=self.arch, v_parameterization=self.v_param, dataset=self.dataset,
            num_batches_per_epoch=len(self.dataset), num_epochs=self.num_epochs,
            optimizer_text=f"{self.optimizer_result.name}({self.optimizer_result.args_text})",
            network_args=self.network_kwargs, started_at=time.time())

    def save(self, path: str, progress: train_state.Progress) -> str:
        meta = train_metadata.at_save(self.metadata, progress.global_step, progress.epoch, self.args.no_metadata)
        dtype = _save_dtype(self.args.save_precision)
        if self.accelerator.is_main_process:
            save_network(self.accelerator.unwrap_model(self.network), path, dtype, meta)
            logger.info("saved %s", path)
        self.last_save = path
        return path

    def save_state(self, folder: str, progress: train_state.Progress) -> None:
        if self.accelerator.is_main_process:
            train_state.save_state(folder, network=self.accelerator.unwrap_model(self.network),
                                   optimizer=self.optimizer, scheduler=self.lr_scheduler, progress=progress,
                                   noise_generator=self.noise_generator, scaler=self.accelerator.scaler)
            logger.info("saved training state %s", folder)

    def save_interrupted(self, progress: train_state.Progress) -> None:
        path = self.save(self.namer.step(progress.global_step), progress)
        if self.args.save_state:
            self.save_state(self.namer.step_state(progress.global_step), progress)
        self.interrupted = True
        logger.warning("interrupted at step %d: saved %s", progress.global_step, path)

    def sample(self, step: int, epoch: int | None) -> None:
        args = self.args
        if not args.sample_prompts or not self.accelerator.is_main_process:
            return
        from library.sampling import sample_images

        autocast = self.model_dtype if self.model_dtype != torch.float32 else None
        # passing the (already applied) network puts it in eval mode while sampling: no dropout in samples
        paths = sample_images(self.components, args.sample_prompts, args.output_dir, step, epoch,
                              args.sample_sampler, output_name=args.output_name, device=self.device,
                              clip_skip=args.clip_skip, autocast_dtype=autocast,
                              networks=[self.accelerator.unwrap_model(self.network)])
        self.samples.extend(paths)


def _group_names(groups: list[dict[str, Any]], train_te: bool, train_unet: bool) -> list[str]:
    if len(groups) == 1:
        return ["unet" if train_unet and not train_te else "textencoder" if train_te and not train_unet else "all"]
    if len(groups) == 2 and train_te and train_unet:
        return ["textencoder", "unet"]
    return [f"group{i}" for i in range(len(groups))]


def _save_dtype(name: str | None) -> torch.dtype | None:
    from library.file_io import precision_dtype

    return precision_dtype(name)


def train(args: argparse.Namespace, sdxl: bool = False) -> NetworkTrainer:
    """Validate, set up and run a training; returns the trainer (its `final_path`, `samples`, ...)."""
    if getattr(args, "debug_dataset", False):  # the dataset options and a tokenizer only (library.dataset_debug)
        from library.dataset_debug import run_debug_dataset

        run_debug_dataset(args, sdxl)
        return NetworkTrainer(args, sdxl)
    train_args.validate_args(args, sdxl=sdxl)
    if args.output_name is None:
        args.output_name = "last"
    if args.output_dir is None:
        raise ValueError("--output_dir is required (folder for the LoRA files)")
    if sdxl and getattr(args, "resolution", None) is None:
        args.resolution = "1024,1024"  # SDXL's native size (a dataset TOML's resolution wins)
    if sdxl and not args.network_train_unet_only:
        logger.warning("training LoRA on both SDXL text encoders: results are often unexpected; "
                       "--network_train_unet_only is recommended")
    trainer = NetworkTrainer(args, sdxl)
    trainer.setup()
    trainer.final_path = trainer.run()
    return trainer


def main(argv: list[str] | None = None, sdxl: bool = False) -> None:
    """Entry point of train_network.py / sdxl_train_network.py."""
    from library.dataset_config import add_dataset_arguments

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=("SDXL " if sdxl else "") + "LoRA network training "
                                     "(kohya sd-scripts compatible)")
    add_dataset_arguments(parser)
    train_args.add_all_training_arguments(parser)
    try:
        args = train_args.parse_args(parser, argv)
        trainer = train(args, sdxl)
    except (ValueError, FileNotFoundError, FloatingPointError, TrainingStopped) as e:
        raise SystemExit(f"error: {e}") from None
    if trainer.final_path:
        print(f"LoRA saved: {os.path.abspath(trainer.final_path)}")
    if trainer.samples:
        print(f"sample images: {os.path.abspath(os.path.dirname(trainer.samples[0]))}")
    if trainer.interrupted:
        raise SystemExit(130)
