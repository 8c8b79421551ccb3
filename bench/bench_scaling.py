"""Benchmark data-parallel scaling: the same global batch trained by 1 and by N processes on one machine.

    python bench/bench_scaling.py --arch sd1 --size tiny --global_batch 4 --processes 1,2 --steps 10

Each configuration is a `torchrun --nproc_per_node N` launch of the real trainer (library.network_trainer) on
random-weight models and a synthetic dataset, latents cached; process r trains global_batch / N samples per step
(gloo on CPU, NCCL on GPUs). Prints, per N: seconds per optimizer step, samples per second, the time of one
all-reduce of the LoRA gradients' size (what DDP sends each step), and the scaling efficiency
(samples/s with N) / (N x samples/s with 1), and the CPU seconds one process spends per step (the work each
process does; on a shared machine the wall clock also measures the neighbours). On CPU the cores are split
evenly (--threads in total).
Writes JSON (--json). See docs/benchmarks.md and docs/distributed.md.
"""
from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument("--arch", default="sd1", choices=["sd1", "sd2", "sdxl"], help="architecture")
    p.add_argument("--size", default="tiny", choices=["tiny", "full"], help="tiny (tests) or full (real sizes)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default 512; tiny: 64)")
    p.add_argument("--global_batch", type=int, default=4, help="samples per optimizer step, over all processes")
    p.add_argument("--processes", default="1,2", help="process counts to compare, comma-separated")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=None, help="CPU threads in total, split over the processes "
                                                                 "(default: all cores)")
    p.add_argument("--threads_per_process", type=int, default=None,
                   help="CPU threads of every process instead (1: the cores a shared machine leaves are not "
                        "oversubscribed; see docs/benchmarks.md)")
    p.add_argument("--allreduce_repeats", type=int, default=20, help="timed all-reduces of the gradient size")
    p.add_argument("--json", default=None, help="write the results here (default bench/results/scaling_<cfg>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # result file of a worker launch
    return p


def _worker_options(opts: argparse.Namespace, per_process: int) -> argparse.Namespace:
    """The options bench_train's helpers take (fp32, LoRA on the U-Net and text encoder, latents cached)."""
    return argparse.Namespace(arch=opts.arch, size=opts.size, resolution=opts.resolution, batch=per_process,
                              dim=opts.dim, precision="fp32", full_bf16=False, full_fp16=False,
                              gradient_checkpointing=False, no_cache_latents=False, unet_only=False,
                              cache_text_encoder_outputs=False, steps=opts.steps, warmup=opts.warmup)


def worker(opts: argparse.Namespace) -> None:
    """One process of a launch: time the trainer's steps, then all-reduces of the gradient size."""
    import torch
    import torch.distributed as dist

    from bench.bench_train import _timed, build_random_models, synthetic_dataset, trainer_args
    from library.network_trainer import NetworkTrainer
    from library.train_state import Progress

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = opts.global_batch // world
    wopts = _worker_options(opts, per_process)
    with tempfile.TemporaryDirectory() as tmp:
        # every process writes the same synthetic images (seeded); the global batch is cut from them as in training
        args = trainer_args(wopts, synthetic_dataset(Path(tmp), opts.resolution, per_process), Path(tmp) / "out")
        components = build_random_models(wopts)
        trainer = NetworkTrainer(args, components.is_sdxl)
        trainer.setup(components=components)
        del components
        progress = Progress()
        batches = trainer.batches(0, 0)

        def step() -> None:
            trainer.step(next(batches), progress)
            progress.batches_in_epoch += 1

        _timed(step, opts.warmup, 0)
        cpu_start = time.process_time()
        times = _timed(step, 0, opts.steps)
        cpu_per_step = (time.process_time() - cpu_start) / opts.steps
    numel = sum(p.numel() for p in trainer.trainable)
    allreduce = []
    if world > 1:
        buffer = torch.zeros(numel, device=trainer.device)
        for _ in range(opts.allreduce_repeats + 2):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(buffer)
            if buffer.is_cuda:
                torch.cuda.synchronize()
            allreduce.append(time.perf_counter() - start)
        allreduce = allreduce[2:]
    if trainer.accelerator.is_main_process:
        Path(opts.worker).write_text(json.dumps({
            "processes": world, "per_process_batch": per_process, "sec_per_step": statistics.median(times),
            "step_times": times, "cpu_sec_per_step": cpu_per_step,
            "samples_per_sec": opts.global_batch / statistics.median(times),
            "allreduce_ms": statistics.median(allreduce) * 1000 if allreduce else 0.0, "gradient_numel": numel,
            "threads_per_process": torch.get_num_threads(), "device": str(trainer.device)}))


def launch(opts: argparse.Namespace, processes: int, result: Path) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    threads = opts.threads_per_process or max(1, (opts.threads or os.cpu_count() or 1) // processes)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    argv = [a for a in sys.argv[1:] if a != "--worker"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(port), __file__, *argv, "--worker", str(result)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {processes}-process launch failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> None:
    opts = build_parser().parse_args(argv)
    if opts.resolution is None:
        opts.resolution = 64 if opts.size == "tiny" else 512
    counts = [int(n) for n in opts.processes.split(",")]
    if any(opts.global_batch % n for n in counts):
        raise SystemExit(f"error: --global_batch {opts.global_batch} must be divisible by every --processes count")
    if opts.worker:
        worker(opts)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            results.append(launch(opts, n, Path(tmp) / f"{n}.json"))
    base = next((r["samples_per_sec"] for r in results if r["processes"] == 1), None)
    print(f"{opts.arch} {opts.size} {opts.resolution}px, global batch {opts.global_batch}, LoRA dim {opts.dim}, "
          f"fp32, {results[0]['device']}")
    print("processes  batch/proc  threads/proc  s/step  CPU s/step/proc  samples/s  all-reduce ms  efficiency")
    for r in results:
        r["efficiency"] = r["samples_per_sec"] / (r["processes"] * base) if base else None
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "-"
        print(f"{r['processes']:>9}  {r['per_process_batch']:>10}  {r['threads_per_process']:>12}  "
              f"{r['sec_per_step']:>6.3f}  {r['cpu_sec_per_step']:>15.3f}  {r['samples_per_sec']:>9.2f}  "
              f"{r['allreduce_ms']:>13.2f}  {eff:>10}")
    out = Path(opts.json) if opts.json else ROOT / "bench" / "results" / \
        f"scaling_{opts.arch}_{opts.size}_{opts.resolution}px_gb{opts.global_batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"options": {k: v for k, v in vars(opts).items() if k != "worker"},
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
