"""The entry scripts as users run them: --help lists the groups; bad input is one line, exit code 1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)


def test_help_lists_the_option_groups():
    proc = _run("sdxl_train_network.py", "--help")
    assert proc.returncode == 0
    for group in ("model:", "network:", "training:", "optimizer:", "saving:", "logging:", "sampling:", "dataset:",
                  "text encoder output caching:", "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"):
        assert group in proc.stdout


def test_bad_network_args_fail_with_one_line(tmp_path):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"0")
    proc = _run("train_network.py", "--pretrained_model_name_or_path", str(model), "--network_module",
                "networks.lora", "--output_dir", str(tmp_path), "--network_args", "conv_dim")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --network_args 'conv_dim': expected key=value"
    assert "Traceback" not in proc.stderr
