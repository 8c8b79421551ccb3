"""Streaming access to tensor files: read one tensor at a time, write a safetensors file tensor by tensor.

Tools that touch every weight of a checkpoint (merging a LoRA into it, extracting a LoRA from two of them)
never need the whole model in memory: `TensorFile` reads a safetensors tensor with a plain positioned read
(no memory map, so the process's RSS holds only the tensors still referenced) and `SafetensorsWriter` writes
the header first and then each tensor's bytes in order, so peak memory is about one tensor. `.ckpt` / `.pt`
files are opened with `torch.load(mmap=True, weights_only=True)` where the file format allows it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from library.file_io import CheckpointError, read_safetensors_header, unwrap_state_dict

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    ST_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    ST_DTYPES["F8_E5M2"] = torch.float8_e5m2
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


class TensorFile:
    """Lazy, read-only view of a .safetensors / .ckpt / .pt file: key names, shapes and dtypes without loading.

    `get(key)` returns a fresh tensor the caller owns. Use as a context manager or call `close()`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such file")
        if self.path.is_dir():
            raise CheckpointError(f"{self.path}: is a folder, expected a .safetensors or .ckpt file")
        self._file = None
        self._tensors: dict[str, torch.Tensor] | None = None
        if self.path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(self.path)
            self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
            self._entries = header
            self._data_start = 8 + struct.unpack("<Q", open(self.path, "rb").read(8))[0]
            for key, entry in header.items():
                if entry.get("dtype") not in ST_DTYPES:
                    raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {entry.get('dtype')}")
            self._file = open(self.path, "rb")
        else:
            self.metadata = {}
            self._tensors = _load_torch_lazily(self.path)
            self._entries = None

    def keys(self) -> list[str]:
        return list(self._entries if self._entries is not None else self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in (self._entries if self._entries is not None else self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._entries is not None:
            return tuple(self._entry(key)["shape"])
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        if self._entries is not None:
            return ST_DTYPES[self._entry(key)["dtype"]]
        return self._tensor(key).dtype

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `key` (a new tensor, not a view into the file), optionally cast to `dtype`."""
        if self._entries is not None:
            entry = self._entry(key)
            begin, end = entry["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            if end > begin:
                self._file.seek(self._data_start + begin)
                n = self._file.readinto(memoryview(raw.numpy()))
                if n != end - begin:
                    raise CheckpointError(f"{self.path}: truncated while reading {key}")
            tensor = raw.view(ST_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        else:
            tensor = self._tensor(key).clone()
        if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        return tensor

    def raw_range(self, key: str) -> tuple[int, int, int] | None:
        """(file descriptor, absolute offset, byte count) of a safetensors tensor's bytes; None for other formats."""
        if self._entries is None:
            return None
        begin, end = self._entry(key)["data_offsets"]
        return self._file.fileno(), self._data_start + begin, end - begin

    def _entry(self, key: str) -> dict:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key}") from None

    def _tensor(self, key: str) -> torch.Tensor:
        try:
            return self._tensors[key]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {key}") from None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tensors = None

    def __enter__(self) -> "TensorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_torch_lazily(path: Path) -> dict[str, torch.Tensor]:
    """torch.load with weights_only=True, memory-mapped when the file is in the zip format."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e) and "zip" not in str(e):
            raise CheckpointError(f"{path}: not a readable checkpoint (.ckpt/.pt) file: {str(e).splitlines()[0]}") from None
        obj = None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (.ckpt/.pt) file: {str(e).splitlines()[0]}") from None
    if obj is None:  # legacy (non-zip) torch files cannot be memory-mapped
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable checkpoint (.ckpt/.pt) file: {str(e).splitlines()[0]}") from None
    return unwrap_state_dict(obj, path)


class SafetensorsWriter:
    """Write a safetensors file one tensor at a time; the layout (names, dtypes, shapes) is declared up front.

    Tensors must be written in the declared order; `close()` checks that all of them were. Pass a temporary
    path from `library.file_io.atomic_path` so a failure never leaves a partial file at the target.
    """

    def __init__(self, path: str | os.PathLike, layout: Sequence[tuple[str, torch.dtype, Sequence[int]]],
                 metadata: Mapping[str, str] | None = None):
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order: list[tuple[str, torch.dtype, tuple[int, ...], int]] = []
        for key, dtype, shape in layout:
            if dtype not in ST_NAMES:
                raise ValueError(f"{key}: dtype {dtype} cannot be stored in safetensors")
            shape = tuple(int(s) for s in shape)
            nbytes = _numel(shape) * torch.tensor([], dtype=dtype).element_size()
            header[key] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((key, dtype, shape, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors itself writes
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._next = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        name, dtype, shape, nbytes = self._order[self._next]
        if key != name:
            raise ValueError(f"tensors written out of order: expected {name}, got {key}")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{key}: declared {dtype} {list(shape)}, got {tensor.dtype} {list(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def copy_raw(self, key: str, src_fd: int, offset: int, nbytes: int) -> None:
        """Write the next tensor by copying its bytes from another file (kernel-side where the OS can).

        For tensors that pass through unchanged (same dtype): no decoding, no user-space copy.
        """
        name, _, _, expected = self._order[self._next]
        if key != name or nbytes != expected:
            raise ValueError(f"raw copy of {key} ({nbytes} bytes) does not match the declared {name} ({expected} bytes)")
        self._file.flush()
        done = 0
        try:
            while done < nbytes:
                n = os.copy_file_range(src_fd, self._file.fileno(), nbytes - done, offset + done)
                if n == 0:
                    break
                done += n
        except (OSError, AttributeError):  # not supported for these files / this OS: plain reads and writes
            pass
        self._file.seek(0, os.SEEK_END)  # the descriptor moved underneath the buffered writer
        while done < nbytes:
            chunk = os.pread(src_fd, min(64 << 20, nbytes - done), offset + done)
            if not chunk:
                raise ValueError(f"{key}: source file ended {nbytes - done} bytes early")
            self._file.write(chunk)
            done += len(chunk)
        self._next += 1

    def close(self) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._next != len(self._order):
            raise ValueError(f"safetensors writer closed after {self._next} of {len(self._order)} tensors")

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:
            self._file.close()
            self._file = None


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def iter_tensors(path: str | os.PathLike, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (key, tensor) of a file one at a time."""
    with TensorFile(path) as f:
        for key in f.keys():
            yield key, f.get(key, dtype)
