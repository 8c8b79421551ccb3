"""bench/profile_unets.py on a tiny U-Net: the step runs, the LoRA trains, the profile lists the U-Net's operators."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_profile_of_our_tiny_unet_with_lora(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_unets.py"), "--impl", "ours", "--size", "tiny",
                           "--lora", "--resolution", "64", "--steps", "1", "--precision", "bf16", "--json", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["precision"] == "bf16" and report["s_per_step"] > 0
    # the up weights start at zero, so after the first steps only they (about half the tensors) have a gradient
    assert report["lora_tensors"] > 0 and report["lora_tensors_with_gradient"] > report["lora_tensors"] // 3
    names = {op["name"] for op in report["ops"]}
    assert {"aten::convolution_backward", "aten::native_group_norm"} <= names
    assert "Self CPU time total" in proc.stdout


def test_sdxl_with_gradient_checkpointing_runs(tmp_path):
    out = tmp_path / "p.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_unets.py"), "--impl", "ours", "--size", "tiny",
                           "--arch", "sdxl", "--gradient_checkpointing", "--lora", "--resolution", "64", "--steps", "1",
                           "--no_profile", "--json", str(out)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["arch"] == "sdxl" and report["gradient_checkpointing"]
    assert report["lora_tensors_with_gradient"] > report["lora_tensors"] // 3


def test_the_original_needs_its_source():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_unets.py"), "--impl", "theirs"],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2 and "--impl theirs needs --reference_src" in proc.stderr
