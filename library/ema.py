"""Exponential moving average of the LoRA weights (`--ema_decay`), saved as the LoRA file by default.

After each optimizer step n (1, 2, ...) every trainable tensor's average becomes
`ema = d_n * ema + (1 - d_n) * weight` with `d_n = ema_decay * min(1, n / ema_warmup_steps)` (no warmup:
`d_n = ema_decay`), so early averages are not dominated by the random initial weights. The average lives in
fp32 on the network's device, or on the CPU with `--ema_on_cpu` (no accelerator memory). Saved files hold the
averaged weights (`--save_ema_only`, the default when EMA is on); `--save_ema_and_raw` also writes the raw
weights as `<name>-raw.<ext>`. Samples and the validation loss use the averaged weights. A state folder keeps the
average (`ema.safetensors`), so a resumed run continues it exactly.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import torch

STATE_FILE = "ema.safetensors"


def add_ema_arguments(group: Any) -> None:
    group.add_argument("--ema_decay", type=float, default=None,
                       help="keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999); "
                            "saved files, samples and validation use it")
    group.add_argument("--ema_warmup_steps", type=int, default=0,
                       help="ramp the EMA decay linearly from 0 to --ema_decay over this many steps (default 0)")
    group.add_argument("--ema_on_cpu", action="store_true", help="keep the EMA weights in CPU memory")
    group.add_argument("--save_ema_only", action="store_true",
                       help="save only the EMA weights (the default with --ema_decay)")
    group.add_argument("--save_ema_and_raw", action="store_true",
                       help="save the EMA weights and also the raw weights as <name>-raw")


def validate(args: Any) -> None:
    decay = getattr(args, "ema_decay", None)
    if decay is None:
        for flag in ("ema_on_cpu", "save_ema_only", "save_ema_and_raw"):
            if getattr(args, flag, False):
                raise ValueError(f"--{flag} needs --ema_decay (e.g. 0.999)")
        if getattr(args, "ema_warmup_steps", 0):
            raise ValueError("--ema_warmup_steps needs --ema_decay (e.g. 0.999)")
        return
    if not 0.0 < decay < 1.0:
        raise ValueError(f"--ema_decay {decay}: expected a number between 0 and 1 (e.g. 0.999)")
    if (getattr(args, "ema_warmup_steps", 0) or 0) < 0:
        raise ValueError(f"--ema_warmup_steps {args.ema_warmup_steps}: must not be negative")
    if getattr(args, "save_ema_only", False) and getattr(args, "save_ema_and_raw", False):
        raise ValueError("--save_ema_only and --save_ema_and_raw exclude each other")


def metadata(args: Any) -> dict[str, str]:
    if getattr(args, "ema_decay", None) is None:
        return {}
    return {"ss_ema_decay": str(args.ema_decay), "ss_ema_warmup_steps": str(args.ema_warmup_steps or 0)}


class LoRAEMA:
    """The moving average of `params` (name -> parameter); `update()` after each optimizer step."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float, warmup_steps: int = 0,
                 on_cpu: bool = False) -> None:
        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps or 0)
        self.on_cpu = on_cpu
        self.num_updates = 0
        self.shadow = [p.detach().float().to("cpu" if on_cpu else p.device, copy=True) for p in self.params]

    @classmethod
    def from_args(cls, args: Any, network: torch.nn.Module) -> "LoRAEMA | None":
        if getattr(args, "ema_decay", None) is None:
            return None
        named = [(n, p) for n, p in network.named_parameters() if p.requires_grad]
        return cls(named, args.ema_decay, args.ema_warmup_steps, bool(args.ema_on_cpu))

    def current_decay(self) -> float:
        """The decay of update number `num_updates` (1-based)."""
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * min(1.0, self.num_updates / self.warmup_steps)

    @torch.no_grad()
    def update(self) -> None:
        self.num_updates += 1
        weight = 1.0 - self.current_decay()
        current = [p.detach().to(s.device, torch.float32) for p, s in zip(self.params, self.shadow)]
        torch._foreach_lerp_(self.shadow, current, weight)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The network holds the averaged weights inside the block, its own weights again after it."""
        with torch.no_grad():
            saved = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    # ---- state (--save_state / --resume)
    def save(self, folder: str) -> None:
        from library.file_io import save_state_dict

        tensors = {n: s.contiguous() for n, s in zip(self.names, self.shadow)}
        meta = {"num_updates": str(self.num_updates), "decay": str(self.decay), "names": json.dumps(self.names)}
        save_state_dict(tensors, os.path.join(folder, STATE_FILE), metadata=meta)

    def load(self, folder: str) -> None:
        from library.file_io import load_state_dict, read_metadata

        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume {folder}: no {STATE_FILE} (the state was saved without --ema_decay)")
        tensors = load_state_dict(path)
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise ValueError(f"--resume {folder}: {STATE_FILE} lacks {missing[0]} (a different network)")
        with torch.no_grad():
            for name, s in zip(self.names, self.shadow):
                s.copy_(tensors[name].to(s.device, torch.float32))
        self.num_updates = int(read_metadata(path).get("num_updates", 0))


def raw_path(path: str) -> str:
    """`out/name.safetensors` -> `out/name-raw.safetensors` (the raw weights with --save_ema_and_raw)."""
    stem, ext = os.path.splitext(path)
    return f"{stem}-raw{ext}"
