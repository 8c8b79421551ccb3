"""Learning-rate schedules by the names of sd-scripts' `--lr_scheduler` (diffusers' formulas).

linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup, piecewise_constant,
adafactor (AdaFactor's own relative-step schedule) and any `module.Class` with `--lr_scheduler_args`.
The multipliers are picklable `functools.partial`s of module functions, so a scheduler's state dict restores.
"""
from __future__ import annotations

import functools
import importlib
import logging
import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from library.optimizers import parse_kwargs

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                   "piecewise_constant", "adafactor", "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt")


def int_or_float(text: str) -> int | float:
    """`--lr_warmup_steps 100` (steps) or `0.05` (ratio of all steps)."""
    value = float(text)
    return int(value) if value >= 1 or value == 0 else value


def warmup_steps(value: int | float, total_steps: int) -> int:
    return int(value * total_steps) if isinstance(value, float) and value < 1 else int(value)


def check_scheduler_name(name: str) -> None:
    if name in SCHEDULER_NAMES or name.startswith("adafactor:") or "." in name:
        return
    raise ValueError(f"--lr_scheduler {name}: unknown scheduler; expected one of {', '.join(SCHEDULER_NAMES)} "
                     "or module.Class")


def _warmup(step: int, warmup: int) -> float | None:
    return step / max(1, warmup) if step < warmup else None


def _constant(step: int, warmup: int, total: int) -> float:
    w = _warmup(step, warmup)
    return 1.0 if w is None else w


def _linear(step: int, warmup: int, total: int) -> float:
    w = _warmup(step, warmup)
    return w if w is not None else max(0.0, (total - step) / max(1, total - warmup))


def _cosine(step: int, warmup: int, total: int, cycles: float = 0.5) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cycles * 2.0 * progress)))


def _cosine_restarts(step: int, warmup: int, total: int, cycles: int = 1) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    progress = (step - warmup) / max(1, total - warmup)
    if progress >= 1.0:
        return 0.0
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0))))


def _polynomial(step: int, warmup: int, total: int, lr_init: float = 1.0, power: float = 1.0,
                lr_end: float = 1e-7) -> float:
    w = _warmup(step, warmup)
    if w is not None:
        return w
    if step > total or lr_init <= lr_end:
        return lr_end / lr_init if lr_init > 0 else 0.0
    remaining = 1 - (step - warmup) / max(1, total - warmup)
    return ((lr_init - lr_end) * remaining**power + lr_end) / lr_init


def _cosine_min_lr(step: int, warmup: int, total: int, min_lr_ratio: float = 0.0) -> float:
    """Cosine down to min_lr_ratio (transformers' cosine_with_min_lr)."""
    w = _warmup(step, warmup)
    return w if w is not None else min_lr_ratio + (1 - min_lr_ratio) * _cosine(step, warmup, total)


def _warmup_stable_decay(step: int, warmup: int, total: int, decay: int = 0, min_lr_ratio: float = 0.0) -> float:
    """Warmup, constant, then a cosine decay over the last `decay` steps to min_lr_ratio (transformers' WSD)."""
    w = _warmup(step, warmup)
    if w is not None:
        return w
    decay_start = total - decay
    if step < decay_start:
        return 1.0
    if step >= total:
        return min_lr_ratio
    progress = (step - decay_start) / max(1, decay)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _inverse_sqrt(step: int, warmup: int, total: int, timescale: int = 1) -> float:
    """1 / sqrt((step + timescale - warmup) / timescale) after warmup (transformers' inverse_sqrt)."""
    w = _warmup(step, warmup)
    return w if w is not None else 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def _piecewise(step: int, warmup: int, total: int, rules: tuple[tuple[int, float], ...] = (), last: float = 1.0) -> float:
    for until, mult in rules:
        if step < until:
            return mult
    return last


def _parse_piecewise(text: str) -> tuple[tuple[tuple[int, float], ...], float]:
    """diffusers' step_rules "1:10,0.1:20,0.01" -> ((10, 1), (20, 0.1)), 0.01."""
    parts = text.split(",")
    rules = tuple((int(p.split(":")[1]), float(p.split(":")[0])) for p in parts[:-1])
    return rules, float(parts[-1])


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, num_training_steps: int,
                    num_warmup_steps: int | float = 0, num_cycles: int = 1, power: float = 1.0,
                    scheduler_args: list[str] | None = None, initial_lr: float | None = None,
                    min_lr_ratio: float | None = None, decay_steps: int | float = 0,
                    timescale: int | None = None) -> Any:
    """The scheduler `name` for `optimizer` over `num_training_steps` optimizer steps. `min_lr_ratio`:
    cosine_with_min_lr / warmup_stable_decay; `decay_steps` (a float < 1: a ratio of all steps):
    warmup_stable_decay; `timescale` (default: the warmup steps): inverse_sqrt."""
    check_scheduler_name(name)
    kwargs = parse_kwargs(scheduler_args, "--lr_scheduler_args")
    warmup = warmup_steps(num_warmup_steps, num_training_steps)
    if name.startswith("adafactor"):
        from transformers.optimization import AdafactorSchedule

        lr = initial_lr if initial_lr is not None else float(name.split(":")[1]) if ":" in name else 0.0
        return AdafactorSchedule(optimizer, lr)
    if "." in name:
        return _custom(name, optimizer, kwargs)
    if name == "constant":
        warmup = 0
    common = {"warmup": warmup, "total": num_training_steps}
    if name in ("constant", "constant_with_warmup"):
        fn = functools.partial(_constant, **common)
    elif name == "linear":
        fn = functools.partial(_linear, **common)
    elif name == "cosine":
        fn = functools.partial(_cosine, **common)
    elif name == "cosine_with_restarts":
        fn = functools.partial(_cosine_restarts, cycles=num_cycles, **common)
    elif name == "cosine_with_min_lr":
        fn = functools.partial(_cosine_min_lr, min_lr_ratio=min_lr_ratio or 0.0, **common)
    elif name == "warmup_stable_decay":
        decay = warmup_steps(decay_steps, num_training_steps)
        if not 0 <= decay <= num_training_steps - warmup:
            raise ValueError(f"--lr_decay_steps {decay_steps}: {decay} decay steps do not fit after {warmup} warmup "
                             f"steps in {num_training_steps}")
        fn = functools.partial(_warmup_stable_decay, decay=decay, min_lr_ratio=min_lr_ratio or 0.0, **common)
    elif name == "inverse_sqrt":
        fn = functools.partial(_inverse_sqrt, timescale=timescale or max(1, warmup), **common)
    elif name == "polynomial":
        lr_init = optimizer.defaults.get("lr") or 1.0
        fn = functools.partial(_polynomial, lr_init=lr_init, power=power, lr_end=kwargs.get("lr_end", 1e-7), **common)
    else:
        rules, last = _parse_piecewise(str(kwargs.get("step_rules", "1")))
        fn = functools.partial(_piecewise, rules=rules, last=last, **common)
    return LambdaLR(optimizer, fn)


def _custom(name: str, optimizer: torch.optim.Optimizer, kwargs: dict[str, Any]) -> Any:
    module_name, _, cls_name = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--lr_scheduler {name}: cannot load ({e})") from None
    try:
        return cls(optimizer, **kwargs)
    except TypeError as e:
        raise ValueError(f"--lr_scheduler_args for {name}: {e}") from None
