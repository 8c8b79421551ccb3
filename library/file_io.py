"""Reading and writing tensor files safely: safetensors / ckpt / pt, atomic writes, precision names.

Every script writes through `atomic_path` (temporary file in the target folder, renamed on success), so an
interrupted run never leaves a half-written model, and through `refuse_overwrite` so an output never
replaces one of its inputs. `.ckpt` / `.pt` / `.bin` files are read with `torch.load(weights_only=True)`.

Temporary files and folders are named `.sdlora-tmp.<pid>-<process start>@<host>.<random>.<target name>`:
the first write of a process into a folder removes the ones a dead process of this host left there (`kill -9`
during a save; those of another host once they are a day old), and nothing else. `save_with_fallback` keeps a training's output when its folder is full or
not writable: it writes the same name into the output folder's parent, the working folder or the temporary
folder instead, and says so in one line.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import struct
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping

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


logger = logging.getLogger(__name__)

TEMP_PREFIX = ".sdlora-tmp."


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
    tmp = str(temp_file_beside(path))
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
    _clean_once(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), suffix=f".{path.name}{suffix}", dir=path.parent))
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
def temp_file_beside(path: str | os.PathLike) -> Path:
    """A fresh temporary file name beside `path` ending in its name (same extension), for writers that pick
    the format from the extension; the caller renames it over `path` or removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clean_once(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(), suffix=f".{path.name}", dir=path.parent)
    os.close(fd)
    return Path(tmp)


# ---------------------------------------------------------------- our temporary files

def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (Linux), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except FileNotFoundError:
        return None
    except OSError:
        return "?"
    return stat[stat.rfind(")") + 2:].split()[19]


def _process_id(pid: int) -> str:
    start = _process_start(pid) if os.path.isdir("/proc") else None
    return f"{pid}-{start}" if start not in (None, "?") else str(pid)


def _temp_prefix() -> str:
    return f"{TEMP_PREFIX}{_process_id(os.getpid())}@{_host()}."


_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(\d+)(?:-(\d+))?@([A-Za-z0-9-]+)\.")


_FOREIGN_STALE_S = 24 * 3600  # no save takes a day: older temporaries of another host (container) are stale


def _writer_gone(name: str, mtime: float) -> bool:
    """True for a temporary file of ours whose writing process no longer runs (checked on this host; one of
    another host, e.g. an earlier container, once it is a day old)."""
    m = _TEMP_NAME.match(name)
    if m is None:
        return False
    if m.group(3) != _host():
        return time.time() - mtime > _FOREIGN_STALE_S
    pid, start = int(m.group(1)), m.group(2)
    if os.path.isdir("/proc"):
        now = _process_start(pid)
        return now is None or (start is not None and now not in ("?", start))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files / folders of ours in `folder` left by processes that died; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(TEMP_PREFIX) or \
                    not _writer_gone(entry.name, entry.stat(follow_symlinks=False).st_mtime):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
        except OSError as e:
            logger.debug("cannot remove stale temporary %s: %s", entry.path, e)
            continue
        removed.append(entry.path)
    if removed:
        logger.info("removed %d temporary file(s) left in %s by an interrupted run", len(removed), folder)
    return removed


_CLEANED: set[str] = set()


def _clean_once(folder: Path) -> None:
    """Stale temporaries are removed the first time this process writes into a folder."""
    key = os.path.abspath(folder)
    if key not in _CLEANED:
        _CLEANED.add(key)
        remove_stale_temporaries(folder)


# ---------------------------------------------------------------- saves that must not be lost

_FALLBACK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}
_FAILURE_TEXTS = (("no space left", "no space left on device"), ("os error 28", "no space left on device"),
                  ("disk quota", "disk quota exceeded"), ("permission denied", "permission denied"),
                  ("os error 13", "permission denied"), ("read-only file system", "read-only file system"),
                  ("os error 30", "read-only file system"), ("file too large", "file too large"))


def write_failure_reason(exc: BaseException, folder: str | os.PathLike | None = None) -> str | None:
    """Why a write failed, when it is for lack of space or permission (None for any other error).

    Covers OSError errnos, safetensors' `IoError(... code: 28 ...)` and torch.save's zip writer
    (`[enforce fail at inline_container.cc]`, which says nothing about space: checked with the free space).
    """
    if not isinstance(exc, Exception):
        return None
    if isinstance(exc, OSError) and exc.errno in _FALLBACK_ERRNOS:
        return os.strerror(exc.errno).lower()
    text = str(exc).lower()
    for needle, reason in _FAILURE_TEXTS:
        if needle in text:
            return reason
    if "inline_container" in text or "file write failed" in text:
        free = free_bytes(folder) if folder is not None else None
        return "no space left on device" if free is not None and free < 64 << 20 else             f"write failed ({str(exc).splitlines()[0][:120]})"
    return None


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Free bytes on the file system of `folder` (or of its nearest existing parent); None if unknown."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path.parent != path:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def fallback_folders(path: str | os.PathLike) -> list[Path]:
    """Where a save goes when its folder cannot take it: the output folder's parent, the working folder,
    the temporary folder (in that order, each once, never the output folder itself)."""
    folder = Path(os.path.abspath(Path(path).parent))
    out: list[Path] = []
    for candidate in (folder.parent, Path.cwd(), Path(tempfile.gettempdir())):
        candidate = Path(os.path.abspath(candidate))
        if candidate != folder and candidate not in out:
            out.append(candidate)
    return out


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `stem-2.ext`, `stem-3.ext`... when that exists (a fallback never replaces a file)."""
    target = folder / name
    stem, ext = (name[:-len(Path(name).suffix)], Path(name).suffix) if Path(name).suffix else (name, "")
    n = 2
    while os.path.lexists(target):
        target = folder / f"{stem}-{n}{ext}"
        n += 1
    return target


def save_with_fallback(path: str | os.PathLike, write: Callable[[str], object], what: str = "file") -> str:
    """`write(path)`; if that fails for lack of space or permission, write the same name (made unique) into the
    `fallback_folders` instead and log one line naming where and why. Returns the path written.

    Other errors propagate unchanged; when no place takes it, an OSError names every place tried.
    """
    try:
        write(str(path))
        return str(path)
    except Exception as e:  # noqa: BLE001 - classified below, re-raised unless it is a space / permission failure
        reason = write_failure_reason(e, Path(path).parent)
        if reason is None:
            raise
    tried = [str(Path(path).parent)]
    for folder in fallback_folders(path):
        target = _free_name(folder, Path(path).name)
        try:
            write(str(target))
        except Exception as e:  # noqa: BLE001
            if write_failure_reason(e, folder) is None:
                raise
            tried.append(str(folder))
            continue
        logger.warning("could not write the %s %s (%s): saved it as %s instead", what, path, reason, target)
        return str(target)
    raise OSError(f"could not write the {what} {path} ({reason}), nor in {', '.join(tried[1:])}; "
                  "free some disk space or choose another --output_dir")


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
