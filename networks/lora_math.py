"""The arithmetic shared by the LoRA tools: reading LoRA files per module, deltas, SVD factorisation, ranks.

A kohya LoRA file holds, per module `name`, `name.lora_down.weight` (rank, in) — for a Conv2d (rank, in, kh, kw)
—, `name.lora_up.weight` (out, rank) or (out, rank, 1, 1), and `name.alpha` (a scalar; missing means
alpha = rank). The module adds `delta = up @ down * alpha / rank` to the original weight (for a conv the
product is taken over the flattened kernel and reshaped back).

Factorising a delta back to a rank uses, in order of preference:
- the exact thin SVD of a product of factors (`svd_of_factors`): a sum of LoRAs is `U_stack @ D_stack`, so two
  QR decompositions and an SVD of an R x R matrix give its exact SVD without ever forming the full matrix;
- `torch.svd_lowrank` (randomised) for a full-rank matrix when only a few singular triplets are wanted; the
  residual of the truncation is computed exactly from the Frobenius norms and reported;
- `torch.linalg.svd` for small matrices, where it is cheap anyway.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from library.file_io import CheckpointError
from library.tensor_stream import TensorFile


DOWN, UP, ALPHA = ".lora_down.weight", ".lora_up.weight", ".alpha"
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6  # a delta whose largest singular value is below this is treated as zero


# ----------------------------------------------------------------------------------------------- reading
@dataclass
class ModuleInfo:
    """Shapes of one module, known from the file header without loading data.

    For LoHa / LoKr / DoRA / LoCon-CP modules (`algo` and `plain`), `down_shape` / `up_shape` are those of a LoRA of
    the module's rank with the same weight shape (`adapter_shape`), so rank, kind and shapes read alike.
    """

    name: str
    down_shape: tuple[int, ...]
    up_shape: tuple[int, ...]
    has_alpha: bool
    algo: str = "lora"
    plain: bool = True  # lora_down / lora_up / alpha only: factors that kohya's LoRA tools can add

    @property
    def rank(self) -> int:
        return self.down_shape[0]

    @property
    def is_conv(self) -> bool:
        return len(self.down_shape) == 4

    @property
    def is_conv3x3(self) -> bool:
        return self.is_conv and tuple(self.down_shape[2:]) != (1, 1)

    @property
    def out_features(self) -> int:
        return self.up_shape[0]

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the delta (and of the weight it is added to)."""
        return (self.up_shape[0], self.down_shape[1], *self.down_shape[2:])


