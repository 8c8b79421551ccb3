"""The plan of one training run: every quantity derived from the run's length, resolved once.

`RunPlan.resolve(args, num_batches, num_processes)` runs after the dataset is built (its batches per epoch
are known) and before the optimizer's scheduler is made. It converts `--max_train_epochs` to steps first,
then derives everything that depends on the length from that: the epochs, the learning-rate warmup (a value
below 1 is a share of the run, as in sd-scripts), caption token warmup (`token_warmup_step` below 1, per
subset), and `--save_n_epoch_ratio`. The trainer stores the plan and reads it; `args` stays as the user gave it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from library.captions import warmup_step_count
from library.lr_schedulers import warmup_steps


@dataclass(frozen=True)
class RunPlan:
    num_processes: int  # world size (accelerator.num_processes); each process takes its share of every batch
    batches_per_epoch: int  # global batches of one epoch (each split across the processes: library.distributed)
    gradient_accumulation_steps: int
    steps_per_epoch: int  # optimizer steps per epoch, the same for any number of processes
    max_train_steps: int  # optimizer steps of the run (`--max_train_epochs` x steps_per_epoch when given)
    num_epochs: int
    lr_scheduler_steps: int  # steps the lr scheduler counts: one per optimizer step, for any number of processes
    lr_warmup_steps: int  # in scheduler steps; `--lr_warmup_steps` below 1 is a share of lr_scheduler_steps
    save_every_n_epochs: int | None  # `--save_every_n_epochs`, or num_epochs // `--save_n_epoch_ratio` (>= 1)

    @classmethod
    def resolve(cls, args: Any, num_batches: int, num_processes: int = 1) -> "RunPlan":
        accumulation = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
        steps_per_epoch = max(1, math.ceil(num_batches / accumulation))
        epochs_given = getattr(args, "max_train_epochs", None)
        max_steps = epochs_given * steps_per_epoch if epochs_given else int(args.max_train_steps)
        num_epochs = math.ceil(max_steps / steps_per_epoch)
        save_every = getattr(args, "save_every_n_epochs", None)
        ratio = getattr(args, "save_n_epoch_ratio", None)
        if ratio:
            save_every = max(1, num_epochs // ratio)
        scheduler_steps = max_steps
        return cls(num_processes=num_processes, batches_per_epoch=num_batches,
                   gradient_accumulation_steps=accumulation, steps_per_epoch=steps_per_epoch,
                   max_train_steps=max_steps, num_epochs=num_epochs, lr_scheduler_steps=scheduler_steps,
                   lr_warmup_steps=warmup_steps(getattr(args, "lr_warmup_steps", 0) or 0, scheduler_steps),
                   save_every_n_epochs=save_every)

    def token_warmup_steps(self, token_warmup_step: float) -> int:
        """A subset's caption token warmup in steps (`token_warmup_step` below 1: a share of the run)."""
        return warmup_step_count(token_warmup_step, self.max_train_steps)

    def describe(self) -> str:
        return (f"{self.batches_per_epoch} batches per epoch, {self.steps_per_epoch} optimizer steps per epoch, "
                f"{self.num_epochs} epochs, {self.max_train_steps} steps, lr warmup {self.lr_warmup_steps} steps"
                + (f", {self.num_processes} processes" if self.num_processes > 1 else ""))
