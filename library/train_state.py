"""Training state folders (`--save_state`) and `--resume`: continue exactly where a run stopped.

A state folder holds the network weights, optimizer, scheduler, gradient scaler, every RNG stream (python,
numpy, torch, the noise generator) and the progress counters (epoch, global step, batches taken in the
epoch). It is written into a temporary folder and renamed (an old folder of the same name is moved aside
first and deleted last), so a crash never leaves a half state, nor no state. Unlike
sd-scripts, the step counter, epoch and data position are restored: a resumed run takes the same next batch
with the same learning rate as an uninterrupted one.

Several processes: the state holds every process's RNG streams (`rng_states`, one per process) and, in
progress.json, the run's seed, the number of processes and the batches per epoch. Resuming with the same
number of processes is exact; with another number the data position is mapped to the new epoch length and the
processes' own streams (network dropout) cannot continue exactly (a warning says so).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from library.file_io import replace_dir, save_with_fallback, temp_dir_beside

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Where a run is: `epoch` (0-based, current), optimizer steps done, batches taken in the epoch."""

    epoch: int = 0
    global_step: int = 0
    batches_in_epoch: int = 0


def rng_state(noise_generator: torch.Generator | None) -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if noise_generator is not None:
        state["noise"] = noise_generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], noise_generator: torch.Generator | None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if noise_generator is not None and "noise" in state:
        noise_generator.set_state(state["noise"])


def save_state(folder: str | os.PathLike, *, network: torch.nn.Module, optimizer: Any, scheduler: Any,
               progress: Progress, noise_generator: torch.Generator | None = None, scaler: Any = None,
               extra: dict[str, Any] | None = None, rng_states: list[dict[str, Any]] | None = None) -> str:
    """Write the state folder atomically (temporary folder beside it, then rename); returns its path (beside
    the output folder when that is full or not writable: `file_io.save_with_fallback`).
    `rng_states`: every process's `rng_state()` (default: this process's)."""
    payload = {
        "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": [_rng_to_saveable(r) for r in (rng_states or [rng_state(noise_generator)])],
    }
    progress_text = json.dumps({**asdict(progress), **(extra or {})}, indent=2)

    def write(target: str) -> None:
        target = Path(target)
        tmp = temp_dir_beside(target)
        try:
            torch.save(payload, tmp / STATE_FILE)
            (tmp / PROGRESS_FILE).write_text(progress_text)
            replace_dir(tmp, target)  # an old state is renamed aside first, deleted once the new one is in place
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return save_with_fallback(folder, write, "training state")


def _rng_to_saveable(state: dict[str, Any]) -> dict[str, Any]:
    # numpy's state tuple holds an ndarray; store lists so weights_only loading accepts it.
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out = dict(state)
    out["numpy"] = [kind, torch.from_numpy(np.asarray(keys).astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    out["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
    return out


def _rng_from_saved(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out["numpy"] = (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    version, internal, gauss = state["python"]
    out["python"] = (version, tuple(internal), gauss)
    return out


def read_progress(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / PROGRESS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {folder}: not a training state folder (no {PROGRESS_FILE})")
    try:
        info = json.loads(path.read_text())
        Progress(int(info["epoch"]), int(info["global_step"]), int(info["batches_in_epoch"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--resume {folder}: {PROGRESS_FILE} is damaged ({type(e).__name__}: {e}); "
                         "resume from another state folder") from None
    return info


def read_state(folder: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """The saved payload of a state folder (network, optimizer, scheduler, rng); a missing, truncated or
    damaged file is a ValueError naming it. `mmap` maps the tensors instead of reading them (a quick check)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"--resume {folder}: not a training state folder (no {STATE_FILE})")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / UnpicklingError / EOFError ...
        raise ValueError(f"--resume {folder}: {STATE_FILE} is damaged or truncated "
                         f"({str(e).splitlines()[0][:160]}); resume from another state folder") from None
    missing = [k for k in ("network", "optimizer", "rng") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"--resume {folder}: {STATE_FILE} lacks {', '.join(missing)}; not a state of this trainer")
    return payload


def load_state(folder: str | os.PathLike, *, network: torch.nn.Module, optimizer: Any, scheduler: Any,
               noise_generator: torch.Generator | None = None, scaler: Any = None, process: int = 0,
               num_processes: int = 1, batches_per_epoch: int | None = None) -> Progress:
    """Restore everything `save_state` wrote into the given live objects (this `process`'s RNG streams);
    returns the progress, its data position mapped to `batches_per_epoch` if the number of processes changed."""
    info = read_progress(folder)
    payload = read_state(folder)
    try:
        missing, unexpected = network.load_state_dict(payload["network"], strict=False)
    except RuntimeError as e:  # size mismatch
        raise ValueError(f"--resume {folder}: the state's network does not match this network "
                         f"({str(e).splitlines()[-1].strip()[:200]}; same --network_* options?)") from None
    if unexpected or missing:
        raise ValueError(f"--resume {folder}: the state's network does not match this network "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys; same --network_* options?)")
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if scaler is not None and payload.get("scaler") is not None:
        scaler.load_state_dict(payload["scaler"])
    saved = payload["rng"] if isinstance(payload["rng"], list) else [payload["rng"]]
    set_rng_state(_rng_from_saved(saved[process % len(saved)]), noise_generator)
    progress = Progress(info["epoch"], info["global_step"], info["batches_in_epoch"])
    saved_processes = int(info.get("num_processes", 1))
    if saved_processes != num_processes:
        old_len = info.get("batches_per_epoch")
        if batches_per_epoch and old_len:
            progress.batches_in_epoch = min(batches_per_epoch, round(progress.batches_in_epoch * batches_per_epoch
                                                                     / old_len))
        logger.warning("--resume %s: saved by %d processes, resumed by %d: the global batch changed, so the rest "
                       "of epoch %d is cut anew from batch %d on (some of its samples may be seen twice or not at "
                       "all) and the processes' own random streams (network dropout) restart; the result is not "
                       "the one an uninterrupted run would give", folder, saved_processes, num_processes,
                       progress.epoch + 1, progress.batches_in_epoch)
    return progress
