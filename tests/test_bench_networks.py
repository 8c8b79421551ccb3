"""bench/bench_networks.py and bench/bench_train.py --network_module on tiny sizes: they run and report numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_bench_networks_times_every_algorithm():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_networks.py"), "--channels", "32", "--tokens",
                           "64", "--steps", "1", "--threads", "1"], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:]}
    assert set(rows) == {"lora", "loha", "lokr", "dora"}
    assert rows["lora"][3] == "1.00" and rows["loha"][1] == rows["lora"][1]  # LoHa dim 4 = LoRA dim 8 in parameters
    assert all(float(r[2]) > 0 for r in rows.values())


def test_bench_train_takes_a_network_module(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), "--size", "tiny", "--threads", "1",
                           "--steps", "1", "--modes", "lora", "--network_module", "networks.lokr", "--network_args",
                           "factor=4", "--json", str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["config"].startswith("lokr-factor4_sd1_tiny")
    assert report["results"][0]["network_params"] > 0 and report["results"][0]["sec_per_step"] > 0