@dataclass
class LoRAModule:
    """One module's factors and alpha, loaded."""

    name: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`up @ down * alpha / rank`, shaped like the original weight."""
        return delta_weight(self.up, self.down, self.scale, dtype)


class LoRAFile:
    """A LoRA (or LoHa / LoKr / DoRA) file opened lazily: its modules (shapes from the header), metadata, and
    per-module loading. Foreign key layouts (diffusers / PEFT, ComfyUI) are read through
    `networks.convert_lora` under kohya names."""

    def __init__(self, path: str | os.PathLike):
        from networks.convert_lora import KeyMap

        self.path = Path(path)
        self._file = TensorFile(self.path)
        self.metadata: dict[str, str] = dict(self._file.metadata)
        self._keys = KeyMap.for_keys(list(self._file.keys()), self.path)
        self.modules: dict[str, ModuleInfo] = _group_keys(self._file, self.path, self._keys)

    def _get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self._keys.get(self._file, key, dtype)

    def load(self, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> LoRAModule:
        info = self.modules[name]
        if not info.plain:
            raise ValueError(f"{self.path}: module {name} is {_describe(info)}, not plain lora_down/lora_up factors; "
                             f"this operation adds LoRA factors (use svd_merge_lora.py, which merges the deltas)")
        down = self._get(name + DOWN, dtype).to(device)
        up = self._get(name + UP, dtype).to(device)
        alpha = float(self._get(name + ALPHA).float().item()) if info.has_alpha else float(info.rank)
        return LoRAModule(name, down, up, alpha)

    def load_parts(self, name: str, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """{part: tensor} of a module of any format (`networks.adapter_math` computes its update)."""
        return {part: self._get(f"{name}.{part}", None if part == "alpha" else dtype).to(device)
                for part in self._keys.parts[name]}

    def delta(self, name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.Tensor:
        """The module's delta (weight-shaped, alpha applied); DoRA modules need the base weight and raise."""
        from networks import adapter_math as am

        parts = self.load_parts(name, dtype, device)
        if "dora_scale" in parts:
            raise ValueError(f"{self.path}: module {name} is DoRA (dora_scale): its update depends on the base "
                             f"model's weight; merge it into a checkpoint with merge_lora.py --sd_model")
        return am.delta_weight(parts, self.modules[name].weight_shape, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "LoRAFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _describe(info: ModuleInfo) -> str:
    return {"loha": "LoHa", "lokr": "LoKr"}.get(info.algo, "DoRA / LoCon-CP LoRA")


def _group_keys(f: TensorFile, path: Path, keys) -> dict[str, ModuleInfo]:
    from networks import adapter_math as am

    modules: dict[str, ModuleInfo] = {}
    proj_is_conv = _proj_is_conv(f.metadata, keys, f)
    for name, parts in keys.parts.items():
        shapes = {part: tuple(keys.shape(f, f"{name}.{part}")) for part in parts}
        try:
            algo = am.algo_of(shapes, name)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        plain = algo == "lora" and set(shapes) <= {"lora_down.weight", "lora_up.weight", "alpha"}
        if plain:
            down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
            if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0] or \
                    (len(up) == 4 and tuple(up[2:]) != (1, 1)):
                raise CheckpointError(f"{path}: module {name} has inconsistent shapes lora_down {list(down)}, "
                                      f"lora_up {list(up)}")
            modules[name] = ModuleInfo(name, down, up, "alpha" in shapes)
            continue
        weight_shape = adapter_weight_shape(name, shapes, proj_is_conv)
        rank = min(am.rank_of({k: torch.empty(v, device="meta") for k, v in shapes.items()}) or 1,
                   weight_shape[0], math.prod(weight_shape[1:]))
        down = (rank, *weight_shape[1:])
        up = (weight_shape[0], rank, *([1, 1] if len(weight_shape) == 4 else []))
        modules[name] = ModuleInfo(name, down, up, "alpha" in shapes, algo, False)
    if not modules:
        raise CheckpointError(f"{path}: holds no LoRA modules (no *.lora_down.weight keys)")
    return modules


def _proj_is_conv(metadata: Mapping[str, str], keys, f: TensorFile) -> bool:
    """Whether the file is for SD 1.x (proj_in/out are 1x1 convs): not when its metadata or names say SD 2.x / SDXL
    (lora_te1_/lora_te2_, SGM UNet names, ss_v2, a 1024-wide text encoder)."""
    base = (metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or "").lower()
    if metadata.get("ss_v2") == "True" or base.startswith(("sd_v2", "stable-diffusion-v2", "sdxl",
                                                            "stable-diffusion-xl")):
        return False
    for name, parts in keys.parts.items():
        if name.startswith(("lora_te1_", "lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks",
                            "lora_unet_middle_block")):
            return False
        if name.startswith("lora_te_") and name.endswith("q_proj") and "lora_down.weight" in parts:
            return keys.shape(f, f"{name}.lora_down.weight")[1] != 1024
    return True


