"""bench/bench_train.py at --size tiny: both measurements run, the table and the JSON hold real numbers."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_writes_table_and_json(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--size", "tiny", "--threads", "1",
                           "--steps", "2", "--interleave", "--profile", "5", "--json", str(out)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "LoRA step / floor:" in proc.stdout and "sd1_tiny_64px_b1_dim4_fp32" in proc.stdout
    report = json.loads(out.read_text())
    modes = {r["mode"]: r for r in report["results"]}
    assert set(modes) == {"lora", "floor"}
    for r in modes.values():
        assert len(r["step_times"]) == 2 and r["sec_per_step"] > 0 and 0.1 < r["peak_rss_gib"] < 8
    assert report["lora_over_floor"] == modes["lora"]["sec_per_step"] / modes["floor"]["sec_per_step"]
    pairs = modes["lora"]["interleaved_step_times"]  # --interleave: LoRA and floor steps alternate in one process
    assert len(pairs["lora"]) == len(pairs["floor"]) == 2 and min(pairs["floor"]) > 0
    assert report["interleaved_lora_over_floor"] == statistics.median(pairs["lora"]) / statistics.median(pairs["floor"])
    assert "interleaved in one process:" in proc.stdout
    profile = modes["lora"]["profile"]  # --profile 5: one more trainer step's five slowest operators
    assert len(profile) == 5 and profile[0]["self_cpu_ms"] >= profile[-1]["self_cpu_ms"] > 0
    assert "lora step, slowest operators" in proc.stdout and profile[0]["name"] in proc.stdout


def test_bench_rejects_bad_options():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--resolution", "500"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "--resolution 500: must be a multiple of 64" in proc.stderr


def test_bench_features_uses_sd15_lora_shapes_and_prints_every_feature(tmp_path):
    out = tmp_path / "f.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_features.py"), "--repeat", "1", "--json",
                           str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["ms_per_step"]
    assert results["_lora_parameters"] == 2_359_296  # SD 1.5, dim 4, text encoder + U-Net (as a saved file holds)
    for name in ("loss_type huber (vs l2)", "masked loss", "ema update", "immiscible_noise 4",
                 "loraplus (optimizer step, 2 groups vs 1)"):
        assert name in results and name in proc.stdout
