"""LoRA operations on single-file checkpoints, key by key: merge LoRAs into a model, extract a LoRA from two.

Neither builds the models. The LoRA module names come from `networks.lora_names.lora_targets` on empty
(meta-device) models of the checkpoint's inferred layout, and each target's weight is located in the file by
`library.ldm_convert.ldm_param_for` (a key, possibly a row block of OpenCLIP's fused q/k/v). Then:

- merging streams the checkpoint one tensor at a time: read, add `ratio * delta` of every LoRA module that
  targets it (in the order of --models), cast, and append to the output file (`SafetensorsWriter`), so the
  peak memory is about one tensor plus the LoRAs;
- extracting reads the two checkpoints' tensors pairwise and factors each difference by truncated SVD.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from library import ldm_convert as lc
from library.file_io import CheckpointError, atomic_path
from library.model_loading import check_family
from library.tensor_stream import SafetensorsWriter, TensorFile
from networks.lora_math import (ALPHA, DOWN, FAMILY_NAMES, UP, LoRAFile, check_same_family, dims_metadata,
                                factorize, fit_to_weight, open_loras, source_record)
from networks.adapter_math import weight_update
from networks.lora_target_tables import target_table

logger = logging.getLogger(__name__)

COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}


@dataclass(frozen=True)
class PlacedTarget:
    """A LoRA target (as `lora_names` defines it) and where its weight lives in the single file."""

    name: str
    component: str  # unet / te / te1 / te2
    path: str  # module path inside its component
    kind: str  # linear / conv1x1 / conv3x3
    weight_shape: tuple[int, ...]  # the diffusers weight's shape (what a LoRA delta is shaped like)
    param: lc.LdmParam

    @property
    def is_unet(self) -> bool:
        return self.component == "unet"


def read_shapes(f: TensorFile) -> dict[str, tuple[int, ...]]:
    return {k: f.shape(k) for k in f.keys()}


def checkpoint_layout(f: TensorFile, family: str, v_parameterization: bool = False) -> lc.LdmLayout:
    """The layout of a checkpoint, refusing a family other than `family` with a one-line error."""
    shapes = read_shapes(f)
    found = lc.detect_family(shapes, str(f.path))
    check_family(found, str(f.path), v2=family == "sd2", sdxl=family == "sdxl")
    return lc.infer_layout(shapes, str(f.path), v_parameterization, found)


def placed_targets(layout: lc.LdmLayout, include_conv3x3: bool = True,
                   aliases: bool = False, include_extra: bool = True) -> dict[str, PlacedTarget]:
    """{lora name: PlacedTarget} of every LoRA target of the layout (text encoders first, then the UNet).

    `include_conv3x3` selects the LoRA-C3Lier set (else LoRA-LierLa). `aliases` adds the other spellings
    `networks.lora_names.LoRANameResolver` accepts (SDXL names in the diffusers layout, SD names in the original layout), mapped
    to the same targets, for reading files written by other trainers. `include_extra` (with include_conv3x3) adds
    conv_in, conv_out and the time / add embeddings, which LyCORIS files adapt.
    """
    table = target_table(layout)
    placed: dict[str, PlacedTarget] = {}
    for name, component, path, kind, shape, c3lier_only in table["targets"]:
        if (c3lier_only and not include_conv3x3) or (c3lier_only == "extra" and not include_extra):
            continue
        param = lc.ldm_param_for(COMPONENTS[component], path + ".weight", layout)
        placed[name] = PlacedTarget(name, component, path, kind, tuple(shape), param)
    if aliases:
        for alias, canonical in table["aliases"].items():
            if canonical in placed:
                placed[alias] = placed[canonical]
    return placed


# ----------------------------------------------------------------------------------------------- merge into a model
def merge_into_checkpoint(sd_model: str | os.PathLike, save_to: str | os.PathLike, models: Sequence[str],
                          ratios: Sequence[float], *, family: str, merge_dtype: torch.dtype = torch.float32,
                          save_dtype: torch.dtype | None = None) -> None:
    """Write `sd_model` with `ratio_i * delta` of every LoRA added to its weights, in the original layout."""
    save_dtype = save_dtype or merge_dtype
    loras = open_loras(models)
    try:
        with TensorFile(sd_model) as ckpt:
            layout = checkpoint_layout(ckpt, family)
            check_same_family(loras, layout.family, f"--sd_model {sd_model}")
            plan = _merge_plan(loras, ratios, placed_targets(layout, aliases=True), ckpt, layout.family)
            _write_merged(ckpt, plan, loras, save_to, merge_dtype, save_dtype,
                          {"ss_merge_recipe": json.dumps({"method": "merge_into_model", "models": [
                              source_record(l, r) for l, r in zip(loras, ratios)]})})
    finally:
        for lora in loras:
            lora.close()
    logger.info("merged %d LoRA(s) into %s", len(loras), save_to)


def _merge_plan(loras: Sequence[LoRAFile], ratios: Sequence[float], placed: dict[str, PlacedTarget],
                ckpt: TensorFile, family: str) -> dict[str, list[tuple[int, str, float, PlacedTarget]]]:
    """{file key: [(lora index, module name, ratio, target), ...]}, every module checked against the model."""
    plan: dict[str, list] = {}
    for i, (lora, ratio) in enumerate(zip(loras, ratios)):
        for name, info in lora.modules.items():
            p = placed.get(name)
            if p is None:
                raise ValueError(f"{lora.path}: module {name} matches no layer of this {FAMILY_NAMES[family]} "
                                 f"model (a LoRA for another model version, or not a LoRA-LierLa/C3Lier file?)")
            fit_to_weight(torch.empty(info.weight_shape, device="meta"), p.weight_shape, f"{name} in {lora.path}")
            if p.param.key not in ckpt:
                raise CheckpointError(f"{ckpt.path}: has no tensor {p.param.key} (needed by {name} of {lora.path})")
            plan.setdefault(p.param.key, []).append((i, name, ratio, p))
    return plan


def _write_merged(ckpt: TensorFile, plan, loras, save_to, merge_dtype, save_dtype, metadata) -> None:
    keys = [k for k in ckpt.keys() if not k.startswith("model_ema.")]
    if len(keys) < len(ckpt.keys()):  # the EMA copy would no longer match the merged weights
        logger.info("dropping %d model_ema.* tensors (an EMA copy without the LoRA)", len(ckpt.keys()) - len(keys))
    out_dtype = lambda k: save_dtype if ckpt.dtype(k).is_floating_point else ckpt.dtype(k)  # noqa: E731
    layout = [(k, out_dtype(k), ckpt.shape(k)) for k in keys]
    meta = {**ckpt.metadata, **metadata}
    safetensors = Path(save_to).suffix.lower() == ".safetensors"
    with atomic_path(save_to) as tmp:
        writer = SafetensorsWriter(tmp, layout, meta) if safetensors else None
        collected: dict[str, torch.Tensor] = {}
        for key in tqdm(keys, desc="merging into model", unit="tensor"):
            raw = ckpt.raw_range(key) if writer is not None and key not in plan and \
                out_dtype(key) == ckpt.dtype(key) else None
            if raw is not None:  # untouched tensor, same dtype: copy its bytes as they are
                writer.copy_raw(key, *raw)
                continue
            tensor = ckpt.get(key)
            if key in plan:
                tensor = _apply(tensor.to(merge_dtype), plan[key], loras, merge_dtype)
            tensor = tensor.to(out_dtype(key))
            if writer is not None:
                writer.write(key, tensor)
            else:
                collected[key] = tensor
            del tensor  # before the next read: at most one tensor in memory
        if writer is not None:
            writer.close()
        else:
            torch.save({"state_dict": collected}, tmp)


def _apply(tensor: torch.Tensor, contributions, loras, dtype: torch.dtype) -> torch.Tensor:
    for index, name, ratio, placed in contributions:
        if loras[index].modules[name].plain:
            module = loras[index].load(name, dtype)
            delta = fit_to_weight(module.delta(dtype) * ratio, placed.weight_shape, name)
        else:  # LoHa / LoKr / DoRA / CP: the update of the current weight (DoRA depends on it)
            weight = placed.param.from_ldm(tensor).reshape(placed.weight_shape)
            delta = weight_update(weight, loras[index].load_parts(name, dtype), ratio, name).to(dtype)
        target = tensor[placed.param.rows] if placed.param.rows is not None else tensor
        target += placed.param.to_ldm(delta).reshape(target.shape)
    return tensor


# ----------------------------------------------------------------------------------------------- extract
@dataclass
class ExtractOptions:
    dim: int = 4
    conv_dim: int | None = None
    device: torch.device | str = "cpu"
    load_dtype: torch.dtype = torch.float32
    clamp_quantile: float = 0.99
    min_diff: float = 0.01
    solver: str = "auto"


def extract_lora(model_org: str | os.PathLike, model_tuned: str | os.PathLike, family: str,
                 options: ExtractOptions, v_parameterization: bool = False,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str], list]:
    """LoRA approximating `model_tuned - model_org`: (tensors, metadata, per-module reports)."""
    from networks.lora_merge_ops import ModuleReport

    with TensorFile(model_org) as org, TensorFile(model_tuned) as tuned:
        layout = checkpoint_layout(org, family, v_parameterization)
        tuned_layout = checkpoint_layout(tuned, family, v_parameterization)
        if tuned_layout.unet_config != layout.unet_config or tuned_layout.text_encoder_configs != layout.text_encoder_configs:
            raise ValueError(f"--model_org {model_org} and --model_tuned {model_tuned} have different architectures "
                             f"or sizes; extract needs two versions of the same model")
        placed = placed_targets(layout, include_conv3x3=options.conv_dim is not None, include_extra=False)
        placed_tuned = placed_targets(tuned_layout, include_conv3x3=options.conv_dim is not None, include_extra=False)
        out: dict[str, torch.Tensor] = {}
        reports: list[ModuleReport] = []
        te_max_diff: dict[str, float] = {}
        reader = _PairReader(org, tuned, options.load_dtype)
        for name, p in tqdm(placed.items(), desc="extracting", unit="module"):
            diff = _difference(reader, p, placed_tuned[name], options.device)
            if not p.is_unet:
                te_max_diff[p.component] = max(te_max_diff.get(p.component, 0.0),
                                                      float(diff.abs().max()) if diff.numel() else 0.0)
            rank = options.conv_dim if p.kind == "conv3x3" else options.dim
            fact = factorize(p.weight_shape, rank, delta=diff, solver=options.solver)
            up, down = _clamp(fact.up, fact.down, options.clamp_quantile)
            out[name + DOWN], out[name + UP] = down.cpu().contiguous(), up.cpu().contiguous()
            out[name + ALPHA] = torch.tensor(float(fact.rank))
            reports.append(ModuleReport(name, 0, fact.rank, fact.fro_retained_fraction, fact.relative_error, fact.solver))
    for component, value in te_max_diff.items():
        if value <= options.min_diff:
            logger.info("text encoder %s: max difference %.3g <= --min_diff %g, treated as unchanged (not in the LoRA)",
                        component, value, options.min_diff)
            prefix = f"lora_{component}_"
            out = {k: v for k, v in out.items() if not k.startswith(prefix)}
            reports = [r for r in reports if not r.name.startswith(prefix)]
    return out, _extract_metadata(layout.family, options, reports, v_parameterization), reports


class _PairReader:
    """Reads a target's weight from both checkpoints (each through its own key layout), caching the last
    file tensor of each so a fused q/k/v tensor is read once for its three projections."""

    def __init__(self, org: TensorFile, tuned: TensorFile, dtype: torch.dtype | None):
        self.files = {"--model_org": org, "--model_tuned": tuned}
        self.dtype = dtype
        self.cached: dict[str, tuple[str, torch.Tensor]] = {}

    def read(self, which: str, p: PlacedTarget) -> torch.Tensor:
        f = self.files[which]
        key = p.param.key
        if self.cached.get(which, ("",))[0] != key:
            if key not in f:
                raise CheckpointError(f"{which} {f.path}: has no tensor {key}")
            self.cached[which] = (key, f.get(key, self.dtype))
        t = self.cached[which][1]
        return t[p.param.rows] if p.param.rows is not None else t


def _difference(reader: _PairReader, p_org: PlacedTarget, p_tuned: PlacedTarget, device) -> torch.Tensor:
    a = reader.read("--model_org", p_org).to(device, torch.float32)
    b = reader.read("--model_tuned", p_tuned).to(device, torch.float32)
    return (b - a).reshape(p_org.weight_shape)


def _clamp(up: torch.Tensor, down: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's outlier clamp: both factors clipped to the `quantile` of the absolute values of their entries
    taken together (1.0 disables it)."""
    if quantile >= 1.0:
        return up, down
    values = torch.cat([up.flatten(), down.flatten()]).abs().float()
    if values.numel() > 16_000_000:  # torch.quantile's input limit
        values = values[torch.randperm(values.numel(), device=values.device)[:16_000_000]]
    hi = float(torch.quantile(values, quantile))
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def _extract_metadata(family: str, options: ExtractOptions, reports, v_parameterization: bool) -> dict[str, str]:
    meta = dims_metadata([r.new_rank for r in reports] or [options.dim], [r.new_rank for r in reports] or [options.dim])
    meta["ss_network_dim"], meta["ss_network_alpha"] = str(options.dim), str(options.dim)
    if options.conv_dim is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(options.conv_dim), "conv_alpha": str(options.conv_dim)})
    meta["ss_v2"] = str(family == "sd2")
    meta["ss_base_model_version"] = {"sd1": "sd_v1", "sd2": "sd_v2_768_v" if v_parameterization else "sd_v2",
                                     "sdxl": "sdxl_base_v1-0"}[family]
    if v_parameterization:
        meta["ss_v_parameterization"] = "True"
    meta["ss_training_comment"] = (f"extracted by extract_lora_from_models.py (dim {options.dim}, conv_dim "
                                   f"{options.conv_dim}, clamp_quantile {options.clamp_quantile})")
    return meta
