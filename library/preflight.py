"""Checks a training run makes before it loads anything, so that bad input fails in seconds, not hours.

`check_run(args, sdxl)` (called by `network_trainer.train` after `train_args.validate_args`, before any model
loads or latents are cached): every numeric option in range, the output folder usable, `--network_module`
importable, `--network_weights` / `--base_weights` readable, the `--resume` state readable and built with the
same network options, the `--sample_prompts` file valid line by line. Each failure is one ValueError /
FileNotFoundError naming the flag or file and what would be right.

`warn_if_disk_short(args, network, plan)` (called once the network exists, before the first step):
estimates what the run will write (LoRA files and training states, with `--save_last_n_*` pruning) and warns
when the output folder's disk has less free space. A save that still does not fit is kept elsewhere
(`file_io.save_with_fallback`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from library.file_io import (TEMP_PREFIX, CheckpointError, free_bytes, load_state_dict, read_safetensors_header,
                             remove_stale_temporaries)

logger = logging.getLogger("library.network_trainer")


def check_run(args: argparse.Namespace, sdxl: bool) -> None:
    """Every up-front check of a training run (see the module docstring); raises on the first problem."""
    check_numbers(args)
    check_output_dir(args.output_dir)
    check_network_module(args.network_module)
    ranks = expected_ranks(args, sdxl)
    if args.network_weights:
        check_lora_file(args.network_weights, "--network_weights", ranks)
    for path in args.base_weights or []:
        check_lora_file(path, "--base_weights", None)
    if args.resume:
        check_resume(args, ranks)
    if args.sample_prompts:
        check_sample_prompts(args.sample_prompts)


# ---------------------------------------------------------------- numbers

def _at_least(low: float) -> tuple[Callable[[float], bool], str]:
    return (lambda v: v >= low), f"at least {low}"


def _between(low: float, high: float, high_open: bool = False) -> tuple[Callable[[float], bool], str]:
    if high_open:
        return (lambda v: low <= v < high), f"in [{low}, {high})"
    return (lambda v: low <= v <= high), f"in [{low}, {high}]"


_ANY: tuple[Callable[[float], bool], str] = ((lambda v: True), "finite")

# option -> (valid?, what is valid); None values are "not given". 0 means "off" for the save/sample intervals.
NUMERIC_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "network_dim": _at_least(1),
    "network_alpha": _at_least(0),
    "network_dropout": _between(0, 1, high_open=True),
    "learning_rate": _at_least(0),
    "unet_lr": _at_least(0),
    "text_encoder_lr": _at_least(0),
    "max_train_steps": _at_least(1),
    "max_train_epochs": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "max_grad_norm": _at_least(0),
    "scale_weight_norms": _at_least(0),
    "lr_warmup_steps": _at_least(0),
    "lr_scheduler_min_lr_ratio": _between(0, 1),
    "lr_decay_steps": _at_least(0),
    "lr_scheduler_timescale": _at_least(1),
    "lr_scheduler_num_cycles": _at_least(1),
    "lr_scheduler_power": _at_least(0),
    "save_every_n_epochs": _at_least(0),
    "save_every_n_steps": _at_least(0),
    "save_n_epoch_ratio": _at_least(0),
    "save_last_n_epochs": _at_least(0),
    "save_last_n_epochs_state": _at_least(0),
    "save_last_n_steps": _at_least(0),
    "save_last_n_steps_state": _at_least(0),
    "sample_every_n_steps": _at_least(0),
    "sample_every_n_epochs": _at_least(0),
    "prior_loss_weight": _at_least(0),
    "noise_offset": _at_least(0),
    "adaptive_noise_scale": _ANY,
    "multires_noise_iterations": _at_least(0),
    "multires_noise_discount": _between(0, 1),
    "ip_noise_gamma": _at_least(0),
    "min_snr_gamma": _at_least(0),
    "v_pred_like_loss": _at_least(0),
    "clip_skip": _at_least(1),
    "max_data_loader_n_workers": _at_least(0),
    "vae_batch_size": _at_least(1),
    "seed": _between(0, 2**32 - 1),
}


def check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option finite and in its range (`NUMERIC_RANGES`); lists of numbers value by value."""
    if getattr(args, "max_train_epochs", None):  # the epochs decide the steps
        ranges = {k: v for k, v in NUMERIC_RANGES.items() if k != "max_train_steps"}
    else:
        ranges = NUMERIC_RANGES
    for name, (valid, text) in ranges.items():
        value = getattr(args, name, None)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and not isinstance(v, bool) and (not math.isfinite(v) or not valid(v)):
                raise ValueError(f"--{name} {v}: must be {text}")
    for name in ("base_weights_multiplier",):
        for value in getattr(args, name, None) or []:
            if not math.isfinite(value):
                raise ValueError(f"--{name} {value}: must be a finite number")


