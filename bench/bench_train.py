"""Benchmark LoRA training: seconds per step and peak memory, against the frozen model's floor.

    python bench/bench_train.py --arch sd1 --size full --resolution 512 --batch 1 --dim 4 --precision fp32
    python bench/bench_train.py --arch sdxl --size full --resolution 512 --unet_only --cache_text_encoder_outputs \
        --gradient_checkpointing --precision bf16 --full_bf16

Two measurements, each in its own process (so each peak RSS is its own):
- `lora`: the real trainer (library.network_trainer) on random-weight models of the given size, with a small
  synthetic dataset at the resolution, latents cached (unless --no_cache_latents);
- `floor`: the same frozen models doing only what no LoRA step can avoid: U-Net forward and backward to its
  input (and, when the text encoder is trained, its forward and backward to the token embeddings).
The ratio lora/floor shows the cost of the LoRA itself. Prints a table and writes JSON (--json).
Peak RSS is reported for the whole process and for the training phase (reset after setup, Linux).
See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sd2-v", "sdxl"], help="architecture")
    p.add_argument("--size", default="tiny", choices=["tiny", "full"], help="tiny (tests) or full (real sizes)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; tiny: 64)")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank (alpha = dim)")
    p.add_argument("--network_module", default="networks.lora",
                   help="network to train: networks.lora (default), networks.loha, networks.lokr")
    p.add_argument("--network_args", nargs="*", default=None,
                   help='extra --network_args of the network, e.g. "dora_wd=True" or "factor=8"')
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"], help="mixed precision")
    p.add_argument("--full_bf16", action="store_true", help="bf16 network and gradients (with --precision bf16)")
    p.add_argument("--full_fp16", action="store_true", help="fp16 network and gradients (with --precision fp16)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--no_cache_latents", action="store_true", help="encode images with the VAE every step")
    p.add_argument("--cache_text_encoder_outputs", action="store_true", help="SDXL: cache the TE outputs")
    p.add_argument("--unet_only", action="store_true", help="train only the U-Net LoRA (--network_train_unet_only)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--modes", default="lora,floor", help="which measurements: lora, floor or both")
    p.add_argument("--interleave", action="store_true",
                   help="then, in the lora process, --steps pairs of a LoRA step and a floor step on the same models "
                        "(the ratio without the machine's drift between processes)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="lora mode: profile one more trainer step and list its N slowest operators (torch.profiler)")
    p.add_argument("--trainer_args", default="",
                   help="more trainer flags, one string: --trainer_args='--torch_compile --fused_backward_pass "
                        "--max_grad_norm 0' (the compile happens in the --warmup steps); a feature's cost is the "
                        "same run with and without it")
    p.add_argument("--json", default=None, help="write the results here (default bench/results/<config>.json)")
    p.add_argument("--worker", default=None, choices=["lora", "floor"], help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------- measuring
def _read_status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux: write 5 to clear_refs) so the training phase's own peak can be read."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _model_dtype(opts: argparse.Namespace):
    import torch

    if opts.precision == "bf16":
        return torch.bfloat16
    if opts.precision == "fp16" and _device().type == "cuda":
        return torch.float16
    return torch.float32


def build_random_models(opts: argparse.Namespace):
    """Random-weight models created directly in the frozen-model dtype (no fp32 copy on the way)."""
    import torch

    from library.sd_configs import build_models

    previous = torch.get_default_dtype()
    torch.set_default_dtype(_model_dtype(opts))
    try:
        return build_models(opts.arch, opts.size, seed=0)
    finally:
        torch.set_default_dtype(previous)


def synthetic_dataset(folder: Path, resolution: int, batch: int) -> str:
    import numpy as np
    from PIL import Image

    img = folder / "img"
    img.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(max(2, batch)):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(img / f"{i}.png")
        (img / f"{i}.caption").write_text(f"a photo of sks, picture {i}")
    toml = folder / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".caption"\n[[datasets]]\nresolution = {resolution}\n'
                    f'batch_size = {batch}\n[[datasets.subsets]]\nimage_dir = "{img.as_posix()}"\nnum_repeats = 50\n')
    return str(toml)


def trainer_args(opts: argparse.Namespace, toml: str, out: Path) -> argparse.Namespace:
    from library import train_args
    from library.dataset_config import add_dataset_arguments

    argv = ["--pretrained_model_name_or_path", "random-weights", "--dataset_config", toml, "--output_dir", str(out),
            "--network_module", opts.network_module, "--network_dim", str(opts.dim), "--network_alpha", str(opts.dim),
            "--learning_rate", "1e-4", "--seed", "0", "--max_data_loader_n_workers", "0",
            "--mixed_precision", "no" if opts.precision == "fp32" else opts.precision,
            "--max_train_steps", str(opts.warmup + opts.steps)]
    flags = {"--full_bf16": opts.full_bf16, "--full_fp16": opts.full_fp16, "--cache_latents": not opts.no_cache_latents,
             "--gradient_checkpointing": opts.gradient_checkpointing, "--network_train_unet_only": opts.unet_only,
             "--cache_text_encoder_outputs": opts.cache_text_encoder_outputs}
    argv += [flag for flag, on in flags.items() if on]
    if opts.network_args:
        argv += ["--network_args", *opts.network_args]
    argv += shlex.split(opts.trainer_args)
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    train_args.add_all_training_arguments(parser)
    return parser.parse_args(argv)


def _timed(step, n_warmup: int, n_steps: int) -> list[float]:
    import torch

    times = []
    for i in range(n_warmup + n_steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= n_warmup:
            times.append(time.perf_counter() - start)
    return times


def _same_allocator_settings_as_the_trainer() -> None:
    from library.malloc_tuning import keep_freed_memory_for_reuse

    if _device().type == "cpu":  # NetworkTrainer.setup does this on CPU; the floor must not run without it
        keep_freed_memory_for_reuse()


def run_lora(opts: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """The trainer's steps; with --interleave then as many pairs of a trainer step and a floor step on the same
    frozen models (LoRA hooks removed), whose ratio no drift of the machine between processes can bias."""
    from library.network_trainer import NetworkTrainer
    from library.train_state import Progress

    args = trainer_args(opts, synthetic_dataset(tmp, opts.resolution, opts.batch), tmp / "out")
    _same_allocator_settings_as_the_trainer()  # before the models are built, as in the floor process
    components = build_random_models(opts)
    trainer = NetworkTrainer(args, components.is_sdxl)
    trainer.setup(components=components)
    del components
    progress = Progress()
    batches = trainer.batches(0, 0)
    floor = _trainer_floor_step(trainer, opts) if opts.interleave else None
    reset_peak_rss()

    def step():
        if trainer.step(next(batches), progress):
            trainer.features.after_step(progress)  # what runs after each optimizer step (the EMA update)
        progress.batches_in_epoch += 1

    times = {"lora": _timed(step, opts.warmup, opts.steps), "peaks": [process_peak_rss_gib(), _read_status("VmHWM")],
             "network_params": sum(p.numel() for p in trainer.accelerator.unwrap_model(trainer.network).parameters())}
    if opts.profile:
        times["profile"] = _profile(step, opts.profile)
    if floor is not None:  # after the lora-only steps, so the floor steps cannot raise the peak read above
        times["interleaved_lora"], times["interleaved_floor"] = [], []
        for _ in range(opts.steps):
            times["interleaved_lora"] += _timed(step, 0, 1)
            times["interleaved_floor"] += _timed(floor, 0, 1)
    return times


def _profile(step, top: int) -> list[dict]:
    """One more trainer step under torch.profiler: the `top` operators by self CPU time, printed and returned."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    return [{"name": e.key, "count": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3)}
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]]


