"""Per-operator profile of one U-Net training step: ours (diffusers' U-Net) or the original's (sd-scripts).

    python bench/profile_unets.py --impl ours --steps 3
    ~/.cache/sd-lora-suite/reference-sd-scripts-<commit>/venv/bin/python bench/profile_unets.py --impl theirs \
        --reference_src ~/.cache/sd-lora-suite/reference-sd-scripts-<commit>/src --steps 3

Same shapes on both sides: a random-weight full-size SD 1.5 or SDXL U-Net (`--arch`; SDPA attention), a 4x64x64
latent (512 px), 77 context tokens, frozen weights, optionally each side's gradient checkpointing; with `--lora` the program's own LoRA (dim 4) on the U-Net's
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


def build_ours(arch: str, size: str = "full"):
    """diffusers' U-Net as our trainer builds it, its call (x, t, ctx, pooled) -> output, the context and pooled
    widths."""
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    from library.sd_configs import build_models

    unet = build_models(arch, size).unet
    unet.set_attn_processor(AttnProcessor2_0())

    def call(x, t, ctx, pooled):
        extra = {}
        if arch == "sdxl":  # pooled text embedding and the size conditioning (original / crop / target sizes)
            side = x.shape[-1] * 8
            time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=x.dtype)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        return unet(x, t, ctx, **extra).sample

    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim if arch == "sdxl" else 0
    return unet, call, cfg.cross_attention_dim, pooled_dim


def build_theirs(arch: str, src: str):
    """sd-scripts' own U-Net (original_unet / sdxl_original_unet) with SDPA, and its call."""
    sys.path.insert(0, src)
    import torch

    if arch == "sdxl":
        from library.sdxl_original_unet import SdxlUNet2DConditionModel
        from library.sdxl_train_util import get_size_embeddings

        unet = SdxlUNet2DConditionModel()
        unet.set_use_sdpa(True)

        def call(x, t, ctx, pooled):
            side = torch.tensor([[x.shape[-2] * 8, x.shape[-1] * 8]])
            size_emb = get_size_embeddings(side, torch.zeros_like(side), side, x.device).to(x.dtype)
            return unet(x, t, ctx, torch.cat([pooled, size_emb], dim=1))

        return unet, call, 2048, 1280
    from library.original_unet import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=64, attention_head_dim=8, cross_attention_dim=768,
                                use_linear_projection=False, upcast_attention=False)
    unet.set_use_sdpa(True)
    return unet, lambda x, t, ctx, pooled: unet(x, t, ctx).sample, 768, 0


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
    p.add_argument("--arch", default="sd1", choices=["sd1", "sdxl"], help="SD 1.5 or SDXL U-Net")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="each side's gradient checkpointing (the original then also makes the input require grad, "
                        "as its trainer does)")
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
        unet, call, ctx_dim, pooled_dim = build_ours(args.arch, args.size)
    else:
        if not args.reference_src:
            p.error("--impl theirs needs --reference_src (the sd-scripts source folder)")
        unet, call, ctx_dim, pooled_dim = build_theirs(args.arch, args.reference_src)
    params = apply_lora(unet, args.dim) if args.lora else []
    unet.requires_grad_(False)
    unet.train()
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    unet.to(dtype)
    for q in params:  # the network in fp32 (mixed precision), trained
        q.data = q.data.float()
        q.requires_grad_(True)
    side = args.resolution // 8
    x = torch.randn(1, 4, side, side, dtype=dtype)
    ctx = torch.randn(1, 77, ctx_dim, dtype=dtype)
    pooled = torch.randn(1, pooled_dim, dtype=dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.impl == "theirs":  # its trainer's workaround for reentrant checkpoints
            x.requires_grad_(True)
    t = torch.tensor([500])
    if args.channels_last:
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if not params:
        x.requires_grad_(True)

    def step():
        for q in params:  # as the trainers' zero_grad(set_to_none=True)
            q.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            out = call(x, t, ctx, pooled)
        out.float().mean().backward()

    step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with_gradient = sum(int(q.grad is not None and bool(q.grad.abs().sum() > 0)) for q in params)
    result = {"impl": args.impl, "arch": args.arch, "gradient_checkpointing": args.gradient_checkpointing,
              "lora": args.lora, "precision": args.precision, "lora_tensors": len(params),
              "lora_tensors_with_gradient": with_gradient, "threads": torch.get_num_threads(), "step_times": times,
              "s_per_step": statistics.median(times)}
    print(f"{args.impl} {args.arch} {args.precision}{' gc' if args.gradient_checkpointing else ''}"
          f"{' lora' if args.lora else ''}: {result['s_per_step']:.3f} s/step (threads {result['threads']}; {times})")
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
