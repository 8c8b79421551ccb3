"""`--network_args` of LoRA networks: numbers, block-wise dims / alphas, block learning-rate weights and presets.

Blocks are numbered as in the full original UNet (see `library.unet_layout.block_index`):
SD1/SD2 have 25 (0-11 input blocks, 12 middle, 13-24 output blocks; block 0 is conv_in and never has a LoRA),
SDXL has 23 (0 time/label embedding, 1-9 input blocks, 10-12 middle block parts, 13-21 output blocks, 22 out).
`down_lr_weight` / `mid_lr_weight` / `up_lr_weight` hold 12 / 1 / 12 values for SD1/SD2 and 9 / 3 / 9 for SDXL.
Arguments arrive as strings from `--network_args` or as numbers / lists from Python; both are accepted.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

from library.unet_layout import num_blocks

logger = logging.getLogger(__name__)

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
KNOWN_ARGS = {
    "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "down_lr_weight", "mid_lr_weight",
    "up_lr_weight", "block_lr_zero_threshold", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas",
    "verbose", "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
}


@dataclass
class NetworkArgs:
    """The parsed settings of a LoRA network (dims/alphas per block are lists indexed by block number)."""

    dim: int
    alpha: float
    conv_dim: int | None = None
    conv_alpha: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    block_dims: list[int] | None = None
    block_alphas: list[float] | None = None
    conv_block_dims: list[int] | None = None
    conv_block_alphas: list[float] | None = None
    block_lr_weights: list[float] | None = None
    verbose: bool = False


def to_float(name: str, value: Any) -> float | None:
    """A number from a string or number (None stays None); a clear error names the argument."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"network_args {name}={value!r}: expected a number") from None
    if not math.isfinite(number):
        raise ValueError(f"network_args {name}={value!r}: expected a finite number")
    return number


def to_int(name: str, value: Any) -> int | None:
    number = to_float(name, value)
    if number is None:
        return None
    if number != int(number) or number < 0:
        raise ValueError(f"network_args {name}={value!r}: expected a whole number >= 0")
    return int(number)