def _trainer_floor_step(trainer, opts: argparse.Namespace):
    """A floor step on the trainer's own frozen models, its LoRA hooks removed for the step (--interleave)."""
    import torch

    net = trainer.accelerator.unwrap_model(trainer.network)
    modules = net.text_encoder_loras + net.unet_loras
    c = trainer.components
    batch = next(trainer.batches(0, 0))
    with torch.no_grad():
        latents = trainer.latents(batch)
        hidden, pooled = trainer.conditioning(batch)
    train_te = trainer.te_cache is None and trainer.train_te
    fixed = None if train_te else (hidden.detach(), None if pooled is None else pooled.detach())
    inner = floor_step(c.unet, c.text_encoders if train_te else [], c.tokenizers, c.is_sdxl, opts, latents, fixed)

    def step():
        for m in modules:
            m.restore()
        try:
            inner()
        finally:
            for m in modules:
                m.apply_to()

    return step


def floor_step(unet, text_encoders: list, tokenizers: list, is_sdxl: bool, opts: argparse.Namespace,
               latents, fixed: tuple | None):
    """One floor step on frozen models: U-Net forward + backward to its noisy-latent input, and, when
    `text_encoders` are given (trained), their forward + backward to the token embeddings; else `fixed`
    (hidden states, pooled) conditions the U-Net."""
    import torch

    from library.text_encoding import encode_tokens, tokenize

    device, dtype = _device(), _model_dtype(opts)
    ids = [tokenize(t, ["a photo of sks, picture 0"] * opts.batch).to(device) for t in tokenizers]
    t = torch.full((opts.batch,), 500, device=device)
    size = float(opts.resolution)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * opts.batch, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def embeddings_require_grad(module, inputs, output):
        return output.detach().requires_grad_()

    def step():
        hooks = [te.get_input_embeddings().register_forward_hook(embeddings_require_grad) for te in text_encoders]
        try:
            noisy = latents.clone().to(dtype).requires_grad_()
            if text_encoders:
                with autocast:
                    hidden, pooled = encode_tokens(text_encoders, ids, None, is_sdxl, tokenizers=tokenizers)
            else:
                hidden, pooled = fixed
            kwargs = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}} \
                if is_sdxl else {}
            with autocast:
                pred = unet(noisy, t, hidden.to(dtype), **kwargs).sample
            torch.nn.functional.mse_loss(pred.float(), latents.float()).backward()
        finally:
            for h in hooks:
                h.remove()

    return step


