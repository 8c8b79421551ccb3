"""`--fused_backward_pass`: each trainable tensor's optimizer update runs as soon as its gradient is complete.

A post-accumulate-grad hook on every trainable parameter steps the optimizer for that parameter alone and frees its
gradient at once, during the backward pass, so the gradients of the whole network are never held together. The
update is the optimizer's own `step()`, run with its parameter groups narrowed to the one tensor: same state, same
hyper-parameters (the scheduler's current learning rate), so the weights are those of the plain step (tests
compare both).

What cannot be fused, refused with one line by `fused_backward_problem` before any model loads:
- `--max_grad_norm` > 0: clipping needs the norm of all gradients before any update.
- optimizers whose step couples parameters (D-Adaptation, Prodigy: one shared step size from all gradients).
- `--mixed_precision fp16`: the gradient scaler must see every gradient (inf check) before any update.
Gradient accumulation works: the hooks update only on the last batch of a group (gradients accumulate as usual
before it, so accumulation keeps all LoRA gradients alive between batches, as the plain path does).
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from library import optimizers

COUPLED_OPTIMIZERS = optimizers.ADAPTIVE  # name prefixes whose step uses statistics of every parameter


def fused_backward_problem(args: argparse.Namespace, optimizer_name: str) -> str | None:
    """Why --fused_backward_pass cannot be used with these arguments (None when it can)."""
    if not getattr(args, "fused_backward_pass", False):
        return None
    if args.max_grad_norm:
        return (f"--fused_backward_pass updates each tensor as soon as its gradient is ready, so the global norm "
                f"that --max_grad_norm {args.max_grad_norm:g} clips by is never known: add --max_grad_norm 0")
    if optimizer_name.lower().startswith(COUPLED_OPTIMIZERS):
        return (f"--fused_backward_pass cannot be used with --optimizer_type {optimizer_name} (its step size is "
                "computed from all gradients at once); use AdamW, AdamW8bit, Lion, SGDNesterov, AdaFactor, ...")
    if args.mixed_precision == "fp16" and not getattr(args, "full_fp16", False):
        return ("--fused_backward_pass cannot be used with --mixed_precision fp16 (the gradient scaler checks all "
                "gradients before any update); use --mixed_precision bf16")
    if getattr(args, "full_fp16", False):
        return "--fused_backward_pass cannot be used with --full_fp16 (gradient scaling); use --full_bf16"
    return None


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper (which would skip steps outside its sync logic)."""
    return getattr(optimizer, "optimizer", optimizer)


class FusedBackward:
    """Optimizer updates inside backward, one parameter at a time; `sync` says whether this backward ends a step.

    Use: `fused = FusedBackward(optimizer)`; before each backward set `fused.sync` (True on the last batch of an
    accumulation group); do not call `optimizer.step()` yourself; `remove()` takes the hooks off.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = _inner(optimizer)
        self.sync = True
        self.updates = 0  # parameter updates done (tests and logs)
        self._handles = []
        for group_index, group in enumerate(self.optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad:
                    self._handles.append(param.register_post_accumulate_grad_hook(self._hook(group_index)))

    def _hook(self, group_index: int):
        def update(param: torch.Tensor) -> None:
            if self.sync:
                self.step_one(param, group_index)
        return update

    @torch.no_grad()
    def step_one(self, param: torch.Tensor, group_index: int) -> None:
        """Step the optimizer for `param` only, then free its gradient."""
        opt = self.optimizer
        groups = opt.param_groups
        opt.param_groups = [dict(groups[group_index], params=[param])]
        try:
            opt.step()
        finally:
            for key, value in opt.param_groups[0].items():  # keep what the step wrote back (e.g. Adafactor)
                if key != "params":
                    groups[group_index][key] = value
            opt.param_groups = groups
        param.grad = None
        self.updates += 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
