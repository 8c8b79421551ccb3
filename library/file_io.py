"""Reading and writing tensor files safely: safetensors / ckpt / pt, atomic writes, precision names.

Every script writes through `atomic_path` (temporary file in the target folder, renamed on success), so an
interrupted run never leaves a half-written model, and through `refuse_overwrite` so an output never
replaces one of its inputs. `.ckpt` / `.pt` / `.bin` files are read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

PRECISIONS = {
    None: None,
    "float": torch.float32,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


class CheckpointError(ValueError):
    """A file that cannot be read as the model or network it should be; the message names the file."""


def precision_dtype(name: str | None) -> torch.dtype | None:
    """`float`/`fp32`, `fp16`, `bf16` (or None) to a torch dtype."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}; expected one of float, fp16, bf16")
    return PRECISIONS[name]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        if os.path.isfile(tmp):  # mkstemp makes 0600 files; give the result the usual umask-based mode
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir_beside(path: str | os.PathLike, suffix: str = ".tmp") -> Path:
    """A new empty folder beside `path` (to fill, then rename over it), with the umask's mode, not 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder `new` to `target`. An existing `target` is first renamed aside (a hidden
    `.<name>.*.old` folder beside it), then the new one moved in, then the old one deleted: a crash at any
    point leaves one complete folder (the old one aside at worst), never none."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    aside = temp_dir_beside(target, ".old")  # empty: a folder may be renamed over an empty one
    os.replace(target, aside)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(aside, target)  # put the old one back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def refuse_overwrite(output: str | os.PathLike, inputs: list[str | os.PathLike], flag: str = "--save_to") -> None:
    """Raise if `output` is one of `inputs` (same file after resolving links)."""
    out = Path(output).resolve()
    for src in inputs:
        if src is not None and Path(src).resolve() == out:
            raise ValueError(f"{flag} {output} is also an input; choose another output path (inputs are never overwritten)")


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor entries and `__metadata__`), validated against its size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header: {e})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    return header


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` of a safetensors file ({} for other formats)."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    return dict(read_safetensors_header(path).get("__metadata__") or {})


def load_state_dict(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load a tensor file (.safetensors, .ckpt, .pt, .pth, .bin) into a flat state dict.

    A `state_dict` wrapper (as in many .ckpt files) is unwrapped. Errors name the file and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, expected a .safetensors or .ckpt file")
    if path.suffix.lower() == ".safetensors":
        read_safetensors_header(path)
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path), device=str(device))
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(str(path), map_location=device, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable checkpoint (.ckpt/.pt) file: {str(e).splitlines()[0]}") from None
        sd = unwrap_state_dict(obj, path)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return sd


def unwrap_state_dict(obj, path: str | os.PathLike = "<memory>") -> dict[str, torch.Tensor]:
    """Return the flat tensor dict inside a loaded checkpoint object (`state_dict` wrapper or plain)."""
    while isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: does not hold a state dict (found {type(obj).__name__})")
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write a state dict atomically, as safetensors (with `metadata`) or, for other extensions, torch.save."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
          for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if Path(path).suffix.lower() == ".safetensors":
            from safetensors.torch import save_file

            save_file(sd, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(sd, tmp)
