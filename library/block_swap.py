"""`--blocks_to_swap N` (SDXL): the last N U-Net blocks' frozen weights live in CPU memory and visit the GPU.

The blocks are the original layout's (`input_blocks.1` ... `input_blocks.8`, `middle_block`, `output_blocks.0` ...
`output_blocks.8`: 18 for SDXL, in the order the forward runs them); "the last N" are the last N of that list.
Every layer with weights inside a swapped block gets a forward pre-hook that brings its weights to the GPU and a
forward hook that points them back at their CPU copy (pinned memory, kept: frozen weights never change, so going
back costs no copy). The next layer's weights are copied on a side CUDA stream while the current layer computes
(`non_blocking`), so the transfer overlaps compute. Hooks sit on the layers, not the blocks, because gradient
checkpointing recomputes transformer and ResNet blocks one by one in backward: the recomputation calls the same
layers and fetches their weights again. Without checkpointing, autograd keeps each layer's GPU weights until
backward, which saves nothing: --blocks_to_swap needs --gradient_checkpointing.

On CPU there is nothing to swap: a warning and no hooks. The LoRA weights are not swapped (they are trained).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from library.unet_layout import block_prefix_map

logger = logging.getLogger(__name__)

SDXL_BLOCKS = 18  # input_blocks 1-8, middle_block, output_blocks 0-8 (input_blocks.0 is the input convolution)


def swappable_blocks(unet: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """[(original block name, its diffusers sub-modules)] in forward order."""
    groups: dict[str, list[torch.nn.Module]] = {}
    for prefix, ldm in block_prefix_map(unet.config).items():
        parts = ldm.split(".")
        key = parts[0] if parts[0] == "middle_block" else ".".join(parts[:2])
        groups.setdefault(key, []).append(unet.get_submodule(prefix))

    def order(key: str) -> tuple[int, int]:
        kind = {"input_blocks": 0, "middle_block": 1, "output_blocks": 2}[key.split(".")[0]]
        return kind, int(key.split(".")[1]) if "." in key else 0

    return [(key, groups[key]) for key in sorted(groups, key=order)]


def check_blocks_to_swap(n: int, available: int) -> None:
    if not 1 <= n <= available:
        raise ValueError(f"--blocks_to_swap {n}: the SDXL U-Net has {available} swappable blocks "
                         f"(input_blocks 1-8, middle_block, output_blocks 0-8); use 1 to {available}")


class BlockSwap:
    """Hooks keeping `modules`' weights on `storage` (CPU) except while each layer runs on `device`."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.device = torch.device(device)
        self.layers = [m for block in modules for m in block.modules() if m._parameters or m._buffers]
        self.stored: dict[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pending: dict[torch.nn.Module, list[torch.Tensor]] = {}
        self.next_of = {m: self.layers[i + 1] for i, m in enumerate(self.layers[:-1])}
        self.fetches = 0  # weight copies to the device (tests, logs)
        self._handles = []
        for layer in self.layers:
            tensors = [t for t in (*layer._parameters.values(), *layer._buffers.values()) if t is not None]
            pairs = []
            for t in tensors:
                host = t.data.to("cpu")
                pairs.append((t, host.pin_memory() if cuda else host))
                t.data = pairs[-1][1]
            self.stored[layer] = pairs
            self._handles.append(layer.register_forward_pre_hook(self._bring_in))
            self._handles.append(layer.register_forward_hook(self._send_out))

    def _copies(self, layer: torch.nn.Module) -> list[torch.Tensor]:
        self.fetches += 1
        return [host.to(self.device, non_blocking=True, copy=True) for _, host in self.stored[layer]]

    def _prefetch(self, layer: torch.nn.Module) -> None:
        if self.stream is None or layer in self.pending:
            return
        with torch.cuda.stream(self.stream):
            self.pending[layer] = self._copies(layer)

    def _bring_in(self, layer: torch.nn.Module, inputs: Any) -> None:
        copies = self.pending.pop(layer, None)
        if copies is None:
            copies = self._copies(layer)
        elif self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for c in copies:
                c.record_stream(current)  # allocated on the side stream, used on this one
        for (tensor, _), copy in zip(self.stored[layer], copies):
            tensor.data = copy
        following = self.next_of.get(layer)
        if following is not None:
            self._prefetch(following)

    def _send_out(self, layer: torch.nn.Module, inputs: Any, output: Any) -> None:
        for tensor, host in self.stored[layer]:
            tensor.data = host  # the device copy lives on only while autograd still needs it

    def remove(self) -> None:
        """Take the hooks off; the weights go back to the device."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for pairs in self.stored.values():
            for tensor, host in pairs:
                tensor.data = host.to(self.device)
        self.pending.clear()


def apply_block_swap(unet: torch.nn.Module, n: int, device: torch.device) -> BlockSwap | None:
    """--blocks_to_swap on the placed U-Net; None (with a warning) where there is no separate device memory."""
    blocks = swappable_blocks(unet)
    check_blocks_to_swap(n, len(blocks))
    if device.type == "cpu":
        logger.warning("--blocks_to_swap %d: training on the CPU, the weights are already in CPU memory; ignored", n)
        return None
    swapped = blocks[len(blocks) - n:]
    logger.info("block swap: %s kept in CPU memory", ", ".join(name for name, _ in swapped))
    return BlockSwap([m for _, modules in swapped for m in modules], device)
