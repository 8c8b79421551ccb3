"""Weight deltas of every adapter format these tools read and write: LoRA (LoCon, with CP `lora_mid`), LoHa, LoKr,
and DoRA's weight decomposition on top of any of them. Plain functions on tensors, shared by the network modules
(training and generation), the merge / check / SVD tools, so there is one copy of each formula.

A module's tensors are given as `parts`: {key without the module name: tensor}, e.g. `{"hada_w1_a": ..., "alpha":
...}`. The formulas are those of the loaders that read these files (ComfyUI `comfy/weight_adapter/`, the webui's
`extensions-builtin/Lora/network_*.py`, LyCORIS `lycoris/functional/`):

- LoRA: `delta = up @ down * alpha / rank` (rank = rows of `lora_down.weight`); with `lora_mid.weight`
  (CP / Tucker of a k x k conv: down 1x1 -> mid k x k -> up 1x1) the down factor becomes `mid` applied to `down`.
- LoHa: `delta = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank` (element-wise product,
  rank = rows of `hada_w1_b`); the Tucker variant rebuilds each factor as `einsum(t, b, a)` with `hada_t1/t2`.
- LoKr: `delta = kron(w1, w2) * scale` where `w1 = lokr_w1` or `lokr_w1_a @ lokr_w1_b`, `w2 = lokr_w2` or
  `lokr_w2_a @ lokr_w2_b` (or Tucker with `lokr_t2`); `scale = alpha / rank` where a factor is decomposed (rank =
  rows of its `_b`), else 1. A conv's w1 is broadcast over the kernel.
- DoRA (`dora_scale`, shape (1, in) / (1, in, 1, 1)): the new weight is `W' = (W + delta) * dora_scale /
  ||W + delta||`, the norm taken per input channel (over outputs and kernel), as the webui and ComfyUI do. A
  multiplier m blends: `W + m * (W' - W)`.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

LORA_KEYS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")
LOHA_KEYS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
COMMON_KEYS = ("alpha", "dora_scale")
ADAPTER_KEYS = LORA_KEYS + LOHA_KEYS + LOKR_KEYS + COMMON_KEYS
ALGOS = ("lora", "loha", "lokr")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n) with m * n = dimension and m <= n, as LyCORIS splits LoKr dims.

    `factor > 0` dividing the dimension gives (factor, dimension / factor) (smaller first); otherwise m grows through
    the divisors while m + n shrinks and m stays <= factor (-1: no limit, the most balanced split).
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def algo_of(parts: Mapping[str, object], name: str = "") -> str:
    """`lora`, `loha` or `lokr` from a module's keys; ValueError naming the missing keys of an incomplete module."""
    keys = set(parts)
    if keys & set(LOHA_KEYS):
        algo, needed = "loha", ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"] + \
            (["hada_t2"] if "hada_t1" in keys else []) + (["hada_t1"] if "hada_t2" in keys else [])
    elif keys & set(LOKR_KEYS):
        algo = "lokr"
        needed = (["lokr_w1"] if "lokr_w1_a" not in keys else ["lokr_w1_a", "lokr_w1_b"]) + \
                 (["lokr_w2"] if "lokr_w2_a" not in keys and "lokr_w2_b" not in keys else ["lokr_w2_a", "lokr_w2_b"])
    elif keys & {"lora_down.weight", "lora_up.weight"}:
        algo, needed = "lora", ["lora_down.weight", "lora_up.weight"]
    else:
        raise ValueError(f"module {name}: keys {sorted(keys)} are not LoRA (lora_down/lora_up), LoHa (hada_*) or "
                         f"LoKr (lokr_*) weights")
    missing = [k for k in needed if k not in keys]
    if missing:
        raise ValueError(f"module {name}: a {algo} module without {', '.join(missing)} (has {', '.join(sorted(keys))})")
    return algo


def _alpha(parts: Mapping[str, object]) -> float | None:
    alpha = parts.get("alpha")
    if alpha is None:
        return None
    return float(alpha.float().item()) if isinstance(alpha, torch.Tensor) else float(alpha)


def rank_of(parts: Mapping[str, torch.Tensor]) -> int | None:
    """The rank that alpha is divided by (None: a LoKr with both factors full, where alpha is not used)."""
    algo = algo_of(parts)
    if algo == "lora":
        return parts["lora_down.weight"].shape[0]
    if algo == "loha":
        return parts["hada_w1_b"].shape[0]
    if "lokr_w2_b" in parts:
        return parts["lokr_w2_b"].shape[0]
    if "lokr_w1_b" in parts:
        return parts["lokr_w1_b"].shape[0]
    return None