# ---------------------------------------------------------------- output folder

def check_output_dir(folder: str) -> None:
    """The output folder exists as a folder or can be created, and a file can be written in it. Nothing is
    created (a probe file is written and removed); our stale temporary files in it are removed."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {folder}: is a file, not a folder; give a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--output_dir {folder}: cannot be created ({existing} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}probe.", dir=existing)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        where = "" if existing == path else f" (in {existing})"
        raise ValueError(f"--output_dir {folder}: cannot write there{where}: {e.strerror or e}; "
                         "choose a writable folder") from None
    if path.is_dir():
        for sub in (path, path / "sample"):
            remove_stale_temporaries(sub)


# ---------------------------------------------------------------- network module and weights

def check_network_module(name: str) -> Any:
    """Import --network_module (it must offer create_network); returns the module."""
    try:
        module = importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"--network_module {name}: cannot be imported ({e}); e.g. networks.lora") from None
    except Exception as e:  # noqa: BLE001 - a module that fails while importing
        raise ValueError(f"--network_module {name}: importing it failed ({type(e).__name__}: {e})") from None
    if not callable(getattr(module, "create_network", None)):
        raise ValueError(f"--network_module {name}: has no create_network function; not a network module "
                         "(e.g. networks.lora)")
    return module


def expected_ranks(args: argparse.Namespace, sdxl: bool) -> tuple[int, int | None] | None:
    """(rank of linear / 1x1 modules, rank of 3x3-conv modules or None) the arguments build with networks.lora;
    None when unknown before the models load (another module, --dim_from_weights, per-block dims).
    Also validates --network_args of networks.lora up front."""
    if args.network_module != "networks.lora":
        return None
    from library.train_setup import parse_network_args
    from networks import lora_blocks

    kwargs = parse_network_args(args.network_args)
    quiet = logging.getLogger(lora_blocks.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # its notes are logged when the network is built
    try:
        parsed = lora_blocks.parse_network_args(kwargs, args.network_dim, args.network_alpha, sdxl)
    finally:
        quiet.setLevel(level)
    if args.dim_from_weights or parsed.block_dims is not None:
        return None
    return parsed.dim, parsed.conv_dim


def _shapes(sd_or_header: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, value in sd_or_header.items():
        if key == "__metadata__":
            continue
        out[key] = tuple(value["shape"]) if isinstance(value, dict) else tuple(value.shape)
    return out


def check_ranks(shapes: dict[str, tuple[int, ...]], ranks: tuple[int, int | None] | None, source: str,
                strict: bool) -> None:
    """Each `lora_down.weight` has the rank the arguments build; `strict`: no 3x3-conv modules without conv_dim."""
    if ranks is None:
        return
    dim, conv_dim = ranks
    for key, shape in sorted(shapes.items()):
        if not key.endswith(".lora_down.weight"):
            continue
        conv3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        want = conv_dim if conv3 else dim
        if want is None:
            if strict:
                raise ValueError(f"{source}: {key} is a 3x3-conv module of rank {shape[0]}, this run builds none; "
                                 f"add --network_args conv_dim={shape[0]} (same --network_* options as saved)")
            continue
        if shape[0] != want:
            option = f"--network_args conv_dim={want}" if conv3 else f"--network_dim {want}"
            raise ValueError(f"{source}: {key} has rank {shape[0]}, this run builds rank {want} ({option}); "
                             f"use the options the file was trained with")


def check_lora_file(path: str, flag: str, ranks: tuple[int, int | None] | None) -> None:
    """A LoRA file is complete and readable (header checked for .safetensors, loaded otherwise) and, with
    `ranks`, has the ranks this run builds."""
    try:
        if Path(path).suffix.lower() == ".safetensors":
            shapes = _shapes(read_safetensors_header(path))
        else:
            shapes = _shapes(load_state_dict(path))
    except CheckpointError as e:
        raise ValueError(f"{flag} {e}") from None
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot read ({e.strerror or e})") from None
    check_ranks(shapes, ranks, f"{flag} {path}", strict=False)


def check_resume(args: argparse.Namespace, ranks: tuple[int, int | None] | None) -> None:
    """The --resume folder holds a readable state whose network matches the one the arguments build."""
    from library import train_state

    train_state.read_progress(args.resume)
    payload = train_state.read_state(args.resume, mmap=True)
    shapes = _shapes(payload["network"])
    source = f"--resume {args.resume}"
    check_ranks(shapes, ranks, source, strict=True)
    if args.network_module != "networks.lora":
        return
    has_te = any(k.startswith("lora_te") for k in shapes)
    has_unet = any(k.startswith("lora_unet") for k in shapes)
    train_te, train_unet = not args.network_train_unet_only, not args.network_train_text_encoder_only
    if has_te != train_te or has_unet != train_unet:
        saved = "text encoder and U-Net" if has_te and has_unet else "text encoder only" if has_te else "U-Net only"
        now = "text encoder and U-Net" if train_te and train_unet else "text encoder only" if train_te else "U-Net only"
        raise ValueError(f"{source}: the state's network does not match this network: it trains the {saved}, this "
                         f"run the {now} "
                         "(--network_train_unet_only / --network_train_text_encoder_only as when it was saved)")


# ---------------------------------------------------------------- sample prompts

def check_sample_prompts(path: str) -> None:
    """Parse the whole prompt file now: a bad line is refused naming it (not skipped hours later)."""
    from library.sample_prompts import read_prompt_file

    try:
        specs = read_prompt_file(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--sample_prompts: {e}") from None
    if not specs:
        logger.warning("--sample_prompts %s holds no prompts: no sample images will be made", path)


# ---------------------------------------------------------------- disk space

def _files_kept(count: int, keep_last: int | None) -> int:
    """How many of `count` periodic saves exist at once at most (a save is written before older ones go)."""
    return min(count, keep_last + 1) if keep_last else count


def planned_saves(args: argparse.Namespace, plan: Any) -> tuple[int, int]:
    """(LoRA files, state folders) this run has on disk at most at the same time; `plan` is the run's
    `library.run_plan.RunPlan` (epochs, steps, save interval in epochs)."""
    every_epochs = plan.save_every_n_epochs
    epoch_saves = (plan.num_epochs - 1) // every_epochs if every_epochs else 0
    step_saves = (plan.max_train_steps - 1) // args.save_every_n_steps if args.save_every_n_steps else 0
    every_steps = args.save_every_n_steps or 1
    step_keep = lambda n: -(-n // every_steps) if n else None  # noqa: E731 - steps kept -> files kept
    loras = 1 + _files_kept(epoch_saves, args.save_last_n_epochs) + _files_kept(step_saves,
                                                                               step_keep(args.save_last_n_steps))
    states = 0
    if args.save_state:
        states = _files_kept(epoch_saves, args.save_last_n_epochs_state) + \
            _files_kept(step_saves, step_keep(args.save_last_n_steps_state))
    if args.save_state or getattr(args, "save_state_on_train_end", False):
        states += 1
    return loras, states


def estimate_output_bytes(args: argparse.Namespace, network: Any, plan: Any) -> tuple[int, int, int, int]:
    """(total bytes, LoRA files, bytes per LoRA file, state folders) the run writes; a state is estimated as
    the fp32 weights plus two optimizer slots (AdamW's moments)."""
    import torch

    from library.file_io import precision_dtype

    params = [p for p in network.state_dict().values() if isinstance(p, torch.Tensor)]
    save_dtype = precision_dtype(args.save_precision)
    lora_bytes = sum(p.numel() * (torch.empty((), dtype=save_dtype or p.dtype).element_size()) for p in params)
    state_bytes = sum(p.numel() * 4 * 3 for p in params if p.is_floating_point())
    loras, states = planned_saves(args, plan)
    return loras * lora_bytes + states * state_bytes, loras, lora_bytes, states


def warn_if_disk_short(args: argparse.Namespace, network: Any, plan: Any) -> None:
    """Warn (one line) when the output folder's disk has less free space than the run will write."""
    total, loras, lora_bytes, states = estimate_output_bytes(args, network, plan)
    free = free_bytes(args.output_dir)
    if free is None or total <= free:
        return
    mb = 1 << 20
    logger.warning("%s has %.1f MB free but this run writes about %.1f MB (%d LoRA files of %.1f MB%s): free "
                   "some space or save less often (--save_every_n_*, --save_last_n_*); a save that does not fit is "
                   "written to the output folder's parent, the working folder or %s instead", args.output_dir,
                   free / mb, total / mb, loras, lora_bytes / mb, f", {states} training states" if states else "",
                   tempfile.gettempdir())
