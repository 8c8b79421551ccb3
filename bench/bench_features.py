"""Per-step cost of the training features at SD 1.5 size, as a share of a LoRA step.

    python bench/bench_features.py --step_seconds 12.8

Times what each feature adds to one optimizer step, on tensors of the real shapes (SD 1.5, 512x512, batch 1,
LoRA dim 4 on the text encoder and the U-Net; the LoRA's parameter shapes come from the model built on the meta
device, so no model weights are allocated): the loss types against L2 (forward and backward of the element-wise
loss), the loss mask (resize to latent size and multiply), the EMA update of every LoRA weight, the immiscible
noise assignment, and LoRA+ (the optimizer step with the plain and plus groups against one group). The shares
are of `--step_seconds` (the LoRA step measured by bench/bench_train.py on the same machine; docs/benchmarks.md).
End-to-end on/off runs: `bench/bench_train.py --trainer_args "..."`. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def lora_parameters(dim: int, arch: str) -> list[torch.nn.Parameter]:
    """Parameters with the shapes of a dim-`dim` LoRA of the full-size model (TE + U-Net), in fp32 on the CPU."""
    from library.sd_configs import build_models
    from networks import lora

    c = build_models(arch, "full", meta=True, tokenizers=False)
    with torch.device("meta"):
        net = lora.create_network(1.0, dim, dim, None, c.text_encoder, c.unet)
    return [torch.nn.Parameter(torch.randn(p.shape) * 0.01) for p in net.parameters() if p.dim() > 0]


def measure(opts: argparse.Namespace) -> dict[str, float]:
    from library import noise
    from library.ema import LoRAEMA
    from library.immiscible import assign_noise
    from library.loss_functions import LossSettings, elementwise_loss

    torch.set_num_threads(opts.threads)
    sched = noise.make_noise_scheduler()
    side = opts.resolution // 8
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(opts.batch, 4, side, side, generator=g, requires_grad=True)
    target = torch.randn(opts.batch, 4, side, side, generator=g)
    t = torch.randint(0, 1000, (opts.batch,), generator=g)

    def loss_ms(kind: str) -> float:
        settings = LossSettings(kind, "snr", 0.1, 1.0)

        def run():
            elementwise_loss(pred, target, t, sched, settings).mean().backward()
        return _median_ms(run, opts.repeat)

    out: dict[str, float] = {}
    l2 = loss_ms("l2")
    for kind in ("l1", "huber", "smooth_l1"):
        out[f"loss_type {kind} (vs l2)"] = loss_ms(kind) - l2
    mask = torch.rand(opts.batch, opts.resolution, opts.resolution)
    elementwise = torch.rand(opts.batch, 4, side, side)
    out["masked loss"] = _median_ms(lambda: elementwise * torch.nn.functional.interpolate(
        mask.unsqueeze(1), size=(side, side), mode="area"), opts.repeat)
    params = lora_parameters(opts.dim, opts.arch)
    out["_lora_parameters"] = float(sum(p.numel() for p in params))
    ema = LoRAEMA([(str(i), p) for i, p in enumerate(params)], 0.999)
    out["ema update"] = _median_ms(ema.update, opts.repeat)
    ema_cpu = LoRAEMA([(str(i), p) for i, p in enumerate(params)], 0.999, on_cpu=True)
    out["ema update (--ema_on_cpu)"] = _median_ms(ema_cpu.update, opts.repeat)
    latents = torch.randn(opts.batch, 4, side, side, generator=g)
    eps = torch.randn(opts.batch, 4, side, side, generator=g)
    for k in (opts.batch, 4 * opts.batch):
        out[f"immiscible_noise {k}"] = _median_ms(lambda: assign_noise(latents, eps, k, g), opts.repeat)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    ups = params[1::2]  # lora_down, lora_up alternate in each module
    downs = params[0::2]
    one = torch.optim.AdamW([{"params": params, "lr": 1e-4}])
    plus = torch.optim.AdamW([{"params": downs, "lr": 1e-4}, {"params": ups, "lr": 16e-4}])
    out["loraplus (optimizer step, 2 groups vs 1)"] = _median_ms(plus.step, opts.repeat) - _median_ms(one.step,
                                                                                                         opts.repeat)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"], help="architecture (default sd1)")
    p.add_argument("--resolution", type=int, default=512, help="image side (default 512)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--repeat", type=int, default=20, help="timed repetitions (median)")
    p.add_argument("--step_seconds", type=float, default=12.8,
                   help="the LoRA step these costs are compared with (default 12.8: SD1.5 512 fp32 on the project's "
                        "2-core CPU machine, docs/benchmarks.md)")
    p.add_argument("--json", default=None, help="also write the results here")
    opts = p.parse_args(argv)
    results = measure(opts)
    lines = [f"{'feature':<44} {'ms/step':>9} {'% of step':>10}"]
    for name, ms in results.items():
        if not name.startswith("_"):
            lines.append(f"{name:<44} {ms:>9.2f} {100 * ms / 1000 / opts.step_seconds:>9.3f}%")
    print(f"{opts.arch} {opts.resolution}px b{opts.batch} dim{opts.dim}, LoRA parameters "
          f"{int(results['_lora_parameters']):,}, step {opts.step_seconds} s\n" + "\n".join(lines))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"options": vars(opts), "ms_per_step": results}, indent=2))


if __name__ == "__main__":
    main()
