"""Per-operator profile of one U-Net training step: ours (diffusers' U-Net) or the original's (sd-scripts).

    python bench/profile_unets.py --impl ours --steps 3
    ~/.cache/sd-lora-suite/reference-sd-scripts-<commit>/venv/bin/python bench/profile_unets.py --impl theirs \
        --reference_src ~/.cache/sd-lora-suite/reference-sd-scripts-<commit>/src --steps 3

Same shapes on both sides: a random-weight full-size SD 1.5 U-Net (fp32, SDPA attention), a 4x64x64 latent
(512 px), 77 context tokens, frozen weights; with `--lora` the program's own LoRA (dim 4) on the U-Net's
Linear / 1x1 conv layers; per step the U-Net forward and the backward of the mean output (to the LoRA weights,
or to the input without LoRA). Prints the median step time and the top operators by self CPU time
(torch.profiler), so the two U-Nets can be compared op by op. `--json` writes both. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_ours(size: str = "full"):
    sys.path.insert(0, str(ROOT))
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.sd_configs import build_models

    unet = build_models("sd1", size).unet
    unet.set_attn_processor(AttnProcessor2_0())
    return unet


def build_theirs(src: str):
    sys.path.insert(0, src)
    from library.original_unet import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768,
                                use_linear_projection=False, upcast_attention=False)
    unet.set_use_sdpa(True)
    return unet


def apply_lora(unet, dim: int) -> list:
    """The program's own networks.lora (whichever `networks` package is first on sys.path) on the U-Net."""
    from networks.lora import create_network

    net = create_network(1.0, dim, dim, None, [], unet)
    net.apply_to([], unet, apply_text_encoder=False, apply_unet=True)
    return list(net.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", required=True, choices=["ours", "theirs"])
    p.add_argument("--reference_src", default=None, help="sd-scripts source folder (for --impl theirs)")
    p.add_argument("--size", default="full", choices=["full", "tiny"],
                   help="ours only: tiny checks the plumbing (the original's U-Net is always full size)")
    p.add_argument("--lora", action="store_true", help="train a dim --dim LoRA on the U-Net")
    p.add_argument("--dim", type=int, default=4)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: the frozen U-Net in bf16 under bf16 autocast, LoRA in fp32 (as both trainers run "
                        "--mixed_precision bf16)")
    p.add_argument("--channels_last", action="store_true", help="U-Net and input in channels-last memory format")
    p.add_argument("--no_profile", action="store_true", help="only time the steps")
    p.add_argument("--top", type=int, default=25, help="operators to list")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    torch.manual_seed(0)
    if args.impl == "ours":
        unet = build_ours(args.size)
    else:
        if not args.reference_src:
            p.error("--impl theirs needs --reference_src (the sd-scripts source folder)")
        unet = build_theirs(args.reference_src)
    params = apply_lora(unet, args.dim) if args.lora else []
    unet.requires_grad_(False)
    unet.train()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    unet.to(dtype)
    for q in params:
        q.data = q.data.float()
    for q in params:
        q.requires_grad_(True)
    side = args.resolution // 8
    x = torch.randn(1, 4, side, side, dtype=dtype)
    ctx = torch.randn(1, 77, unet.config.cross_attention_dim if args.impl == "ours" else 768, dtype=dtype)
    t = torch.tensor([500])
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if not params:
        x.requires_grad_(True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = unet(x, t, ctx).sample
        out.float().mean().backward()

    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    result = {"impl": args.impl, "lora": args.lora, "precision": args.precision, "lora_tensors": len(params),
              "lora_tensors_with_gradient": sum(int(q.grad is not None and bool(q.grad.abs().sum() > 0)) for q in params), "threads": torch.get_num_threads(), "step_times": times,
              "s_per_step": statistics.median(times)}
    print(f"{args.impl} {args.precision}{' lora' if args.lora else ''}: {result['s_per_step']:.3f} s/step (threads {result['threads']}; {times})")
    if not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        print(table)
        result["ops"] = [{"name": e.key, "count": e.count, "self_cpu_ms": e.self_cpu_time_total / 1000}
                         for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)]
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
