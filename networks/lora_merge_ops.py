"""Operations that turn LoRA files into a new LoRA: merge (same rank / concat / shuffle), SVD merge, resize.

All of them stream one module at a time from the inputs (files opened lazily by `lora_math.LoRAFile`) and
validate every input's header (families, ranks, shapes) before any arithmetic. The formulas:

- `merge_loras` (merge_lora.py without `--concat`; the kohya formula, kept so results match):
  for each module with base alpha a0 (that of the first input that has it),
  `down = sum_i sqrt(a_i / a0) * r_i * down_i`, `up = sum_i sqrt(a_i / a0) * |r_i| * up_i`, alpha = a0.
  This is not the sum of the deltas (cross terms) except for a single input with ratio 1.
- `merge_loras(concat=True)`: the factors are stacked along the rank, so the result's delta is exactly
  `sum_i r_i * delta_i`; the first input's scale alpha/rank is kept and the others' folded into their factors.
- `shuffle`: a random permutation of the rank dimension of up and down (the product is unchanged).
- `svd_merge_loras`: `sum_i r_i * delta_i` re-factored by SVD to `new_rank` (`new_conv_rank` for 3x3 convs).
- `resize_lora`: each module re-factored to `new_rank` or a dynamically chosen rank; alpha keeps the scale.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from tqdm import tqdm

from networks.lora_math import (ALPHA, DOWN, FAMILY_NAMES, UP, LoRAFile, ModuleInfo, check_same_family, dims_metadata,
                                delta_weight, families_compatible,
                                factorize, merged_metadata, open_loras, source_record)

logger = logging.getLogger(__name__)


@dataclass
class ModuleReport:
    """What happened to one module: ranks and the Frobenius norm kept (for SVD-based operations)."""

    name: str
    old_rank: int
    new_rank: int
    fro_retained: float = 1.0  # ||new delta|| / ||target delta||
    relative_error: float = 0.0  # ||target - new|| / ||target||
    solver: str = ""


def _union_modules(loras: Sequence[LoRAFile]) -> dict[str, ModuleInfo]:
    """Every module name across the inputs (first appearance order), checking their weight shapes agree."""
    seen: dict[str, tuple[ModuleInfo, LoRAFile]] = {}
    for lora in loras:
        for name, info in lora.modules.items():
            if name not in seen:
                seen[name] = (info, lora)
                continue
            first, first_file = seen[name]
            if first.weight_shape != info.weight_shape:
                raise ValueError(
                    f"module {name}: weight shape {list(first.weight_shape)} in {first_file.path} but "
                    f"{list(info.weight_shape)} in {lora.path}; these LoRAs are for different models (v1/v2/SDXL?)")
    return {name: info for name, (info, _) in seen.items()}


def check_ratios(models: Sequence[str], ratios: Sequence[float] | None) -> list[float]:
    """One ratio per model (all 1.0 when omitted); raises naming the flags otherwise."""
    if not models:
        raise ValueError("--models: give at least one LoRA file")
    if ratios is None or len(ratios) == 0:
        return [1.0] * len(models)
    if len(ratios) != len(models):
        raise ValueError(f"--ratios has {len(ratios)} values but --models has {len(models)} files; give one ratio per model")
    for r in ratios:
        if not math.isfinite(r):
            raise ValueError(f"--ratios {r}: not a finite number")
    return [float(r) for r in ratios]


def check_families(loras: Sequence[LoRAFile], allowed: Sequence[str] | None = None) -> str | None:
    """The common family of the LoRAs (None if unknown); raises for mixed families or one not in `allowed`."""
    family = check_same_family(loras)
    if allowed is not None and not any(families_compatible(family, a) for a in allowed):
        tool = "sdxl_merge_lora.py" if family == "sdxl" else "merge_lora.py"
        raise ValueError(f"{', '.join(str(l.path) for l in loras)}: {FAMILY_NAMES[family]} LoRA(s); "
                         f"this tool takes {' / '.join(FAMILY_NAMES[f] for f in allowed)} LoRAs (use {tool})")
    return family


def _check_same_ranks(loras: Sequence[LoRAFile]) -> None:
    first: dict[str, tuple[int, LoRAFile]] = {}
    for lora in loras:
        for name, info in lora.modules.items():
            if name in first and first[name][0] != info.rank:
                rank0, file0 = first[name]
                raise ValueError(
                    f"module {name}: rank {rank0} in {file0.path} but {info.rank} in {lora.path}; merge_lora.py merges "
                    f"LoRAs of the same rank only — use svd_merge_lora.py (re-factors to --new_rank) or --concat")
            first.setdefault(name, (info.rank, lora))


def merge_loras(paths: Sequence[str | os.PathLike], ratios: Sequence[float], *, dtype: torch.dtype = torch.float32,
                concat: bool = False, shuffle: bool = False, generator: torch.Generator | None = None,
                families: Sequence[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Merge LoRA files into one LoRA (see the module docstring for the formulas). Returns (tensors, metadata).

    `families` (e.g. ("sdxl",)) restricts the model versions accepted; others raise naming the right tool.
    """
    loras = open_loras(paths)
    try:
        family = check_families(loras, families)
        modules = _union_modules(loras)
        if not concat:
            _check_same_ranks(loras)
        out: dict[str, torch.Tensor] = {}
        ranks, alphas = [], []
        for name in tqdm(modules, desc="merging LoRAs", unit="module"):
            parts = [(lora.load(name, dtype), r) for lora, r in zip(loras, ratios) if name in lora.modules]
            down, up, alpha = (_concat_module(parts) if concat else _sum_module(parts))
            if shuffle:
                perm = torch.randperm(down.shape[0], generator=generator)
                down, up = down[perm], up[:, perm]
            out[name + DOWN], out[name + UP] = down.contiguous(), up.contiguous()
            out[name + ALPHA] = torch.tensor(alpha, dtype=torch.float32)
            ranks.append(down.shape[0])
            alphas.append(alpha)
        recipe = {"method": "concat" if concat else "merge", "shuffle": shuffle,
                  "models": [source_record(lora, r) for lora, r in zip(loras, ratios)]}
        metadata = merged_metadata([lora.metadata for lora in loras], recipe)
        metadata.update(dims_metadata(ranks, alphas))
        _set_family(metadata, family)
        return out, metadata
    finally:
        for lora in loras:
            lora.close()


