"""Tiny model files on disk for tests: single files (original layout) and Diffusers folders, one per process.

Each is written once per test process (by tools/make_tiny_model.py's `make_model`, seed 0, so its weights equal
`tests.conftest.tiny_models(arch)`) into a temporary folder removed at exit. Treat the files as read-only.

    path = tiny_model_path("sd1")                     # .safetensors, original layout
    comps = load_models(path, **load_kwargs("sd1"))   # v2 / v_parameterization / tokenizer_cache_dir
    folder = tiny_model_path("sdxl", "diffusers")
"""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

_ROOT: Path | None = None
_MADE: dict[tuple[str, str, str], Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="sd-tiny-models-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def tiny_model_path(arch: str, fmt: str = "ldm", ext: str = ".safetensors") -> Path:
    """Path of the tiny `arch` model (sd1, sd2, sd2-v, sdxl) as `fmt` ldm (file with `ext`) or diffusers (folder)."""
    from tools.make_tiny_model import make_model

    key = (arch, fmt, ext if fmt == "ldm" else "")
    if key not in _MADE:
        out = _root() / (f"{arch}{ext}" if fmt == "ldm" else f"{arch}_diffusers")
        make_model(arch, "tiny", fmt, out, seed=0)
        _MADE[key] = out
    return _MADE[key]


def tiny_tokenizer_cache(arch: str) -> Path:
    """A --tokenizer_cache_dir holding the tiny tokenizers of `arch`."""
    from tools.make_tiny_model import write_tokenizers

    out = _root() / f"{arch}_tokenizer_cache"
    if not out.is_dir():
        write_tokenizers(arch, out)
    return out


def load_kwargs(arch: str) -> dict[str, Any]:
    """Keyword arguments of `library.model_loading.load_models` that fit the tiny `arch` model."""
    return {"v2": arch.startswith("sd2"), "v_parameterization": arch == "sd2-v",
            "tokenizer_cache_dir": str(tiny_tokenizer_cache(arch))}


def load_tiny(arch: str, fmt: str = "ldm", **kwargs: Any):
    """Load the tiny `arch` model from disk with `load_models` (a fresh object each call)."""
    from library.model_loading import load_models

    return load_models(tiny_model_path(arch, fmt), **{**load_kwargs(arch), **kwargs})
