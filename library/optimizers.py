"""Optimizers by the names of sd-scripts' `--optimizer_type`, with `--optimizer_args key=value` parsing.

Names are case-insensitive. Besides the named ones, a `torch.optim` class name (`RMSprop`) or any importable
`module.Class` works. Documented defaults are added (SGDNesterov: momentum 0.9 and nesterov; AdaFactor:
relative_step / scale_parameter / warmup_init True with its own schedule). A missing optional package is an
error naming the pip package.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

# lower-case name -> (pip package, import path of the class, default kwargs)
_NAMED: dict[str, tuple[str | None, str, dict[str, Any]]] = {
    "adamw": (None, "torch.optim.AdamW", {}),
    "adamw8bit": ("bitsandbytes", "bitsandbytes.optim.AdamW8bit", {}),
    "pagedadamw8bit": ("bitsandbytes", "bitsandbytes.optim.PagedAdamW8bit", {}),
    "lion": ("lion-pytorch", "lion_pytorch.Lion", {}),
    "lion8bit": ("bitsandbytes", "bitsandbytes.optim.Lion8bit", {}),
    "pagedlion8bit": ("bitsandbytes", "bitsandbytes.optim.PagedLion8bit", {}),
    "sgdnesterov": (None, "torch.optim.SGD", {"momentum": 0.9, "nesterov": True}),
    "sgdnesterov8bit": ("bitsandbytes", "bitsandbytes.optim.SGD8bit", {"momentum": 0.9, "nesterov": True}),
    "dadaptation": ("dadaptation", "dadaptation.experimental.DAdaptAdamPreprint", {}),
    "dadaptadampreprint": ("dadaptation", "dadaptation.experimental.DAdaptAdamPreprint", {}),
    "dadaptadam": ("dadaptation", "dadaptation.DAdaptAdam", {}),
    "dadaptadagrad": ("dadaptation", "dadaptation.DAdaptAdaGrad", {}),
    "dadaptadan": ("dadaptation", "dadaptation.DAdaptAdan", {}),
    "dadaptadanip": ("dadaptation", "dadaptation.experimental.DAdaptAdanIP", {}),
    "dadaptlion": ("dadaptation", "dadaptation.DAdaptLion", {}),
    "dadaptsgd": ("dadaptation", "dadaptation.DAdaptSGD", {}),
    "prodigy": ("prodigyopt", "prodigyopt.Prodigy", {}),
    "adafactor": ("transformers", "transformers.optimization.Adafactor", {}),
}
OPTIMIZER_NAMES = ("AdamW", "AdamW8bit", "PagedAdamW8bit", "Lion", "Lion8bit", "PagedLion8bit", "SGDNesterov",
                   "SGDNesterov8bit", "DAdaptation", "DAdaptAdam", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP",
                   "DAdaptLion", "DAdaptSGD", "Prodigy", "AdaFactor")
ADAPTIVE = ("dadapt", "prodigy")  # name prefixes of optimizers that find the lr themselves (log d*lr)


@dataclass
class OptimizerResult:
    """The optimizer with what the trainer must know about it."""

    optimizer: torch.optim.Optimizer
    name: str  # module.Class actually used
    args_text: str  # "key=value,..." for the metadata
    scheduler_override: str | None = None  # "adafactor" when AdaFactor adjusts its own lr
    initial_lr: float | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_kwargs(items: list[str] | None, flag: str = "--optimizer_args") -> dict[str, Any]:
    """`["weight_decay=0.01", "betas=.9,.999", "relative_step=False"]` -> typed kwargs (python literals)."""
    kwargs: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {item!r}: expected key=value")
        kwargs[key.strip()] = _literal(value.strip())
    return kwargs


def _literal(text: str) -> Any:
    if "," in text and not text.startswith(("[", "(", "{")):
        return tuple(_literal(v) for v in text.split(",") if v != "")
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # plain strings need no quotes


def _resolve_name(name: str) -> tuple[str | None, str, dict[str, Any]]:
    key = name.lower()
    if key in _NAMED:
        return _NAMED[key]
    if "." in name:
        return None, name, {}
    for attr in dir(torch.optim):
        if attr.lower() == key and isinstance(getattr(torch.optim, attr), type):
            return None, f"torch.optim.{attr}", {}
    raise ValueError(f"--optimizer_type {name}: unknown optimizer; expected one of {', '.join(OPTIMIZER_NAMES)}, "
                     "a torch.optim class name or module.Class")


def check_optimizer_available(name: str) -> None:
    """Raise (naming the pip package) when `name` is unknown or its package is missing; imports nothing heavy."""
    package, path, _ = _resolve_name(name)
    module = path.rsplit(".", 1)[0]
    top = module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        pip = package or top
        raise ValueError(f"--optimizer_type {name}: needs the pip package {pip!r} (pip install {pip})")


def _load_class(path: str, name: str) -> type:
    module_name, _, cls_name = path.rpartition(".")
    if not module_name:
        raise ValueError(f"--optimizer_type {name}: expected module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--optimizer_type {name}: cannot import {module_name} ({e})") from None
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ValueError(f"--optimizer_type {name}: {module_name} has no class {cls_name}")
    return cls


def build_optimizer(name: str, params: list[Any], lr: float, optimizer_args: list[str] | None = None,
                    max_grad_norm: float = 1.0, lr_scheduler: str = "constant") -> OptimizerResult:
    """Create the optimizer `name` over `params` (tensors or param groups with their own "lr")."""
    check_optimizer_available(name)
    _, path, defaults = _resolve_name(name)
    kwargs = dict(defaults)
    kwargs.update(parse_kwargs(optimizer_args))
    key = name.lower()
    override = None
    initial_lr = None
    if key.startswith(ADAPTIVE) and lr <= 0.1:
        logger.warning("%s adapts the learning rate itself: --learning_rate is a multiplier, usually 1.0 (got %s)",
                       name, lr)
    if key == "adafactor":
        kwargs.setdefault("relative_step", True)
        if kwargs["relative_step"]:
            if _drop_group_lrs(params):
                logger.warning("AdaFactor with relative_step=True ignores --unet_lr / --text_encoder_lr")
            if lr_scheduler != "adafactor":
                logger.warning("AdaFactor with relative_step=True uses its own schedule (lr_scheduler=adafactor)")
            override, initial_lr, lr = "adafactor", lr, None
        else:
            if max_grad_norm != 0.0:
                logger.warning("AdaFactor with a fixed lr: --max_grad_norm 0 is recommended")
            if lr_scheduler != "constant_with_warmup":
                logger.warning("AdaFactor with a fixed lr: --lr_scheduler constant_with_warmup is recommended")
    check_single_lr(name, {f"group {i} lr": g.get("lr", lr) for i, g in enumerate(params) if isinstance(g, dict)})
    cls = _load_class(path, name)
    with _quiet_bitsandbytes(path):
        try:
            optimizer = cls(params, lr=lr, **kwargs)
        except TypeError as e:
            raise ValueError(f"--optimizer_args for {name}: {e}") from None
    text = ",".join(f"{k}={v}" for k, v in kwargs.items())
    logger.info("optimizer %s (%s)", path, text or "defaults")
    return OptimizerResult(optimizer, f"{cls.__module__}.{cls.__name__}", text, override, initial_lr, kwargs)


def check_single_lr(name: str, lrs: dict[str, float | None]) -> None:
    """D-Adaptation and Prodigy refuse parameter groups with different non-zero lrs (at their first step): say so
    before any model loads. `lrs`: the flag (or group) naming each lr -> its value."""
    if not is_adaptive(name):
        return
    used = {flag: lr for flag, lr in lrs.items() if lr}
    if len(set(used.values())) > 1:
        given = ", ".join(f"{flag} {lr:g}" for flag, lr in used.items())
        raise ValueError(f"--optimizer_type {name}: {given} differ, but {name} takes one learning rate for every "
                         "parameter group (0 is allowed): give them the same value")


def _drop_group_lrs(params: list[Any]) -> bool:
    had = False
    for group in params:
        if isinstance(group, dict):
            had = group.pop("lr", None) is not None or had
    return had


class _quiet_bitsandbytes:
    """bitsandbytes logs a harmless CPU-kernel line at import; keep the console clean."""

    def __init__(self, path: str) -> None:
        self.active = path.startswith("bitsandbytes")

    def __enter__(self) -> None:
        if self.active:
            self.level = logging.getLogger("bitsandbytes").level
            logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            logging.getLogger("bitsandbytes").setLevel(self.level)


def effective_lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    """Learning rate actually applied per group: d*lr for D-Adaptation / Prodigy, lr otherwise."""
    return [float(g.get("d", 1.0)) * float(g["lr"] or 0.0) for g in optimizer.param_groups]


def is_adaptive(name: str) -> bool:
    return name.lower().startswith(ADAPTIVE)
