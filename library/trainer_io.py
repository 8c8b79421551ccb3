"""File names of training outputs (sd-scripts' `-000001` / `-step00000100` / `-state`), pruning, atomic saves
(that go beside the output folder when it is full or not writable), and the finiteness check every save passes
(a file under a final name never holds NaN or inf)."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch

from library.file_io import save_with_fallback, temp_file_beside


class OutputNamer:
    """Paths of the LoRA files and state folders of one run, and removal of old ones (--save_last_n_*)."""

    def __init__(self, output_dir: str, output_name: str, save_model_as: str = "safetensors") -> None:
        self.dir = Path(output_dir)
        self.name = output_name
        self.ext = "." + save_model_as

    def final(self) -> str:
        return str(self.dir / f"{self.name}{self.ext}")

    def epoch(self, epoch: int) -> str:
        return str(self.dir / f"{self.name}-{epoch:06d}{self.ext}")

    def step(self, step: int) -> str:
        return str(self.dir / f"{self.name}-step{step:08d}{self.ext}")

    def epoch_state(self, epoch: int) -> str:
        return str(self.dir / f"{self.name}-{epoch:06d}-state")

    def step_state(self, step: int) -> str:
        return str(self.dir / f"{self.name}-step{step:08d}-state")

    def state_final(self) -> str:
        return str(self.dir / f"{self.name}-state")

    def before_nonfinite(self, step: int) -> str:
        """The network as it was after `step` steps, saved when the next loss was NaN or inf."""
        return str(self.dir / f"{self.name}-step{step:08d}-before-nonfinite{self.ext}")

    def before_nonfinite_state(self, step: int) -> str:
        return str(self.dir / f"{self.name}-step{step:08d}-before-nonfinite-state")

    def _existing(self, pattern: str) -> list[tuple[int, Path]]:
        regex = re.compile(re.escape(self.name) + pattern + "$")
        found = []
        for entry in self.dir.glob(f"{self.name}-*"):
            m = regex.match(entry.name)
            if m:
                found.append((int(m.group(1)), entry))
        return found

    def _prune(self, pattern: str, keep_after: int) -> None:
        for number, path in self._existing(pattern):
            if number <= keep_after:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def prune_epochs(self, epoch: int, every: int, last_n: int | None, last_n_state: int | None) -> None:
        """Keep the newest `last_n` epoch files (and `last_n_state` states)."""
        if last_n:
            self._prune(r"-(\d{6})" + re.escape(self.ext), epoch - every * last_n)
        if last_n_state:
            self._prune(r"-(\d{6})-state", epoch - every * last_n_state)

    def prune_steps(self, step: int, every: int, last_n: int | None, last_n_state: int | None) -> None:
        """Keep the step files of the last `last_n` steps, both ends included (sd-scripts counts steps, not
        files: at step 50, every 10, `last_n` 30 keeps 20, 30, 40 and 50)."""
        if last_n:
            self._prune(r"-step(\d{8})" + re.escape(self.ext), step - last_n - 1)
        if last_n_state:
            self._prune(r"-step(\d{8})-state", step - last_n_state - 1)


def count_nonfinite(tensors: Iterable[Any], dtype: torch.dtype | None = None) -> int:
    """NaN and inf values among the floating-point tensors (nested in dicts/lists too), as stored in `dtype`
    (a float32 value above 65504 becomes inf in fp16)."""
    count = 0
    for t in tensors:
        if isinstance(t, dict):
            count += count_nonfinite(t.values(), dtype)
        elif isinstance(t, (list, tuple)):
            count += count_nonfinite(t, dtype)
        elif isinstance(t, torch.Tensor) and t.is_floating_point():
            stored = t.detach().to(dtype) if dtype is not None and dtype != t.dtype else t.detach()
            count += int((~torch.isfinite(stored)).sum().item())
    return count
def save_network(network: Any, path: str, dtype: torch.dtype | None, metadata: dict[str, str] | None) -> str:
    """`network.save_weights` into a temporary file with the same extension, then rename (atomic).

    A save that does not fit (disk full, no permission) goes beside the output folder instead
    (`file_io.save_with_fallback`); returns the path written.
    """
    def write(target: str) -> None:
        tmp = temp_file_beside(target)
        try:
            network.save_weights(str(tmp), dtype, metadata)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    return save_with_fallback(path, write, "LoRA")
