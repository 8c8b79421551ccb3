"""Benchmark the network algorithms against LoRA on one SD1.5-size U-Net block, steps interleaved in one process.

    python bench/bench_networks.py --channels 320 --tokens 4096 --steps 5

Builds the first down block's transformer + ResNet of an SD1.5-size UNet config (random weights, frozen), and
for LoRA (dim 8), LoHa (dim 4: the same parameter count), LoKr (dim 8, factor 8) and DoRA (dim 8) times
forward + backward of the block with the network applied, rotating through the algorithms each round so that
drift of a shared machine hits them alike. Prints seconds per step and the ratio to LoRA. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ALGOS = {"lora": ("networks.lora:LoRAModule", 8, {}), "loha": ("networks.loha:LoHaModule", 4, {}),
         "lokr": ("networks.lokr:LoKrModule", 8, {"factor": 8}), "dora": ("networks.dora:DoRAModule", 8, {})}


def main(argv: list[str] | None = None) -> None:
    import importlib

    import torch
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--channels", type=int, default=320)
    p.add_argument("--tokens", type=int, default=4096, help="latent pixels (64x64 at 512 px)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    opts = p.parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    side = int(opts.tokens ** 0.5)
    torch.manual_seed(0)

    nets, blocks = {}, {}
    for name, (spec, dim, kwargs) in ALGOS.items():
        torch.manual_seed(0)
        block = CrossAttnDownBlock2D(opts.channels, opts.channels, 1280, num_layers=1, cross_attention_dim=768,
                                     num_attention_heads=8, add_downsample=False).requires_grad_(False)
        module_path, cls_name = spec.split(":")
        cls = getattr(importlib.import_module(module_path), cls_name)
        modules = torch.nn.ModuleList()
        for layer_name, layer in list(block.named_modules()):  # every Linear / Conv2d (LoRA-C3Lier's set)
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                modules.append(cls(layer_name, layer, 1.0, dim, dim, **kwargs))
                modules[-1].apply_to()
        with torch.no_grad():
            for param in modules.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        nets[name], blocks[name] = modules.train(), block
    x = torch.randn(1, opts.channels, side, side, requires_grad=True)
    temb = torch.randn(1, 1280)
    cond = torch.randn(1, 77, 768)
    times: dict[str, list[float]] = {name: [] for name in ALGOS}
    for step in range(opts.steps + 1):
        for name in ALGOS:
            start = time.perf_counter()
            out = blocks[name](x, temb, cond)[0]
            out.float().pow(2).mean().backward()
            if step:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["lora"])
    print(f"{'network':<6} {'params':>9} {'s/step':>8} {'/ LoRA':>7}")
    for name, samples in times.items():
        params = sum(p.numel() for p in nets[name].parameters())
        print(f"{name:<6} {params:>9} {statistics.median(samples):>8.3f} {statistics.median(samples) / base:>7.2f}")


if __name__ == "__main__":
    main()