def adapter_weight_shape(name: str, shapes: Mapping[str, tuple[int, ...]], proj_is_conv: bool = True
                         ) -> tuple[int, ...]:
    """The layer weight shape of a LoHa / LoKr / DoRA / CP module from its tensor shapes.

    Exact where a tensor carries the kernel (LoKr's full w2, Tucker cores, `lora_mid`, 4-D LoRA factors) or the
    input width (`dora_scale`); otherwise LoHa / LoKr factors hold in * kh * kw flattened, and the kernel comes from
    the module name (`networks.lora_names.conv_kernel_of_name`; `proj_is_conv` for SD 1.x files).
    """
    from networks.lora_names import conv_kernel_of_name

    if "lora_down.weight" in shapes:
        down, up, mid = shapes["lora_down.weight"], shapes["lora_up.weight"], shapes.get("lora_mid.weight")
        if mid:
            return (up[0], down[1], *mid[2:])
        if len(down) == 4:
            return (up[0], *down[1:])
        out, flat_in = up[0], down[1]
    elif "hada_w1_a" in shapes:
        t1 = shapes.get("hada_t1")
        if t1:
            return (shapes["hada_w1_a"][1], shapes["hada_w1_b"][1], *t1[2:])
        out, flat_in = shapes["hada_w1_a"][0], math.prod(shapes["hada_w1_b"][1:])
    else:
        w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        if "lokr_w2" in shapes:
            w2 = shapes["lokr_w2"]
            return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        if "lokr_t2" in shapes:
            t2 = shapes["lokr_t2"]
            return (w1[0] * shapes["lokr_w2_a"][1], w1[1] * shapes["lokr_w2_b"][1], *t2[2:])
        out, flat_in = w1[0] * shapes["lokr_w2_a"][0], w1[1] * math.prod(shapes["lokr_w2_b"][1:])
    dora = shapes.get("dora_scale")
    if dora is not None and len(dora) >= 2 and flat_in % dora[1] == 0 and flat_in != dora[1]:
        k = math.isqrt(flat_in // dora[1])
        return (out, dora[1], k, flat_in // dora[1] // k)
    if dora is not None and len(dora) == 4:
        return (out, flat_in, 1, 1)
    kernel = conv_kernel_of_name(name, proj_is_conv)
    if kernel == (3, 3) and flat_in % 9 == 0:
        return (out, flat_in // 9, 3, 3)
    if kernel == (1, 1):
        return (out, flat_in, 1, 1)
    return (out, flat_in)


def _foreign_key_message(path: Path, key: str) -> str:
    kind = ""
    if any(s in key for s in (".diff", "oft_", "boft_", ".w_norm", "glora")):
        kind = " (a LyCORIS full/OFT/BOFT/GLoRA tensor, a format these tools do not read)"
    return (f"{path}: key {key}{kind} is not a key of a LoRA, LoHa, LoKr or DoRA file; expected <module>.lora_down"
            f".weight / lora_up.weight / alpha, hada_*, lokr_* or dora_scale")


def open_loras(paths: Sequence[str | os.PathLike]) -> list[LoRAFile]:
    """Open every LoRA file (headers only) so that bad input is reported before any heavy work."""
    return [LoRAFile(p) for p in paths]


# ----------------------------------------------------------------------------------------------- deltas
def delta_weight(up: torch.Tensor, down: torch.Tensor, scale: float = 1.0,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
    """`up @ down * scale` in the weight's shape; conv factors are multiplied over the flattened kernel."""
    if dtype is not None:
        up, down = up.to(dtype), down.to(dtype)
    rank = down.shape[0]
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return (product * scale).reshape(up.shape[0], *down.shape[1:])


def fit_to_weight(delta: torch.Tensor, weight_shape: Sequence[int], name: str = "") -> torch.Tensor:
    """Reshape a delta to the weight's shape (Linear vs 1x1 conv), or raise naming both shapes."""
    if tuple(delta.shape) == tuple(weight_shape):
        return delta
    if delta.numel() == math.prod(weight_shape) and delta.shape[0] == weight_shape[0]:
        return delta.reshape(weight_shape)
    raise ValueError(f"LoRA module {name}: delta shape {list(delta.shape)} does not fit weight shape "
                     f"{list(weight_shape)} (a LoRA for another model version or architecture?)")


# ----------------------------------------------------------------------------------------------- SVD
@dataclass
class Factorization:
    """`up @ down` (weight-shaped via `delta_weight(up, down)`) approximating a delta at `rank`."""

    up: torch.Tensor
    down: torch.Tensor
    singular_values: torch.Tensor  # the kept ones
    total_fro: float  # Frobenius norm of the delta that was factorised
    retained_fro: float  # Frobenius norm of the kept part
    residual_fro: float  # Frobenius norm of delta - up @ down
    solver: str

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def fro_retained_fraction(self) -> float:
        return 1.0 if self.total_fro == 0 else self.retained_fro / self.total_fro

    @property
    def relative_error(self) -> float:
        """||delta - up @ down||_F / ||delta||_F."""
        return 0.0 if self.total_fro == 0 else self.residual_fro / self.total_fro


def svd_of_factors(ups: Sequence[torch.Tensor], downs: Sequence[torch.Tensor]):
    """Exact thin SVD (U, S, Vh) of `sum_i ups[i] @ downs[i]` (2-D factors) without forming the product.

    Stacking gives `A = Us @ Ds` with inner size R; `Us = Qu Ru`, `Ds^T = Qd Rd` (QR), so
    `A = Qu (Ru Rd^T) Qd^T` and the SVD of the R x R core gives A's singular triplets.
    """
    us = torch.cat([u.reshape(u.shape[0], -1) for u in ups], dim=1)
    ds = torch.cat([d.reshape(d.shape[0], -1) for d in downs], dim=0)
    qu, ru = torch.linalg.qr(us)
    qd, rd = torch.linalg.qr(ds.T)
    u, s, vh = torch.linalg.svd(ru @ rd.T)
    return qu @ u, s, vh @ qd.T


def truncated_svd(mat: torch.Tensor, rank: int, solver: str = "auto", oversample: int = 8, niter: int = 2):
    """Top singular triplets (U, S, Vh) of a 2-D matrix, the solver used and the residual norm past `rank`.

    `solver`: `exact` (torch.linalg.svd; returns all singular values), `randomized` (torch.svd_lowrank with
    `rank + oversample` columns and `niter` power iterations: exact for matrices of rank <= rank + oversample,
    near-optimal otherwise; returns `rank + oversample` values) or `auto` (randomized only where the matrix is
    much larger than the requested rank). The residual `||mat - U_k S_k Vh_k||` (k = rank) is exact: from the
    discarded singular values, or computed explicitly for the randomized solver.
    """
    if solver not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown SVD solver {solver!r}; expected auto, exact or randomized")
    small = min(mat.shape)
    q = min(rank + oversample, small)
    if solver == "exact" or (solver == "auto" and small <= 4 * q):
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
        return u, s, vh, "exact", float(torch.linalg.vector_norm(s[rank:]))
    u, s, v = torch.svd_lowrank(mat, q=q, niter=niter)
    k = min(rank, s.shape[0])
    residual = float(torch.linalg.vector_norm(mat - (u[:, :k] * s[:k]) @ v[:, :k].T))
    return u, s, v.T, "randomized", residual


def factorize(weight_shape: Sequence[int], rank: int, *, delta: torch.Tensor | None = None,
              ups: Sequence[torch.Tensor] | None = None, downs: Sequence[torch.Tensor] | None = None,
              solver: str = "auto", dynamic_method: str | None = None, dynamic_param: float | None = None,
              ) -> Factorization:
    """Factor a delta (given as a dense `delta` or as a sum of factor products) to at most `rank`.

    Returns up (out, r[,1,1]) and down (r, in[,kh,kw]) with the singular values folded into `up`, so that
    `delta_weight(up, down)` approximates the delta with the optimal (Eckart-Young) error for exact solvers.
    `dynamic_method` chooses the rank per module (see `select_rank`), capped at `rank`.
    """
    out_dim = weight_shape[0]
    in_flat = math.prod(weight_shape[1:])
    max_rank = min(rank, out_dim, in_flat)
    residual = None
    if ups is not None and sum(u.shape[1] for u in ups) < min(out_dim, in_flat):
        u, s, vh = svd_of_factors(ups, downs)
        total, solver_used = float(torch.linalg.vector_norm(s)), "exact-factored"
    else:
        if delta is None:
            delta = sum(delta_weight(u, d) for u, d in zip(ups, downs))
        mat = delta.reshape(out_dim, in_flat).float()
        total = float(torch.linalg.vector_norm(mat))
        u, s, vh, solver_used, residual = truncated_svd(mat, max_rank, solver)
    new_rank = max(1, min(select_rank(s, max_rank, dynamic_method, dynamic_param), s.shape[0]))
    if residual is None or new_rank != min(max_rank, s.shape[0]):
        residual = float(torch.linalg.vector_norm(s[new_rank:]))
        if solver_used == "randomized":  # the values past q are unknown: add what the projection missed
            residual = math.sqrt(residual ** 2 + max(total ** 2 - float((s ** 2).sum()), 0.0))
    u, s, vh = u[:, :new_rank], s[:new_rank], vh[:new_rank]
    up = (u * s.unsqueeze(0)).contiguous()
    down = vh.contiguous()
    if len(weight_shape) == 4:
        up = up.reshape(out_dim, new_rank, 1, 1)
        down = down.reshape(new_rank, *weight_shape[1:])
    retained = float(torch.linalg.vector_norm(s))
    return Factorization(up, down, s, total, min(retained, total), residual, solver_used)


def select_rank(s: torch.Tensor, max_rank: int, method: str | None = None, param: float | None = None) -> int:
    """Rank to keep from descending singular values `s` (kohya resize_lora semantics), at most `max_rank`.

    - None: `max_rank`.
    - `sv_ratio`: keep singular values larger than s[0] / param (param >= 1).
    - `sv_cumulative`: smallest k with sum(s[:k]) / sum(s) >= param (0 < param <= 1).
    - `sv_fro`: smallest k with ||s[:k]|| / ||s|| >= param, the retained Frobenius-norm fraction (0 < param <= 1).
    A zero delta keeps rank 1.
    """
    if s.numel() == 0 or float(s[0]) <= MIN_SV:
        return 1
    if method is None:
        k = max_rank
    elif method == "sv_ratio":
        k = int((s > s[0] / param).sum())
    elif method == "sv_cumulative":
        k = _first_reaching(torch.cumsum(s, 0) / s.sum(), param)
    elif method == "sv_fro":
        k = _first_reaching(torch.sqrt(torch.cumsum(s ** 2, 0) / (s ** 2).sum()), param)
    else:
        raise ValueError(f"unknown dynamic method {method!r}; expected one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(k, max_rank))


def _first_reaching(fractions: torch.Tensor, target: float) -> int:
    reached = (fractions >= target - 1e-7).nonzero()
    return int(reached[0]) + 1 if reached.numel() else fractions.numel()


def validate_dynamic(method: str | None, param: float | None) -> None:
    """Check `--dynamic_method` / `--dynamic_param` before any work; raises ValueError naming the flag."""
    if method is None:
        return
    if method not in DYNAMIC_METHODS:
        raise ValueError(f"--dynamic_method {method}: expected one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise ValueError(f"--dynamic_method {method} needs --dynamic_param")
    if method == "sv_ratio" and param < 1:
        raise ValueError(f"--dynamic_param {param}: sv_ratio needs a ratio >= 1 (largest / smallest kept value)")
    if method in ("sv_fro", "sv_cumulative") and not 0 < param <= 1:
        raise ValueError(f"--dynamic_param {param}: {method} needs a fraction in (0, 1]")


# ----------------------------------------------------------------------------------------------- devices
def resolve_device(name: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:1`, `mps` (None = cpu); a clear error where that device is not available."""
    name = name or "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


# ----------------------------------------------------------------------------------------------- families
def lora_family(lora: LoRAFile) -> str | None:
    """`sdxl`, `sd2`, `sd1`, `sd` (SD 1.x or 2.x, e.g. a UNet-only LoRA without metadata) or None (unknown)."""
    from networks.lora_names import guess_file_family

    md = lora.metadata
    base = (md.get("ss_base_model_version") or md.get("modelspec.architecture") or "").lower()
    guess = guess_file_family(lora.modules)
    if guess == "SDXL" or base.startswith(("sdxl", "stable-diffusion-xl")):
        return "sdxl"
    te = [info for name, info in lora.modules.items() if name.startswith("lora_te_") and name.endswith("q_proj")]
    if te and te[0].down_shape[1] in (768, 1024):  # the real CLIP ViT-L / OpenCLIP ViT-H widths
        return "sd1" if te[0].down_shape[1] == 768 else "sd2"
    if md.get("ss_v2") in ("True", "False"):
        return "sd2" if md["ss_v2"] == "True" else "sd1"
    if base.startswith(("sd_v1", "stable-diffusion-v1")):
        return "sd1"
    if base.startswith(("sd_v2", "stable-diffusion-v2")):
        return "sd2"
    return "sd" if guess == "SD1/SD2" else None


def families_compatible(a: str | None, b: str | None) -> bool:
    """Whether LoRAs / models of families a and b can be combined (`sd` matches sd1 and sd2, None anything)."""
    if a is None or b is None or a == b:
        return True
    return {a, b} in ({"sd", "sd1"}, {"sd", "sd2"})


def check_same_family(loras: Sequence[LoRAFile], expected: str | None = None, what: str = "") -> str | None:
    """The LoRAs' common family (most specific known); raises when they (or the model, `expected`) differ."""
    known = {str(l.path): lora_family(l) for l in loras}
    if expected is not None:
        for path, fam in known.items():
            if not families_compatible(fam, expected):
                raise ValueError(f"{path} is a {FAMILY_NAMES[fam]} LoRA but {what or 'the model'} is {FAMILY_NAMES[expected]}")
        return expected
    found = [(p, f) for p, f in known.items() if f is not None]
    for i, (p1, f1) in enumerate(found):
        for p2, f2 in found[i + 1:]:
            if not families_compatible(f1, f2):
                raise ValueError(f"cannot merge LoRAs of different model versions ({Path(p1).name}: {FAMILY_NAMES[f1]}, "
                                 f"{Path(p2).name}: {FAMILY_NAMES[f2]})")
    specific = [f for _, f in found if f != "sd"]
    return specific[0] if specific else (found[0][1] if found else None)


FAMILY_NAMES = {"sd1": "SD 1.x (v1)", "sd2": "SD 2.x (v2)", "sdxl": "SDXL", "sd": "SD 1.x/2.x"}


# ----------------------------------------------------------------------------------------------- metadata
def merged_metadata(sources: Sequence[Mapping[str, str]], recipe: Mapping[str, object]) -> dict[str, str]:
    """Metadata of a file made from several inputs: keys equal in all inputs are kept, differing ones dropped,
    hashes (which describe the old files) dropped, and the recipe recorded under `ss_merge_recipe`."""
    common: dict[str, str] = {}
    if sources:
        first = sources[0]
        for key, value in first.items():
            if key.startswith("sshs_"):
                continue
            if all(s.get(key) == value for s in sources[1:]):
                common[key] = value
    common["ss_merge_recipe"] = json.dumps(recipe, ensure_ascii=False)
    return common


MINIMAL_KEYS = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_v2",
                "ss_base_model_version")


def minimal_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """Only the keys loaders need (`--no_metadata`): network module, dim, alpha, args, model version."""
    return {k: v for k, v in metadata.items() if k in MINIMAL_KEYS}


def dims_metadata(ranks: Iterable[int], alphas: Iterable[float]) -> dict[str, str]:
    """`ss_network_dim` / `ss_network_alpha`: the common value, or "Dynamic" where modules differ."""
    ranks, alphas = set(ranks), {float(a) for a in alphas}
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(next(iter(ranks))) if len(ranks) == 1 else "Dynamic",
        "ss_network_alpha": _fmt_alpha(next(iter(alphas))) if len(alphas) == 1 else "Dynamic",
    }


def _fmt_alpha(a: float) -> str:
    return str(int(a)) if float(a).is_integer() else str(a)


def source_record(lora: LoRAFile, ratio: float) -> dict[str, object]:
    rec: dict[str, object] = {"file": lora.path.name, "ratio": ratio}
    for key in ("sshs_model_hash", "ss_output_name", "ss_network_dim", "ss_network_alpha"):
        if key in lora.metadata:
            rec[key] = lora.metadata[key]
    return rec
