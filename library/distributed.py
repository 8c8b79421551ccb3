"""Data-parallel training: the arithmetic that makes N processes train the model one process would.

A run started with `accelerate launch --num_processes N` (or torchrun, or several machines) runs the same trainer
in N processes. With `--train_batch_size b` (or a dataset's `batch_size`) each optimizer micro-step takes one
*global batch* of N*b samples of one bucket, cut exactly as a one-process run with batch N*b cuts it, and
process r trains the r-th contiguous share of it (`shard_bounds`). Every random draw of a sample (flip, crop,
caption shuffle and dropout, VAE sampling, noise, timestep) comes from a generator keyed by (run seed, stream,
epoch, global batch index, position in the global batch) (`sample_seed`), so it does not depend on N or on the
process that trains the sample. Each process scales its loss (`loss_scale`) so that DDP's gradient average is
the mean over the N*b samples of the global batch: N processes x batch b == 1 process x batch N*b, up to the
order of float summation.

The gradient all-reduce is torch's DistributedDataParallel, prepared by accelerate. The LoRA modules are hooks
inside the U-Net and text encoders, so the network module itself never runs a forward and a DDP wrapper around
it would never fire its reducer. `NetworkForward` is the module that runs: its only submodule is the network
(so DDP's buckets and its start-up broadcast hold the LoRA parameters only, not the frozen models) and its
forward runs the trainer's loss function, which calls the frozen models with the network's hooks in place.
"""
from __future__ import annotations

import argparse
import datetime
import logging
from typing import Any, Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

# Independent random streams derived from the run seed (`sample_seed(seed, STREAM, ...)`).
STREAM_DATA = 1  # flips, crops, colour, captions of one sample (library.datasets)
STREAM_NOISE = 2  # VAE sampling, noise and timestep of one sample (library.network_trainer)
STREAM_STEP = 3  # the network's per-step draws shared by all processes (DyLoRA's rank)
STREAM_PROCESS = 4  # each process's own torch stream (element-wise network dropout)
STREAM_CACHE = 5  # VAE sampling of an image's cached latents (library.latent_cache)


def sample_seed(seed: int, stream: int, *key: int) -> int:
    """A 63-bit seed for the draws of one (stream, key), e.g. (STREAM_NOISE, epoch, batch, position)."""
    entropy = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(stream), *(int(k) & 0xFFFFFFFFFFFFFFFF for k in key)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generators(seeds: Sequence[int] | torch.Tensor, device: torch.device | str = "cpu"
                     ) -> list[torch.Generator]:
    """One seeded torch.Generator per seed (one per sample of a batch)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """The [start, stop) of process `rank`'s contiguous share of `n` rows (sizes differ by at most one)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def loss_scale(local_rows: int, global_rows: int, world: int) -> float:
    """Factor for a process's batch-mean loss so that DDP's average over processes is the global batch mean.

    local mean * local_rows * world / global_rows, averaged over `world` processes, is sum(losses)/global_rows.
    Padding rows (a process whose share of a short global batch is empty trains one row with loss weight 0)
    count in `local_rows`. One process: exactly 1.
    """
    return local_rows * world / global_rows


def resolve_run_seed(requested: int | None, stored: int | None, accelerator: Any) -> int:
    """The run's seed: --seed, else the one a resumed state stored, else drawn once and shared by all processes."""
    if requested is not None:
        if stored is not None and stored != requested:
            logger.warning("--seed %d differs from the resumed state's seed %d: data order and noise change from "
                           "here on", requested, stored)
        return int(requested)
    if stored is not None:
        logger.info("no --seed: using the seed the resumed run drew, %d", stored)
        return int(stored)
    import random

    drawn = [random.SystemRandom().randrange(2**31)]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(drawn, from_process=0)
    logger.info("no --seed: this run uses seed %d (stored in its states; --seed %d repeats it)", drawn[0], drawn[0])
    return int(drawn[0])


def cpu_only_multiprocess() -> bool:
    """A multi-process launch (WORLD_SIZE > 1: torchrun, `accelerate launch --multi_gpu`) on a machine without an
    accelerator. accelerate then needs `cpu=True` to join the processes with gloo; without it each process
    would silently train alone."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()


def accelerator_kwargs(args: argparse.Namespace) -> list[Any]:
    """accelerate kwargs handlers: --ddp_timeout (minutes), --ddp_gradient_as_bucket_view, --ddp_static_graph,
    and `find_unused_parameters` when the network needs it."""
    from accelerate import DistributedDataParallelKwargs, InitProcessGroupKwargs

    handlers: list[Any] = []
    if getattr(args, "ddp_timeout", None):
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=args.ddp_timeout)))
    handlers.append(DistributedDataParallelKwargs(
        find_unused_parameters=may_skip_parameters(args),
        gradient_as_bucket_view=bool(getattr(args, "ddp_gradient_as_bucket_view", False)),
        static_graph=bool(getattr(args, "ddp_static_graph", False))))
    return handlers


def may_skip_parameters(args: argparse.Namespace) -> bool:
    """Whether a step can leave trainable network parameters without a gradient, so DDP must look for them
    (a graph walk per step). networks.lora uses every parameter unless `module_dropout` skips modules;
    networks.dylora trains some rank chunks per step; other network modules are not known, so assumed to."""
    from library.train_setup import parse_network_args

    if args.network_module != "networks.lora":
        return True
    return float(parse_network_args(args.network_args).get("module_dropout") or 0) > 0


class NetworkForward(torch.nn.Module):
    """The module DDP wraps: the LoRA network as its only submodule, the trainer's loss as its forward.

    `compute(batch)` runs the frozen models, in which the network's modules are hooked; the frozen models are
    not submodules here (DDP neither broadcasts nor inspects them). One process: accelerate returns it as is.
    """

    def __init__(self, network: torch.nn.Module, compute: Callable[[dict[str, Any]], torch.Tensor]) -> None:
        super().__init__()
        self.network = network
        self.compute = compute

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.compute(batch)
