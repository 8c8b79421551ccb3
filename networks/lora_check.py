"""Inspection of a LoRA file: per-module dims, alpha and norms, and the problems worth a warning.

Problems flagged: NaN / inf values, modules whose delta is exactly zero (an untrained `lora_up`), and, given a
reference architecture (`--arch`, real size) or model file (`--sd_model`), module names that match no layer
of it and shapes that do not fit. The names come from `networks.lora_names` (via empty models).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from networks.lora_math import LoRAFile, ModuleInfo


@dataclass
class ModuleRow:
    name: str
    kind: str  # linear / conv1x1 / conv3x3
    in_dim: int
    out_dim: int
    rank: int
    alpha: float
    down_norm: float
    up_norm: float
    delta_norm: float  # ||up @ down * alpha / rank||_F
    problems: list[str] = field(default_factory=list)


@dataclass
class CheckResult:
    path: str
    rows: list[ModuleRow]
    problems: list[str]  # file-level lines, one per problem

    @property
    def ok(self) -> bool:
        return not self.problems


def _kind(info: ModuleInfo) -> str:
    return "conv3x3" if info.is_conv3x3 else ("conv1x1" if info.is_conv else "linear")


def _product_norm(up: torch.Tensor, down: torch.Tensor) -> float:
    """||up @ down||_F without forming the product: sqrt(trace((Uᵀ U)(D Dᵀ)))."""
    u = up.reshape(up.shape[0], -1).double()
    d = down.reshape(down.shape[0], -1).double()
    return math.sqrt(max(float(((u.T @ u) * (d @ d.T)).sum()), 0.0))


def _finite_problem(name: str, part: str, t: torch.Tensor) -> str | None:
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    if nan or inf:
        return f"{name}.{part}: {nan} NaN and {inf} inf values"
    return None


def _lora_row(lora: LoRAFile, name: str, info: ModuleInfo) -> ModuleRow:
    m = lora.load(name)
    row = ModuleRow(name, _kind(info), int(math.prod(info.weight_shape[1:])), info.out_features, info.rank,
                    m.alpha, float(m.down.double().norm()), float(m.up.double().norm()), 0.0)
    for part, t in (("lora_down.weight", m.down), ("lora_up.weight", m.up), ("alpha", torch.tensor(m.alpha))):
        issue = _finite_problem(name, part, t)
        if issue:
            row.problems.append(issue)
    if not row.problems:
        row.delta_norm = _product_norm(m.up, m.down) * abs(m.scale)
        if row.delta_norm == 0.0:
            row.problems.append(f"{name}: delta is zero (lora_up or lora_down all zeros: untrained?)")
    return row


def _adapter_row(lora: LoRAFile, name: str, info: ModuleInfo) -> ModuleRow:
    """A LoHa / LoKr / DoRA / CP module: kind shown as `<algo>:<kind>`, |down| and |up| as the norms of all its
    factors, |delta| that of its delta (for DoRA the low-rank part, before the magnitude)."""
    from networks import adapter_math as am

    parts = lora.load_parts(name, torch.float64)
    alpha = float(parts["alpha"]) if "alpha" in parts else float(info.rank)
    factors = [t for k, t in parts.items() if k not in am.COMMON_KEYS]
    label = info.algo + ("+dora" if "dora_scale" in parts else "")
    row = ModuleRow(name, f"{label}:{_kind(info)}", int(math.prod(info.weight_shape[1:])), info.out_features,
                    info.rank, alpha, float(sum(t.norm() ** 2 for t in factors) ** 0.5), 0.0, 0.0)
    for part, t in parts.items():
        issue = _finite_problem(name, part, t)
        if issue:
            row.problems.append(issue)
    if not row.problems:
        row.delta_norm = float(am.delta_weight(parts, info.weight_shape, name).norm())
        if row.delta_norm == 0.0:
            row.problems.append(f"{name}: delta is zero (a factor is all zeros: untrained?)")
    return row


def check_lora(path: str | os.PathLike, reference: dict | None = None, reference_name: str = "") -> CheckResult:
    """Inspect every module; `reference` is {lora name: weight shape} of a model to match names and shapes."""
    rows: list[ModuleRow] = []
    problems: list[str] = []
    with LoRAFile(path) as lora:
        for name, info in lora.modules.items():
            row = _lora_row(lora, name, info) if info.plain else _adapter_row(lora, name, info)
            if reference is not None:
                shape = reference.get(name)
                if shape is None:
                    row.problems.append(f"{name}: matches no LoRA layer of {reference_name}")
                elif math.prod(shape) != math.prod(info.weight_shape) or shape[0] != info.weight_shape[0]:
                    row.problems.append(f"{name}: delta shape {list(info.weight_shape)} does not fit the layer's "
                                        f"weight {list(shape)} in {reference_name}")
            problems.extend(row.problems)
            rows.append(row)
    return CheckResult(str(path), rows, problems)


def reference_from_arch(arch: str) -> dict[str, tuple[int, ...]]:
    """{lora name: weight shape} of the real-size `arch` (sd1, sd2, sdxl), from models on the meta device."""
    from library.sd_configs import build_models
    from networks.lora_names import lora_targets

    models = build_models(arch, "full", meta=True, tokenizers=False)
    targets = lora_targets(models.text_encoders, models.unet, sdxl=models.is_sdxl, include_conv3x3=True,
                           include_extra=True)
    return {name: tuple(t.module.weight.shape) for name, t in targets.items()}


def reference_from_checkpoint(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """{lora name (and accepted aliases): weight shape} of a single-file checkpoint, from its header only."""
    from library import ldm_convert as lc
    from library.tensor_stream import TensorFile
    from networks.lora_checkpoint_ops import placed_targets, read_shapes

    with TensorFile(path) as f:
        shapes = read_shapes(f)
    layout = lc.infer_layout(shapes, str(path))
    return {name: p.weight_shape for name, p in placed_targets(layout, aliases=True).items()}


def format_table(result: CheckResult, problems_only: bool = False) -> str:
    """The per-module table (one line per module, or per module with a problem) and a summary of all modules."""
    lines = [f"{'module':<80} {'kind':<8} {'in':>6} {'out':>6} {'rank':>4} {'alpha':>7} {'|down|':>9} "
             f"{'|up|':>9} {'|delta|':>9}"]
    for r in (r for r in result.rows if r.problems or not problems_only):
        flag = "  <-- " + "; ".join(p.split(": ", 1)[1] for p in r.problems) if r.problems else ""
        lines.append(f"{r.name:<80} {r.kind:<8} {r.in_dim:>6} {r.out_dim:>6} {r.rank:>4} {r.alpha:>7.4g} "
                     f"{r.down_norm:>9.4g} {r.up_norm:>9.4g} {r.delta_norm:>9.4g}{flag}")
    ranks = sorted({r.rank for r in result.rows})
    lines.append(f"{len(result.rows)} modules, ranks {ranks}, {len(result.problems)} problem(s)")
    return "\n".join(lines)