def _sum_module(parts) -> tuple[torch.Tensor, torch.Tensor, float]:
    base_alpha = parts[0][0].alpha
    down = up = None
    for module, ratio in parts:
        scale = math.sqrt(module.alpha / base_alpha) * ratio if base_alpha else ratio
        d, u = module.down * scale, module.up * abs(scale)
        down = d if down is None else down + d
        up = u if up is None else up + u
    return down, up, base_alpha


def _concat_module(parts) -> tuple[torch.Tensor, torch.Tensor, float]:
    ref = parts[0][0]
    ref_scale = ref.scale if ref.scale != 0 else 1.0
    downs, ups = [], []
    for module, ratio in parts:
        factor = ratio * module.scale / ref_scale
        root = math.sqrt(abs(factor))
        downs.append(module.down * root)
        ups.append(module.up * (root if factor >= 0 else -root))
    down, up = torch.cat(downs, 0), torch.cat(ups, 1)
    return down, up, ref_scale * down.shape[0]


def svd_merge_loras(paths: Sequence[str | os.PathLike], ratios: Sequence[float], new_rank: int,
                    new_conv_rank: int | None = None, *, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, families: Sequence[str] | None = None,
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[ModuleReport]]:
    """`sum_i ratios[i] * delta_i` of every module, re-factored to `new_rank` (3x3 convs: `new_conv_rank`)."""
    conv_rank = new_conv_rank or new_rank
    loras = open_loras(paths)
    try:
        family = check_families(loras, families)
        modules = _union_modules(loras)
        out: dict[str, torch.Tensor] = {}
        reports: list[ModuleReport] = []
        for name, info in tqdm(modules.items(), desc="svd merge", unit="module"):
            ups, downs, dense = [], [], []
            for lora, ratio in zip(loras, ratios):
                if name in lora.modules and lora.modules[name].plain:
                    m = lora.load(name, dtype, device)
                    ups.append(m.up.float() * (ratio * m.scale))
                    downs.append(m.down.float())
                elif name in lora.modules:  # LoHa / LoKr / CP: its delta, factorised with the others below
                    dense.append(lora.delta(name, dtype, device).float() * ratio)
            rank = conv_rank if info.is_conv3x3 else new_rank
            if dense:
                delta = sum(dense) + sum(delta_weight(u, d) for u, d in zip(ups, downs))
                fact = factorize(info.weight_shape, rank, delta=delta.reshape(info.weight_shape))
            else:
                fact = factorize(info.weight_shape, rank, ups=ups, downs=downs)
            _store(out, name, fact.up, fact.down, float(fact.rank))
            reports.append(ModuleReport(name, sum(lora.modules[name].rank for lora in loras if name in lora.modules),
                                        fact.rank,
                                        fact.fro_retained_fraction, fact.relative_error, fact.solver))
        recipe = {"method": "svd_merge", "new_rank": new_rank, "new_conv_rank": conv_rank,
                  "models": [source_record(lora, r) for lora, r in zip(loras, ratios)]}
        metadata = merged_metadata([lora.metadata for lora in loras], recipe)
        metadata.update(dims_metadata([r.new_rank for r in reports], [r.new_rank for r in reports]))
        _drop_algo_args(metadata)
        _set_family(metadata, family)
        return out, metadata, reports
    finally:
        for lora in loras:
            lora.close()