def scale_of(parts: Mapping[str, torch.Tensor]) -> float:
    """`alpha / rank` as the loaders compute it (a missing alpha, or a LoKr without rank, means 1)."""
    alpha, rank = _alpha(parts), rank_of(parts)
    return 1.0 if alpha is None or rank is None else alpha / rank


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rebuild a Tucker/CP factor: `einsum('i j k l, j r, i p -> p r k l', t, b, a)` (a: (rank, out), b: (rank, in))."""
    return torch.einsum("ijkl,jr,ip->prkl", t, b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1))


def lora_product(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`up @ down` (down through `lora_mid` when present), flat (out, in * kh * kw) unless the mid sets a kernel."""
    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    mid = parts.get("lora_mid.weight")
    up2 = up.reshape(up.shape[0], -1)
    if mid is None:
        return up2 @ down.reshape(down.shape[0], -1)
    down_eff = torch.einsum("abkl,bc->ackl", mid, down.reshape(down.shape[0], -1))
    return up2 @ down_eff.reshape(down_eff.shape[0], -1)


def loha_product(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`(w1_a @ w1_b) * (w2_a @ w2_b)` (Tucker with hada_t1 / hada_t2)."""
    if "hada_t1" in parts:
        w1 = _tucker(parts["hada_t1"], parts["hada_w1_a"], parts["hada_w1_b"])
        w2 = _tucker(parts["hada_t2"], parts["hada_w2_a"], parts["hada_w2_b"])
        return w1 * w2
    w1 = parts["hada_w1_a"] @ parts["hada_w1_b"].reshape(parts["hada_w1_b"].shape[0], -1)
    w2 = parts["hada_w2_a"] @ parts["hada_w2_b"].reshape(parts["hada_w2_b"].shape[0], -1)
    return w1 * w2


def lokr_product(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`kron(w1, w2)`; a 4-D w2 (conv kernel) gets w1 broadcast over the kernel."""
    w1 = parts["lokr_w1"] if "lokr_w1" in parts else parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"]
    elif "lokr_t2" in parts:
        w2 = _tucker(parts["lokr_t2"], parts["lokr_w2_a"], parts["lokr_w2_b"])
    else:
        w2 = parts["lokr_w2_a"] @ parts["lokr_w2_b"].reshape(parts["lokr_w2_b"].shape[0], -1)
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    return torch.kron(w1, w2.contiguous())


PRODUCTS = {"lora": lora_product, "loha": loha_product, "lokr": lokr_product}


def delta_weight(parts: Mapping[str, torch.Tensor], weight_shape: Sequence[int], name: str = "") -> torch.Tensor:
    """The module's `scale * product`, shaped like the weight (no DoRA, no multiplier), in the parts' dtype."""
    product = PRODUCTS[algo_of(parts, name)](parts)
    if product.numel() != math.prod(weight_shape):
        raise ValueError(f"module {name}: its delta has {tuple(product.shape)} = {product.numel()} values, the layer "
                         f"weight {tuple(weight_shape)}; the file was made for another model or architecture")
    return product.reshape(weight_shape) * scale_of(parts)


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input channel of a weight over outputs and kernel, shaped (1, in) / (1, in, 1, 1)."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norm.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2)))


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's new weight `(W + delta) * dora_scale / ||W + delta||` (norm per input channel)."""
    merged = weight + delta
    scale = dora_scale.reshape(1, weight.shape[1], *([1] * (weight.dim() - 2))).to(merged.dtype)
    return merged * (scale / column_norm(merged))


def weight_update(weight: torch.Tensor, parts: Mapping[str, torch.Tensor], multiplier: float = 1.0,
                  name: str = "") -> torch.Tensor:
    """What a module adds to `weight` at `multiplier`: `m * delta`, or with DoRA `m * (W' - W)`. float32 or wider."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    tensors = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and k != "alpha" else v) for k, v in parts.items()}
    delta = delta_weight(tensors, weight.shape, name)
    if "dora_scale" not in parts:
        return delta * multiplier
    base = weight.to(dtype)
    return (dora_weight(base, delta, tensors["dora_scale"]) - base) * multiplier


def merge_into_layer(layer: torch.nn.Module, parts: Mapping[str, torch.Tensor], multiplier: float, name: str = "",
                     device: torch.device | str | None = None) -> None:
    """Add `weight_update` of `parts` to `layer.weight` in place (computed in float32 on `device`)."""
    weight = layer.weight
    device = weight.device if device is None else device
    with torch.no_grad():
        w = weight.to(device=device, dtype=torch.float32)
        parts = {k: v.to(device) for k, v in parts.items()}
        weight.copy_(w + weight_update(w, parts, multiplier, name))


def group_modules(sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: parts} of a state dict keyed `<name>.<part>`."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        modules.setdefault(name, {})[part] = value
    return modules