def to_float_list(name: str, value: Any, count: int | None = None) -> list[float] | None:
    """`"1,2,3"` / `[1, 2, 3]` to floats, requiring exactly `count` values when given."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else [value]
    numbers = []
    for item in items:
        number = to_float(name, item.strip() if isinstance(item, str) else item)
        if number is None:
            raise ValueError(f"network_args {name}={value!r}: empty value in the list")
        numbers.append(number)
    if count is not None and len(numbers) != count:
        raise ValueError(f"network_args {name}: expected {count} comma-separated values, got {len(numbers)}")
    return numbers


def to_int_list(name: str, value: Any, count: int) -> list[int] | None:
    numbers = to_float_list(name, value, count)
    if numbers is None:
        return None
    if any(n != int(n) or n < 0 for n in numbers):
        raise ValueError(f"network_args {name}: dims must be whole numbers >= 0, got {value!r}")
    return [int(n) for n in numbers]


def preset_weights(name: str, spec: str, count: int) -> list[float]:
    """The lr weights of a preset (`sine`, `cosine`, `linear`, `reverse_linear`, `zeros`) plus an optional `+offset`.

    Weights run from the shallowest to the deepest block: `sine` rises 0 -> 1, `cosine` falls 1 -> 0, `linear`
    rises linearly, `reverse_linear` falls, `zeros` is all 0; `sine+.5` adds 0.5 to every value.
    """
    base, _, offset_text = spec.partition("+")
    base = base.strip()
    offset = 0.0
    if offset_text:
        offset = to_float(name, offset_text)
    if base not in PRESETS:
        raise ValueError(f"network_args {name}={spec!r}: unknown preset {base!r}; expected 12 numbers (9 for SDXL) "
                         f"or one of {', '.join(PRESETS)} with an optional +offset")
    steps = [i / (count - 1) for i in range(count)] if count > 1 else [1.0]
    if base == "sine":
        values = [math.sin(math.pi * t / 2) for t in steps]
    elif base == "cosine":
        values = [math.sin(math.pi * t / 2) for t in reversed(steps)]
    elif base == "linear":
        values = steps
    elif base == "reverse_linear":
        values = list(reversed(steps))
    else:
        values = [0.0] * count
    return [v + offset for v in values]


def _lr_weight_list(name: str, value: Any, count: int) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip() and (value.strip()[0].isalpha()):
        return preset_weights(name, value, count)
    numbers = to_float_list(name, value)
    if len(numbers) != count:  # as sd-scripts: pad with 1.0 / cut, with a warning
        logger.warning("network_args %s: %d values for %d blocks; %s", name, len(numbers), count,
                       f"the last {count - len(numbers)} are 1.0" if len(numbers) < count
                       else f"values after the {count}th are ignored")
        numbers = (numbers + [1.0] * count)[:count]
    return numbers


def block_lr_weights(kwargs: Mapping[str, Any], sdxl: bool) -> list[float] | None:
    """Per-block lr weights from down/mid/up_lr_weight (missing parts are 1.0), zeroed at or below the threshold."""
    n_side, n_mid = (9, 3) if sdxl else (12, 1)
    down = _lr_weight_list("down_lr_weight", kwargs.get("down_lr_weight"), n_side)
    up = _lr_weight_list("up_lr_weight", kwargs.get("up_lr_weight"), n_side)
    mid_value = kwargs.get("mid_lr_weight")
    mid = None
    if mid_value is not None:
        mid = to_float_list("mid_lr_weight", mid_value)
        if len(mid) == 1:
            mid = mid * n_mid
        elif len(mid) != n_mid:
            raise ValueError(f"network_args mid_lr_weight: expected 1{' or 3' if sdxl else ''} values, got {len(mid)}")
    if down is None and up is None and mid is None:
        return None
    threshold = to_float("block_lr_zero_threshold", kwargs.get("block_lr_zero_threshold")) or 0.0
    weights = [1.0] * num_blocks(sdxl)
    first_down = 1 if sdxl else 0
    for offset, values in ((first_down, down), (first_down + n_side, mid), (first_down + n_side + n_mid, up)):
        if values is not None:
            weights[offset:offset + len(values)] = values
    weights = [w if w > threshold else 0.0 for w in weights]
    logger.info("block lr weights (block 0 .. %d): %s", len(weights) - 1, weights)
    return weights


def _block_values(kwargs: Mapping[str, Any], name: str, count: int, default, parse) -> list | None:
    value = kwargs.get(name)
    if value is None:
        return None if default is None else [default] * count
    return parse(name, value, count)


def parse_network_args(kwargs: Mapping[str, Any], network_dim: Any, network_alpha: Any, sdxl: bool) -> NetworkArgs:
    """Validate and convert `create_network`'s arguments; every error names the argument and what is valid."""
    unknown = sorted(set(kwargs) - KNOWN_ARGS)
    if unknown:
        logger.warning("network_args not used by networks.lora: %s", ", ".join(unknown))
    dim = to_int("network_dim", network_dim)
    dim = 4 if dim is None else dim
    alpha = to_float("network_alpha", network_alpha)
    alpha = 1.0 if alpha is None else alpha
    conv_dim = to_int("conv_dim", kwargs.get("conv_dim"))
    conv_alpha = to_float("conv_alpha", kwargs.get("conv_alpha"))
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0
    args = NetworkArgs(dim, alpha, conv_dim or None, conv_alpha,
                       rank_dropout=to_float("rank_dropout", kwargs.get("rank_dropout")),
                       module_dropout=to_float("module_dropout", kwargs.get("module_dropout")))
    for name in ("rank_dropout", "module_dropout"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            raise ValueError(f"network_args {name}={value}: expected a probability in [0, 1)")
    if args.conv_alpha is not None and args.conv_alpha < 0:
        raise ValueError(f"network_args conv_alpha={args.conv_alpha}: expected a number >= 0")
    if args.conv_dim is None:
        args.conv_alpha = None

    args.verbose = str(kwargs.get("verbose", "")).strip().lower() in ("1", "true", "yes")
    args.block_lr_weights = block_lr_weights(kwargs, sdxl)
    n = num_blocks(sdxl)
    block_mode = args.block_lr_weights is not None or kwargs.get("block_dims") is not None
    if not block_mode:
        for name in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
            if kwargs.get(name) is not None:
                raise ValueError(f"network_args {name} needs block_dims (or block lr weights) as well")
        return args
    args.block_dims = _block_values(kwargs, "block_dims", n, dim, to_int_list)
    args.block_alphas = _block_values(kwargs, "block_alphas", n, alpha, to_float_list)
    args.conv_block_dims = _block_values(kwargs, "conv_block_dims", n, args.conv_dim, to_int_list)
    if args.conv_block_dims is not None:
        conv_alpha_default = args.conv_alpha if args.conv_alpha is not None else 1.0
        args.conv_block_alphas = _block_values(kwargs, "conv_block_alphas", n, conv_alpha_default, to_float_list)
    elif kwargs.get("conv_block_alphas") is not None:
        raise ValueError("network_args conv_block_alphas needs conv_block_dims or conv_dim as well")
    if args.block_lr_weights is not None:  # a block with lr weight 0 gets no module at all
        for i, weight in enumerate(args.block_lr_weights):
            if weight == 0:
                args.block_dims[i] = 0
                if args.conv_block_dims is not None:
                    args.conv_block_dims[i] = 0
    return args
