"""LoRA network training for SD 1.x / 2.x and SDXL: one trainer, the family picks the differences.

`train(args, sdxl)` is the whole of train_network.py / sdxl_train_network.py: validate, load, cache, train,
save. Memory: frozen weights never get gradients, gradients are freed with `set_to_none`, the VAE and text
encoders are dropped once their outputs are cached and nothing else needs them, and no model is copied.

Several processes (accelerate launch / torchrun, see docs/distributed.md and library.distributed): each step's
global batch is split across the processes, the module that runs the loss is the one DDP wraps, gradients are
averaged over the whole global batch, and only the main process writes files.
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

from library import (distributed, loss_functions, lr_schedulers, noise, optimizers, preflight, train_args,
                     train_metadata, train_state)
from library.cpu_threads import apply_default_cpu_threads
from library.malloc_tuning import keep_freed_memory_for_reuse
from library.precision import Precision
from library.run_plan import RunPlan
from library.train_features import TrainingFeatures
from library.train_setup import (_place, create_network, load_components,  # noqa: F401
                                 merge_base_weights, optimizer_groups, parse_network_args, release_memory,
                                 set_attention, weight_dtypes)
from library.trainer_io import OutputNamer, count_nonfinite, save_network

logger = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """A run stopped early (NaN loss); the message says why and where the last good save is."""


NONFINITE_CAUSES = ("likely causes: a learning rate too high (--learning_rate / --unet_lr / --text_encoder_lr), "
                    "fp16 without --no_half_vae (NaN latents), --full_fp16 (overflow, or AdamW's eps 1e-8 "
                    "being 0 in fp16: --optimizer_args eps=1e-4), extreme loss weights")


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
        self.stop_requested = False  # several processes: Ctrl-C in any of them, agreed by all (global_loss)
        self._interrupt: _Interrupt | None = None
        self.final_path = ""
        self.skipped_steps = 0  # optimizer steps the fp16 grad scaler skipped (not failures)

    # ------------------------------------------------------------------ setup
    def setup(self, components: Any = None) -> None:
        """Everything before the first step; `components` (already built models) skips loading (benchmarks)."""
        from accelerate import Accelerator

        args = self.args
        from library.dataset_config import load_dataset_config

        self.data_config = load_dataset_config(args)  # validates the data before any model loads
        if getattr(args, "cache_text_encoder_outputs", False):
            train_args.check_captions_fixed(self.data_config)
        self.cache_te_outputs = getattr(args, "cache_text_encoder_outputs", False) or self._te_outputs_fixed()
        log_with = args.log_with or ("tensorboard" if args.logging_dir else None)
        log_dir = None
        if args.logging_dir:
            log_dir = os.path.join(args.logging_dir, (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))
        # Gradient accumulation is step()'s own (an epoch's last batch also ends a group, which accelerate's
        # counter cannot know without its own data loader); the scheduler counts optimizer steps, once each.
        self.accelerator = Accelerator(mixed_precision="no",  # autocast and grad scaler: self.precision
                                       log_with=None if log_with is None else ("all" if log_with == "all" else log_with),
                                       project_dir=log_dir, step_scheduler_with_optimizer=False,
                                       cpu=distributed.cpu_only_multiprocess(),
                                       kwargs_handlers=distributed.accelerator_kwargs(args))
        self.device = self.accelerator.device
        self.precision = Precision(args.mixed_precision, self.device, args.full_fp16)
        from library.performance_args import check_device_options

        check_device_options(args, self.device)  # fp8, compile backend: before any model loads
        if self.device.type == "cpu":  # page faults on every step otherwise (library.malloc_tuning)
            keep_freed_memory_for_reuse()
        apply_default_cpu_threads(self.device)  # logs the count; the short OpenMP spin is set by library/__init__
        if not self.accelerator.is_main_process:
            logging.getLogger("library").setLevel(logging.WARNING)  # one copy of the run's log
        from accelerate.utils import set_seed

        stored = train_state.read_progress(args.resume).get("seed") if args.resume else None
        self.seed = distributed.resolve_run_seed(args.seed, stored, self.accelerator)
        set_seed(self.seed)
        self.model_dtype, self.network_dtype = weight_dtypes(args, self.device)
        # Load straight into the frozen-model precision (no fp32 copy), unless the VAE must stay fp32.
        load_dtype = torch.float32 if args.no_half_vae else self.model_dtype
        # the U-Net is read after caching when nothing else needs the VAE and text encoders by then: the peak
        # memory is then the larger of the two sets, not their sum (SDXL fp32 on CPU: 14.3 -> 11.9 GiB)
        self.components = components if components is not None else load_components(
            args, self.sdxl, load_dtype, defer_unet=self._unet_can_wait())
        self.arch = self.components.arch
        self.v_param = bool(args.v_parameterization or self.components.v_parameterization)
        from library.datasets import build_dataset_group

        self.dataset = build_dataset_group(args, self.components.tokenizers, self.sdxl, config=self.data_config,
                                           seed=self.seed)
        self.dataset.shard(self.accelerator.process_index, self.accelerator.num_processes)
        self.dataset.describe()
        self.noise_scheduler = noise.make_noise_scheduler(self.components.scheduler_config, self.v_param,
                                                          args.zero_terminal_snr)
        if args.base_weights:
            merge_base_weights(args, self.components)
        self._freeze_models()
        self.features = TrainingFeatures(self)  # EMA, validation loss, quality report (library.train_features)
        self._cache_inputs()
        if self.components.load_unet is not None:
            self.components.unet, self.components.load_unet = self.components.load_unet(), None
            self._freeze_unet()
        set_seed(self.seed)  # the network's init must not depend on what was cached; the same in every process
        self.network, self.network_module, self.network_kwargs = create_network(args, self.components)
        if args.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        _place(self.network, self.device, self.network_dtype)
        if getattr(args, "blocks_to_swap", None):  # frozen weights of the last blocks to CPU memory
            from library.block_swap import apply_block_swap

            self.block_swap = apply_block_swap(self.components.unet, args.blocks_to_swap, self.device)
        if getattr(args, "torch_compile", False):  # after the LoRA hooks: they are traced with the blocks
            from library.compile import compile_unet

            compile_unet(self.components.unet, args.dynamo_backend)
        self._build_optimizer()
        # each process's own torch stream from here (element-wise network dropout); python/numpy stay shared
        torch.manual_seed(distributed.sample_seed(self.seed, distributed.STREAM_PROCESS,
                                                  self.accelerator.process_index))

    def _unet_can_wait(self) -> bool:
        """True when the text encoders and the VAE are done (outputs cached, not trained, no fp8 or base weights
        to apply to all at once) before the U-Net is needed."""
        args = self.args
        return bool(args.network_train_unet_only and getattr(args, "cache_latents", False) and self.cache_te_outputs
                    and not args.base_weights and not getattr(args, "fp8_base", False)
                    and not getattr(args, "fp8_base_unet", False))

    def _freeze_models(self) -> None:
        c = self.components
        for model in (c.vae, *c.text_encoders):
            if model is not None:
                model.requires_grad_(False).eval()
        if c.load_unet is None:
            self._freeze_unet()
        for te in c.text_encoders:
            _place(te, self.device, self.model_dtype)
        if getattr(self.args, "fp8_base", False) or getattr(self.args, "fp8_base_unet", False):
            from library.fp8 import apply_fp8_base

            apply_fp8_base(c, unet_only=not self.args.fp8_base)

    def _freeze_unet(self) -> None:
        unet = self.components.unet
        unet.requires_grad_(False).eval()
        _place(unet, self.device, self.model_dtype)
        set_attention(unet, self.args)

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
                                           cache_to_disk=getattr(args, "cache_latents_to_disk", False),
                                           processes=self.accelerator.state)
        self.te_cache = None
        if self.cache_te_outputs:
            from library.te_cache import TextEncoderOutputCache

            self.te_cache = TextEncoderOutputCache.build(self.dataset, c, args, self.device,
                                                         to_disk=getattr(args, "cache_text_encoder_outputs_to_disk", False),
                                                         processes=self.accelerator.state)
        self.features.cache_inputs()  # the held-out validation images, while the models are loaded
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
        # every quantity derived from the run's length, once, after epochs are converted to steps
        self.plan = RunPlan.resolve(args, len(self.dataset), self.accelerator.num_processes)
        self.dataset.set_max_train_steps(self.plan.max_train_steps)  # token warmup fractions
        name = result.scheduler_override or args.lr_scheduler_type or args.lr_scheduler
        scheduler = lr_schedulers.build_scheduler(  # in optimizer steps, the same for any number of processes
            name, result.optimizer, self.plan.lr_scheduler_steps,
            self.plan.lr_warmup_steps, args.lr_scheduler_num_cycles, args.lr_scheduler_power, args.lr_scheduler_args,
            initial_lr=result.initial_lr, min_lr_ratio=args.lr_scheduler_min_lr_ratio,
            decay_steps=args.lr_decay_steps, timescale=args.lr_scheduler_timescale)
        # The module that runs (and that DDP wraps with several processes): see library.distributed.NetworkForward.
        self.forward = distributed.NetworkForward(self.network, self.loss)
        self.forward, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.forward, result.optimizer,
                                                                                   scheduler)
        if isinstance(self.forward, torch.nn.parallel.DistributedDataParallel):
            ddp = self.forward
            logger.info("DistributedDataParallel over %d processes (%s): find_unused_parameters=%s "
                        "gradient_as_bucket_view=%s static_graph=%s", self.accelerator.num_processes,
                        self.accelerator.state.backend, ddp.find_unused_parameters, ddp.gradient_as_bucket_view,
                        ddp.static_graph)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.fused_backward = None
        if getattr(args, "fused_backward_pass", False):  # updates inside backward (library.fused_backward)
            from library.fused_backward import FusedBackward

            if self.accelerator.num_processes > 1:
                raise ValueError("--fused_backward_pass works with one process only (gradients are averaged "
                                 "across processes after the per-tensor updates would have run)")
            self.fused_backward = FusedBackward(self.optimizer)

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
        with torch.set_grad_enabled(self.train_te), self.precision.autocast():
            return encode_tokens(c.text_encoders, ids, args.clip_skip, self.sdxl, weights, tokenizers=c.tokenizers,
                                 max_token_length=args.max_token_length)

    def latents(self, batch: dict[str, Any], generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """The batch's latents scaled for the U-Net: cached ones (unscaled in batches and .npz files, as
        sd-scripts) or encoded now (sampled with `generators`, one per sample; the VAE in its own dtype, no
        autocast); this is the one place the VAE's scaling factor is applied."""
        if batch.get("latents") is not None:
            latents = batch["latents"].to(self.device, dtype=torch.float32)
        else:
            vae = self.components.vae
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                images = batch["images"].to(self.device, dtype=next(vae.parameters()).dtype)
                latents = vae.encode(images).latent_dist.sample(generator=generators)
            if not torch.isfinite(latents).all():
                raise TrainingStopped("the VAE produced NaN latents (use --no_half_vae)")
        return latents.float() * self.latent_scale

    def time_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        parts = [batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"]]
        return torch.cat([torch.as_tensor(p).reshape(-1, 2) for p in parts], dim=1).to(self.device, torch.float32)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's mean loss. Each sample draws its VAE sample, noise and timestep from its own generator
        (`noise_seeds`, library.distributed), so a sample's loss does not depend on its batch or process."""
        args = self.args
        seeds = batch.get("noise_seeds")
        generators = None if seeds is None else distributed.torch_generators(seeds)
        latents = self.latents(batch, generators)
        noise_t, noisy, timesteps = noise.sample_noise_and_timesteps(
            latents, self.noise_scheduler, noise.NoiseSettings.from_args(args), generators)
        return self.prediction_loss(batch, latents, noise_t, noisy, timesteps.to(self.device))

    def prediction_loss(self, batch: dict[str, Any], latents: torch.Tensor, noise_t: torch.Tensor,
                        noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The weighted loss of the U-Net's prediction for these noisy latents (training and validation)."""
        args = self.args
        hidden, pooled = self.conditioning(batch)
        kwargs = {}
        if self.sdxl:
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(self.model_dtype),
                                           "time_ids": self.time_ids(batch).to(self.model_dtype)}
        with self.precision.autocast():
            pred = self.components.unet(noisy.to(self.model_dtype), timesteps, hidden.to(self.model_dtype),
                                        **kwargs).sample
        target = noise.training_target(latents, noise_t, timesteps, self.noise_scheduler, self.v_param)
        elementwise = loss_functions.elementwise_loss(pred, target, timesteps, self.noise_scheduler,
                                                      loss_functions.LossSettings.from_args(args))
        masks = batch.get("alpha_masks")
        if masks is not None:  # --alpha_mask / --masked_loss: masked-out pixels do not count (latent resolution)
            masks = torch.nn.functional.interpolate(masks.to(elementwise).unsqueeze(1),
                                                    size=elementwise.shape[2:], mode="area")
            elementwise = elementwise * masks
        per_sample = elementwise.mean(dim=(1, 2, 3))
        weights = batch.get("loss_weights")
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample)
        return noise.weight_loss(per_sample, timesteps, self.noise_scheduler, args, self.v_param).mean()

    # ------------------------------------------------------------------ loop
    def run(self) -> str:
        args = self.args
        namer = OutputNamer(args.output_dir, args.output_name, args.save_model_as)
        progress = train_state.Progress()
        if args.resume:
            progress = train_state.load_state(args.resume, network=self.network, optimizer=self.optimizer,
                                              scheduler=self.lr_scheduler, scaler=self.precision.scaler,
                                              process=self.accelerator.process_index,
                                              num_processes=self.accelerator.num_processes,
                                              batches_per_epoch=len(self.dataset))
            logger.info("resumed from %s at epoch %d, step %d", args.resume, progress.epoch + 1, progress.global_step)
        self.progress = progress
        self.namer = namer
        self.features.start(progress)
        self.metadata = self._metadata()
        if self.accelerator.is_main_process:
            preflight.warn_if_disk_short(args, self.accelerator.unwrap_model(self.network), self.plan)
        if self.accelerator.is_main_process and (args.log_with or args.logging_dir):
            init_kwargs = {}
            if args.log_tracker_config:
                import toml

                init_kwargs = toml.load(args.log_tracker_config)
            if args.wandb_run_name:
                init_kwargs.setdefault("wandb", {})["name"] = args.wandb_run_name
            self.accelerator.init_trackers(args.log_tracker_name or "network_train", init_kwargs=init_kwargs,
                                           config=train_args.tracker_config(args) if args.log_config else None)
        logger.info("training: %s, %d trainable tensors", self.plan.describe(), len(self.trainable))
        from tqdm import tqdm

        self.bar = tqdm(total=self.plan.max_train_steps, initial=progress.global_step, desc="steps", smoothing=0,
                        disable=not self.accelerator.is_local_main_process)
        if args.sample_at_first and progress.global_step == 0:
            self.sample(0, None)
        with _Interrupt() as interrupt:
            self._interrupt = interrupt
            self._loop(progress)
        self.bar.close()
        if self.interrupted:
            return self.last_save or ""
        path = self.save(namer.final(), progress)
        if args.save_state or args.save_state_on_train_end:
            self.save_state(namer.state_final(), progress)
        self.features.finish(progress)
        self.accelerator.end_training()
        return path

    def _loop(self, progress: train_state.Progress) -> None:
        plan = self.plan
        for epoch in range(progress.epoch, plan.num_epochs):
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
                if self.stop_agreed():
                    self.save_interrupted(progress)
                    return
                if progress.global_step >= plan.max_train_steps:
                    break
            if progress.global_step >= plan.max_train_steps and progress.batches_in_epoch < len(self.dataset):
                return
            progress.epoch, progress.batches_in_epoch = epoch + 1, 0
            self.after_epoch(epoch + 1, progress)
            if progress.global_step >= plan.max_train_steps:
                return

    def step(self, batch: dict[str, Any], progress: train_state.Progress) -> bool:
        """Forward and backward one batch; step the optimizer at the end of an accumulation group or epoch."""
        args = self.args
        position = progress.batches_in_epoch + 1
        sync = position % args.gradient_accumulation_steps == 0 or position == len(self.dataset)
        if hasattr(self.network, "on_step_start"):  # its draws (DyLoRA's rank) are the same in every process
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(distributed.sample_seed(
                    self.seed, distributed.STREAM_STEP, progress.epoch, progress.batches_in_epoch))
                self.network.on_step_start(self.components.text_encoder, self.components.unet)
        # DDP with static_graph fails inside no_sync (torch 2.13: reducer "expect_autograd_hooks_" assert), so
        # --ddp_static_graph all-reduces every accumulated batch: the same sums, more communication
        skip_sync = not sync and not getattr(args, "ddp_static_graph", False)
        with self.accelerator.no_sync(self.forward) if skip_sync else contextlib.nullcontext():
            loss = self.forward(batch)  # this process's batch mean
            rows = int(batch["loss_weights"].shape[0]) if "loss_weights" in batch else 1
            scale = distributed.loss_scale(rows, batch.get("global_batch_size", rows), self.accelerator.num_processes)
            mean_loss = self.global_loss(loss, scale)  # all-reduced: every process stops together
            if not math.isfinite(mean_loss):
                self.stop_on_nonfinite_loss(mean_loss, progress)
            if self.fused_backward is not None:
                self.fused_backward.sync = sync  # the optimizer steps inside backward on the group's last batch
            # DDP averages over processes: scaled, that is the mean over the global batch
            self.accelerator.backward(self.precision.scale(loss * scale / args.gradient_accumulation_steps))
        if sync:
            if args.max_grad_norm:
                self.precision.unscale(self.optimizer)
                self.accelerator.clip_grad_norm_(self.trainable, args.max_grad_norm)
            if self.fused_backward is not None or self.precision.step(self.optimizer):  # fused: stepped already
                self.lr_scheduler.step()
            else:  # fp16 grad scaler: inf gradients, update skipped and scale lowered (as accelerate on CUDA)
                self.skipped_steps += 1
                logger.info("step %d: the fp16 grad scaler skipped the update (inf/NaN gradients; %d so far)",
                            progress.global_step + 1, self.skipped_steps)
            self.optimizer.zero_grad(set_to_none=True)
        self.loss_window.append(mean_loss)
        if len(self.loss_window) > len(self.dataset):
            self.loss_window.popleft()
        return sync

    def global_loss(self, loss: torch.Tensor, scale: float) -> float:
        """The global batch's mean loss (the same number in every process), and the processes agree on Ctrl-C:
        one all-reduce of two numbers per batch with several processes, none with one."""
        value = loss.detach().float() * scale / self.accelerator.num_processes
        if self.accelerator.num_processes == 1:
            return value.item()
        interrupted = self._interrupt is not None and self._interrupt.requested
        both = self.accelerator.reduce(torch.stack([value, value.new_tensor(float(interrupted))]), "sum")
        self.stop_requested = bool(both[1].item() > 0)
        return both[0].item()

    def stop_agreed(self) -> bool:
        """Ctrl-C: one process looks at its flag; several stop at the batch where all saw one (global_loss)."""
        if self.accelerator.num_processes == 1:
            return self._interrupt is not None and self._interrupt.requested
        return self.stop_requested

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
        self.features.after_step(progress)  # EMA update (of the final weights of the step), validation
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
                and progress.global_step < self.plan.max_train_steps:
            self.save(self.namer.step(progress.global_step), progress)
            if args.save_state:
                self.save_state(self.namer.step_state(progress.global_step), progress)
            self.namer.prune_steps(progress.global_step, args.save_every_n_steps, args.save_last_n_steps,
                                   args.save_last_n_steps_state)

    def after_epoch(self, epoch: int, progress: train_state.Progress) -> None:
        args, every = self.args, self.plan.save_every_n_epochs
        self.features.after_epoch(epoch, progress)
        if every and epoch % every == 0 and epoch < self.plan.num_epochs:
            self.save(self.namer.epoch(epoch), progress)
            if args.save_state:
                self.save_state(self.namer.epoch_state(epoch), progress)
            self.namer.prune_epochs(epoch, every, args.save_last_n_epochs,
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
            num_batches_per_epoch=len(self.dataset), num_epochs=self.plan.num_epochs,
            max_train_steps=self.plan.max_train_steps,
            optimizer_text=f"{self.optimizer_result.name}({self.optimizer_result.args_text})",
            network_args=self.network_kwargs, started_at=time.time(), seed=self.seed)

    def save(self, path: str, progress: train_state.Progress) -> str:
        meta = train_metadata.at_save(self.metadata, progress.global_step, progress.epoch, self.args.no_metadata)
        dtype = _save_dtype(self.args.save_precision)
        self._refuse_nonfinite(self.accelerator.unwrap_model(self.network).state_dict().values(), dtype, path,
                               progress)
        if self.accelerator.is_main_process:
            path = self.features.save_network(lambda p: save_network(self.accelerator.unwrap_model(self.network), p,
                                                                     dtype, meta), path, progress)
            logger.info("saved %s", path)
        self.accelerator.wait_for_everyone()  # no process goes on (or exits) before the file is complete
        self.last_save = path
        return path

    def save_state(self, folder: str, progress: train_state.Progress) -> None:
        self._refuse_nonfinite([self.accelerator.unwrap_model(self.network).state_dict(),
                                self.optimizer.state_dict()["state"]], None, folder, progress)
        from accelerate.utils import gather_object

        rng_states = gather_object([train_state.rng_state(None)])  # every process's RNG streams
        if self.accelerator.is_main_process:
            folder = train_state.save_state(folder, network=self.accelerator.unwrap_model(self.network),
                                            optimizer=self.optimizer, scheduler=self.lr_scheduler, progress=progress,
                                            scaler=self.precision.scaler, rng_states=rng_states,
                                            extra={"seed": self.seed, "num_processes": self.accelerator.num_processes,
                                                   "batches_per_epoch": len(self.dataset)})
            self.features.save_state(folder)
            logger.info("saved training state %s", folder)
        self.accelerator.wait_for_everyone()

    def _refuse_nonfinite(self, tensors: Any, dtype: torch.dtype | None, path: str,
                          progress: train_state.Progress) -> None:
        """Stop instead of writing NaN/inf under a final name; the last good save named is finite."""
        bad = count_nonfinite(tensors, dtype)
        if bad:
            where = f" in {self.args.save_precision}" if dtype is not None else ""
            raise TrainingStopped(
                f"the network or optimizer holds {bad} NaN/inf values{where} after step {progress.global_step} "
                f"(epoch {progress.epoch + 1}): {os.path.basename(path)} not written. Last good save: "
                f"{self.last_save or 'none'}; {NONFINITE_CAUSES}")

    def stop_on_nonfinite_loss(self, loss: float, progress: train_state.Progress) -> None:
        """A NaN/inf loss is seen before backward, so the weights are still those of the last step: save them
        (and the state) under a name that says so, then stop naming the file."""
        step = progress.global_step
        what = f"loss is {loss} at step {step + 1} (epoch {progress.epoch + 1})"
        try:
            path = self.save(self.namer.before_nonfinite(step), progress)
            if self.args.save_state:
                self.save_state(self.namer.before_nonfinite_state(step), progress)
        except TrainingStopped as e:
            raise TrainingStopped(f"{what}; {e}") from None
        state = f" and {os.path.basename(self.namer.before_nonfinite_state(step))}" if self.args.save_state else ""
        raise TrainingStopped(f"{what}: saved the network of step {step} as {path}{state}; stopped. "
                              f"{NONFINITE_CAUSES}")

    def save_interrupted(self, progress: train_state.Progress) -> None:
        path = self.save(self.namer.step(progress.global_step), progress)
        if self.args.save_state:
            self.save_state(self.namer.step_state(progress.global_step), progress)
        self.interrupted = True
        logger.warning("interrupted at step %d: saved %s", progress.global_step, path)

    def sample(self, step: int, epoch: int | None) -> None:
        args = self.args
        if not args.sample_prompts:
            return
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return
        from library.sampling import sample_images

        autocast = self.model_dtype if self.model_dtype != torch.float32 else None
        # passing the (already applied) network puts it in eval mode while sampling: no dropout in samples
        with self.features.eval_weights():  # the EMA weights when --ema_decay
            paths = sample_images(self.components, args.sample_prompts, args.output_dir, step, epoch,
                                  args.sample_sampler, output_name=args.output_name, device=self.device,
                                  clip_skip=args.clip_skip, autocast_dtype=autocast,
                                  networks=[self.accelerator.unwrap_model(self.network)])
        self.samples.extend(paths)
        self.accelerator.wait_for_everyone()


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
    preflight.check_run(args, sdxl)  # output folder, numbers, network module, resume state, prompts: before loading
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
    reports = getattr(trainer, "accelerator", None) is None or trainer.accelerator.is_main_process
    if trainer.final_path and reports:
        print(f"LoRA saved: {os.path.abspath(trainer.final_path)}")
    if trainer.samples:
        print(f"sample images: {os.path.abspath(os.path.dirname(trainer.samples[0]))}")
    if trainer.interrupted:
        raise SystemExit(130)
