"""LoRA+ (Hayou et al., arXiv 2402.12354): the up projections learn R times faster than the down projections.

`--network_args loraplus_lr_ratio=R` sets R for every part; `loraplus_unet_lr_ratio` and
`loraplus_text_encoder_lr_ratio` override it for the U-Net / the text encoders (the option names of sd-scripts).
`param_groups(...)` splits one optimizer group into its plain parameters (the group's lr) and its "plus"
parameters (`lora_up`, lr x R); any network's `prepare_optimizer_params` calls it once per group, so LoRA+
combines with `--unet_lr` / `--text_encoder_lr` and the block lr weights. A network type whose fast-learning
matrices have other names passes its own `is_plus` predicate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

KEYS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


@dataclass(frozen=True)
class LoRAPlusRatios:
    """The resolved ratio of each part (None: LoRA+ off for that part)."""

    unet: float | None = None
    text_encoder: float | None = None

    @property
    def enabled(self) -> bool:
        return self.unet is not None or self.text_encoder is not None


def _ratio(key: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network_args {key}={value}: expected a number (the paper uses 16)") from None
    if not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"network_args {key}={value}: expected a positive number (the paper uses 16)")
    return ratio


def parse_ratios(kwargs: Mapping[str, Any] | None = None, *, loraplus_lr_ratio: Any = None,
                 loraplus_unet_lr_ratio: Any = None, loraplus_text_encoder_lr_ratio: Any = None) -> LoRAPlusRatios:
    """The ratios of `--network_args` (a mapping of the raw strings) or of keyword values; validated."""
    raw = {"loraplus_lr_ratio": loraplus_lr_ratio, "loraplus_unet_lr_ratio": loraplus_unet_lr_ratio,
           "loraplus_text_encoder_lr_ratio": loraplus_text_encoder_lr_ratio}
    for key in KEYS:
        if kwargs and kwargs.get(key) is not None:
            raw[key] = kwargs[key]
    values = {key: _ratio(key, value) for key, value in raw.items()}
    base = values["loraplus_lr_ratio"]
    unet = values["loraplus_unet_lr_ratio"]
    te = values["loraplus_text_encoder_lr_ratio"]
    return LoRAPlusRatios(unet=base if unet is None else unet, text_encoder=base if te is None else te)


def is_lora_up(name: str) -> bool:
    """The parameters LoRA+ speeds up in a plain LoRA module."""
    return "lora_up" in name


def param_groups(named_params: Sequence[tuple[str, torch.nn.Parameter]], lr: float | None, ratio: float | None,
                 default_lr: float | None, description: str,
                 is_plus: Callable[[str], bool] = is_lora_up) -> list[tuple[dict, str]]:
    """[(optimizer group, description)] for one group of parameters: one group (`lr`, or the optimizer's default
    when None) without LoRA+, else the plain parameters at the group's lr and the plus ones at lr x ratio."""
    params = [p for _, p in named_params]
    if not params:
        return []
    if ratio is None:
        return [({"params": params} | ({"lr": lr} if lr is not None else {}), description)]
    base = lr if lr is not None else default_lr
    if base is None:
        raise ValueError("LoRA+ (loraplus_*lr_ratio) needs a learning rate: set --learning_rate or --unet_lr / "
                         "--text_encoder_lr")
    plain = [p for n, p in named_params if not is_plus(n)]
    plus = [p for n, p in named_params if is_plus(n)]
    out = []
    if plain:
        out.append(({"params": plain, "lr": base}, description))
    if plus:
        out.append(({"params": plus, "lr": base * ratio}, f"{description} plus"))
    return out


def metadata(ratios: LoRAPlusRatios) -> dict[str, str]:
    """ss_* keys of the ratios in use (none when LoRA+ is off)."""
    out = {}
    if ratios.unet is not None:
        out["ss_loraplus_unet_lr_ratio"] = str(ratios.unet)
    if ratios.text_encoder is not None:
        out["ss_loraplus_text_encoder_lr_ratio"] = str(ratios.text_encoder)
    if ratios.enabled and ratios.unet == ratios.text_encoder:
        out["ss_loraplus_lr_ratio"] = str(ratios.unet)
    return out