def run_floor(opts: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Frozen models in a process of their own: U-Net forward + backward to its input (+ text encoder)."""
    import torch

    from library.network_trainer import release_memory, set_attention
    from library.text_encoding import encode_tokens, tokenize

    _same_allocator_settings_as_the_trainer()
    c = build_random_models(opts)
    device = _device()
    train_te = not opts.unet_only and not opts.cache_text_encoder_outputs
    for m in (c.unet, *c.text_encoders):
        m.requires_grad_(False).eval().to(device)
    set_attention(c.unet, argparse.Namespace(xformers=False))
    if opts.gradient_checkpointing:
        c.unet.enable_gradient_checkpointing()
        c.unet.train()
    ids = [tokenize(t, ["a photo of sks, picture 0"] * opts.batch).to(device) for t in c.tokenizers]
    with torch.no_grad():
        fixed = encode_tokens(c.text_encoders, ids, None, c.is_sdxl, tokenizers=c.tokenizers)
    text_encoders = c.text_encoders if train_te else []
    c.text_encoders, c.vae = [], None
    release_memory()
    side = opts.resolution // 8
    latents = torch.randn(opts.batch, 4, side, side, device=device)
    step = floor_step(c.unet, text_encoders, c.tokenizers, c.is_sdxl, opts, latents, fixed)
    reset_peak_rss()
    return {"floor": _timed(step, opts.warmup, opts.steps), "peaks": [process_peak_rss_gib(), _read_status("VmHWM")]}


def worker(opts: argparse.Namespace) -> dict:
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the trainer keeps this count
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        times = (run_lora if opts.worker == "lora" else run_floor)(opts, Path(tmp))
    result = {"mode": opts.worker, "sec_per_step": statistics.median(times[opts.worker]),
              "step_times": times[opts.worker],
              "peak_rss_gib": times["peaks"][0], "peak_rss_training_gib": times["peaks"][1],
              "device": str(_device()), "threads": torch.get_num_threads()}
    if "network_params" in times:
        result["network_params"] = times["network_params"]
    if "profile" in times:
        result["profile"] = times["profile"]
    if "interleaved_floor" in times:
        result["interleaved_step_times"] = {"lora": times["interleaved_lora"], "floor": times["interleaved_floor"]}
        result["interleaved_lora_over_floor"] = (statistics.median(times["interleaved_lora"])
                                                 / statistics.median(times["interleaved_floor"]))
    if torch.cuda.is_available():
        result["cuda_max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


# ------------------------------------------------------------------------------------------- driver
def config_name(opts: argparse.Namespace) -> str:
    parts = [opts.arch, opts.size, f"{opts.resolution}px", f"b{opts.batch}", f"dim{opts.dim}", opts.precision]
    if opts.network_module != "networks.lora" or opts.network_args:
        parts.insert(0, "-".join([opts.network_module.rsplit(".", 1)[-1], *(a.replace("=", "")
                                                                            for a in opts.network_args or [])]))
    parts += [name for name, on in (("fullbf16", opts.full_bf16), ("fullfp16", opts.full_fp16),
                                    ("gc", opts.gradient_checkpointing), ("nocache", opts.no_cache_latents),
                                    ("teCache", opts.cache_text_encoder_outputs), ("unet", opts.unet_only)) if on]
    parts += [flag.strip("-") for flag in shlex.split(opts.trainer_args)]
    return "_".join(parts)


def run_worker_process(opts: argparse.Namespace, mode: str, argv: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, *argv, "--worker", mode], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {mode} measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(results: list[dict], ratio: float | None, interleaved: float | None = None) -> str:
    lines = [f"{'mode':<6} {'s/step':>8} {'peak RSS GiB':>13} {'train RSS GiB':>14} {'CUDA GiB':>9} {'params':>10}"]
    for r in results:
        cuda = r.get("cuda_max_memory_allocated_gib")
        lines.append(f"{r['mode']:<6} {r['sec_per_step']:>8.3f} {r['peak_rss_gib']:>13.2f} "
                     f"{r['peak_rss_training_gib']:>14.2f} {'-' if cuda is None else f'{cuda:.2f}':>9} "
                     f"{r.get('network_params', '-'):>10}")
    if ratio is not None:
        lines.append(f"LoRA step / floor: {ratio:.3f}x")
    if interleaved is not None:
        lines.append(f"LoRA step / floor, interleaved in one process: {interleaved:.3f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = build_parser().parse_args(argv)
    if opts.resolution is None:
        opts.resolution = 64 if opts.size == "tiny" else 512
    if opts.resolution % 64:
        raise SystemExit(f"error: --resolution {opts.resolution}: must be a multiple of 64")
    if opts.cache_text_encoder_outputs and not opts.unet_only:
        raise SystemExit("error: --cache_text_encoder_outputs needs --unet_only")
    if opts.worker:
        print(json.dumps(worker(opts)))
        return
    modes = [m for m in opts.modes.split(",") if m]
    if not set(modes) <= {"lora", "floor"}:
        raise SystemExit(f"error: --modes {opts.modes}: expected lora, floor or both")
    results = [run_worker_process(opts, mode, argv) for mode in modes]
    by_mode = {r["mode"]: r for r in results}
    ratio = by_mode["lora"]["sec_per_step"] / by_mode["floor"]["sec_per_step"] if len(by_mode) == 2 else None
    interleaved = by_mode.get("lora", {}).get("interleaved_lora_over_floor")
    report = {"config": config_name(opts), "options": {k: v for k, v in vars(opts).items() if k != "worker"},
              "results": results, "lora_over_floor": ratio, "interleaved_lora_over_floor": interleaved}
    out = Path(opts.json) if opts.json else ROOT / "bench" / "results" / f"{config_name(opts)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"{config_name(opts)}\n{format_table(results, ratio, interleaved)}\nresults: {out}")
    for r in results:
        if r.get("profile"):
            print(f"\n{r['mode']} step, slowest operators (self CPU ms, calls):")
            for op in r["profile"]:
                print(f"  {op['self_cpu_ms']:10.1f} {op['count']:7d}  {op['name']}")


if __name__ == "__main__":
    main()