def resize_lora(path: str | os.PathLike, new_rank: int, *, dynamic_method: str | None = None,
                dynamic_param: float | None = None, device: torch.device | str = "cpu",
                new_conv_rank: int | None = None,
                ) -> tuple[dict[str, torch.Tensor], dict[str, str], list[ModuleReport]]:
    """Re-factor every module of one LoRA to `new_rank` (3x3 convs: `new_conv_rank`, default `new_rank`; or a
    per-module rank chosen by `dynamic_method`, at most that); the delta's scale alpha/rank is kept, so alpha
    becomes scale * new rank."""
    with LoRAFile(path) as lora:
        out: dict[str, torch.Tensor] = {}
        reports: list[ModuleReport] = []
        for name, info in tqdm(lora.modules.items(), desc="resizing", unit="module"):
            rank = (new_conv_rank or new_rank) if info.is_conv3x3 else new_rank
            if info.plain:
                m = lora.load(name, torch.float32, device)
                fact = factorize(info.weight_shape, rank, ups=[m.up], downs=[m.down],
                                 dynamic_method=dynamic_method, dynamic_param=dynamic_param)
                scale = m.scale
            else:  # LoHa / LoKr / CP: the SVD of its delta, written as a LoRA of scale 1
                fact = factorize(info.weight_shape, rank, delta=lora.delta(name, torch.float32, device),
                                 dynamic_method=dynamic_method, dynamic_param=dynamic_param)
                scale = 1.0
            _store(out, name, fact.up, fact.down, scale * fact.rank)
            reports.append(ModuleReport(name, info.rank, fact.rank, fact.fro_retained_fraction,
                                        fact.relative_error, fact.solver))
        metadata = dict(lora.metadata)
    old_ranks = sorted({r.old_rank for r in reports})
    metadata = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    metadata.update(dims_metadata([r.new_rank for r in reports],
                                  [float(out[r.name + ALPHA]) for r in reports]))
    _drop_algo_args(metadata)
    how = f"dynamic resize with {dynamic_method}: {dynamic_param}" if dynamic_method else f"resized to {new_rank}"
    old = str(old_ranks[0]) if len(old_ranks) == 1 else "Dynamic"
    comment = metadata.get("ss_training_comment", "")
    metadata["ss_training_comment"] = f"{how} from {old}" + (f"; {comment}" if comment else "")
    return out, metadata, reports


def _store(out: dict[str, torch.Tensor], name: str, up: torch.Tensor, down: torch.Tensor, alpha: float) -> None:
    out[name + DOWN] = down.detach().cpu().contiguous()
    out[name + UP] = up.detach().cpu().contiguous()
    out[name + ALPHA] = torch.tensor(float(alpha), dtype=torch.float32)


def _drop_algo_args(metadata: dict[str, str]) -> None:
    """The output is a LoRA: LyCORIS args of a LoHa / LoKr input (`algo`, `factor`, ...) no longer describe it."""
    if "algo" in metadata.get("ss_network_args", ""):
        del metadata["ss_network_args"]


def _set_family(metadata: dict[str, str], family: str | None) -> None:
    if family in ("sd1", "sd2"):
        metadata["ss_v2"] = str(family == "sd2")
    if family == "sdxl":
        metadata.setdefault("ss_base_model_version", "sdxl_base_v1-0")


def summarize(reports: Sequence[ModuleReport]) -> str:
    """One line: modules, mean and worst retained Frobenius norm, worst relative error."""
    if not reports:
        return "no modules"
    worst = min(reports, key=lambda r: r.fro_retained)
    mean = sum(r.fro_retained for r in reports) / len(reports)
    err = max(reports, key=lambda r: r.relative_error)
    return (f"{len(reports)} modules; retained Frobenius norm mean {mean:.2%}, worst {worst.fro_retained:.2%} "
            f"({worst.name}); largest relative error {err.relative_error:.3g} ({err.name})")
