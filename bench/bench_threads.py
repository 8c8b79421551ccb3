"""Benchmark CPU thread settings on the demo training: OpenMP threads x wait policy, idle and with one core busy.

    python bench/bench_threads.py --steps 8 --rounds 2

Each variant runs `train_network.py` on the demo (examples/tiny_lora, the tiny SD 1.x model in output/tiny_sd1,
built if missing) in its own process for --steps steps, without samples or saves; the variants are interleaved
round by round, so a change in the machine's load hits all of them alike. "busy" runs a busy loop on one core
(under `nice -n --busy_nice`) for the duration of the run. Prints the wall seconds of each run (the process start,
about 10 s, included) and writes JSON (--json). See docs/benchmarks.md ("CPU threads").
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "output" / "tiny_sd1"
BUSY_LOOP = "while True: pass"


def run_once(threads: int, policy: str, busy: bool, steps: int, out_dir: str, busy_nice: int = 0,
             timeout: float | None = None) -> float:
    """Wall seconds of one run; `inf` when it ran past `timeout` (then it is stopped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    env.update(OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    if policy.startswith("spin"):  # libgomp spins GOMP_SPINCOUNT times (about 100,000 a millisecond) then sleeps
        env["GOMP_SPINCOUNT"] = policy[len("spin"):]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, "train_network.py", "--config_file", "examples/tiny_lora/args.toml",
           "--dataset_config", "examples/tiny_lora/dataset.toml", "--pretrained_model_name_or_path", str(MODEL),
           "--output_dir", out_dir, "--max_train_steps", str(steps), "--sample_every_n_epochs", "1000",
           "--save_every_n_epochs", "1000"]
    loop = subprocess.Popen(["nice", "-n", str(busy_nice), sys.executable, "-c", BUSY_LOOP]) if busy else None
    try:
        start = time.perf_counter()
        try:
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return float("inf")
        return time.perf_counter() - start
    finally:
        if loop is not None:
            loop.kill()
            loop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="training steps per run")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all variants")
    p.add_argument("--threads", default="1,2", help="OMP_NUM_THREADS values")
    p.add_argument("--policies", default="default,PASSIVE,ACTIVE",
                   help="OMP_WAIT_POLICY values (default: unset), or spin<N> for GOMP_SPINCOUNT=N")
    p.add_argument("--load", default="idle,busy", help="idle and/or busy (one core running a busy loop)")
    p.add_argument("--busy_nice", type=int, default=0, help="nice increment of the busy loop (default 0: as the run)")
    p.add_argument("--timeout", type=float, default=None, help="stop a run after this many seconds (shown as inf)")
    p.add_argument("--variants", default=None,
                   help="only these variants, e.g. '2:PASSIVE:idle,2:PASSIVE:busy' (threads:policy:load)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "threads.json"), help="results file")
    args = p.parse_args()
    if not (MODEL / "model_index.json").exists():
        subprocess.run([sys.executable, "tools/make_tiny_model.py", "--arch", "sd1", "--size", "tiny", "--format",
                        "diffusers", "--output", str(MODEL)], cwd=ROOT, check=True)
    variants = list(itertools.product([int(t) for t in args.threads.split(",")], args.policies.split(","),
                                      [x == "busy" for x in args.load.split(",")]))
    if args.variants:
        variants = [(int(t), pol, load == "busy") for t, pol, load in (v.split(":") for v in args.variants.split(","))]
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for threads, policy, busy in variants:
                name = f"threads={threads} policy={policy} {'busy' if busy else 'idle'}"
                seconds = run_once(threads, policy, busy, args.steps, tmp, args.busy_nice, args.timeout)
                times.setdefault(name, []).append(seconds)
                print(f"{name}: {seconds:.1f} s", flush=True)
    print(f"\nmedian wall seconds for {args.steps} steps (process start included):")
    for name, values in times.items():
        print(f"  {name:40s} {statistics.median(values):7.1f}   runs: {', '.join(f'{v:.1f}' for v in values)}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"steps": args.steps, "times": times}, indent=1))


if __name__ == "__main__":
    main()
