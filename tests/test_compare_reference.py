"""bench/compare_reference.py: its parsing and plumbing on tiny models (the sd-scripts side needs full-size models
and its own venv: checked here only when that venv exists, else skipped with the reason)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare_reference as cr

ROOT = Path(__file__).resolve().parent.parent


def test_progress_lines_of_both_programs_are_read():
    theirs = "steps:   0%|          | 0/4 [00:00<?, ?it/s]\rsteps:  25%|██▌       | 1/4 [00:08<00:24,  8.02s/it]" \
             "\rsteps:  25%|██▌       | 1/4 [00:08<00:24,  8.02s/it, avr_loss=0.123]\r"
    ours = "steps:  50%|█████     | 2/4 [00:16<00:16,  8.01s/it, epoch=1, loss=0.1200]\n" \
           "caching latents: 100%|██████████| 3/3 [00:01<00:00]\rsteps: 100%|██████████| 4/4 [00:33<00:00]\r"
    stamps: dict[int, float] = {}
    sink = io.StringIO()
    cr.read_progress(io.BytesIO((theirs + ours).encode()), stamps, sink)
    assert sorted(stamps) == [0, 1, 2, 4] and sink.getvalue() == theirs + ours
    assert cr.step_times({0: 1.0, 1: 9.5, 2: 17.0, 3: 25.0, 5: 40.0}) == [8.5, 7.5, 8.0]


def test_both_trainers_get_the_same_flags(tmp_path):
    inputs = {"checkpoint": "m.safetensors", "tokenizers": "tok", "dataset": "d.toml"}
    flags = cr.train_flags("sdxl_full_bf16", inputs, tmp_path, 5)
    from tests.train_helpers import parse

    args = parse(flags, sdxl=True)  # our parser takes sd-scripts' spelling of every flag
    assert args.full_bf16 and args.mixed_precision == "bf16" and args.cache_text_encoder_outputs
    assert args.max_train_steps == 5 and args.tokenizer_cache_dir == "tok" and args.network_train_unet_only


def test_source_export_from_a_git_directory(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "library").mkdir()
    (repo / "library" / "a.py").write_text("x = 1\n")
    (repo / "train_network.py").write_text("print('hi')\n")
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert cr.export_source(str(repo), commit, tmp_path / "out") == 0
    assert (tmp_path / "out" / "library" / "a.py").read_text() == "x = 1\n"
    with pytest.raises(ValueError, match="commit 0{40} not found"):
        cr.export_source(str(repo), "0" * 40, tmp_path / "out2")


def test_torchvision_standin_transforms(tmp_path):
    cr.write_torchvision_standin(tmp_path)
    code = ("import numpy as np; from PIL import Image; from torchvision import transforms as T; "
            "img = Image.fromarray(np.full((2, 3, 3), 255, np.uint8)); "
            "t = T.Compose([T.ToTensor(), T.Normalize([0.5], [0.5])])(img); "
            "p = T.functional.pil_to_tensor(img); print(tuple(t.shape), float(t.min()), float(t.max()), p.dtype)")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=str(tmp_path)),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "(3, 2, 3) 1.0 1.0 torch.uint8"


def test_our_side_runs_and_reports_on_a_tiny_model(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_reference.py"), "--size", "tiny",
                           "--no_reference", "--resolution", "64", "--steps", "3", "--workdir", str(tmp_path / "w"),
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())["training"]["sd15_fp32"]
    assert len(report["runs"]["ours"]) == 2 and "theirs" not in report
    for run in report["runs"]["ours"]:
        # every step seen; two fast steps can arrive in one read of the pipe (a 0 s difference), so only the sum
        assert len(run["step_times"]) == 3 and min(run["step_times"]) >= 0 and sum(run["step_times"]) > 0
        assert 0.1 < run["peak_rss_gib"] < 6
        assert run["wall_s"] > sum(run["step_times"])
    assert report["ours"]["s_per_step"] > 0
    assert "| sd15_fp32 |" in proc.stdout
    assert (tmp_path / "w" / "runs" / "sd15_fp32_ours_1" / "lora.safetensors").exists()


def test_bad_options_are_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_reference.py"), "--workdir", "/tmp/x",
                           "--size", "tiny"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "--size tiny needs --no_reference" in proc.stderr


def test_reference_install_runs_its_trainer():
    base = cr.reference_dir(None, cr.REFERENCE_COMMIT)
    if not (base / ".complete").exists():
        pytest.skip(f"reference venv absent ({base}): run bench/compare_reference.py once to install sd-scripts")
    python, src, env = cr.install_reference("unused", cr.REFERENCE_COMMIT, base)
    proc = subprocess.run([str(python), str(src / "train_network.py"), "--help"], cwd=src, capture_output=True,
                          text=True, env=cr.program_env({**env, "PYTHONPATH": os.pathsep.join(
                              filter(None, [str(src), env.get("PYTHONPATH")]))}), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--network_module" in proc.stdout and "--cache_latents" in proc.stdout


def test_a_run_past_the_timeout_is_stopped_with_lower_bounds(tmp_path):
    # a program that takes ~64 MiB and then would sleep for a minute: stopped after 2 s, its memory so far reported
    code = "import time; b = bytearray(64 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(60)"
    r = cr.run_measured([sys.executable, "-c", code], tmp_path, dict(os.environ), tmp_path / "log.txt", timeout=2)
    assert r["timed_out"] and 2 <= r["wall_s"] < 20
    assert r["peak_rss_gib"] >= 64 / 1024
    done = cr.run_measured([sys.executable, "-c", "pass"], tmp_path, dict(os.environ), tmp_path / "log2.txt", timeout=30)
    assert "timed_out" not in done and done["wall_s"] < 30
    table = cr.format_table({}, {"svd": {"ours": {"wall_s": 2.0, "peak_rss_gib": 0.3},
                                         "theirs": {"wall_s": 600.0, "peak_rss_gib": 1.5, "timed_out": True},
                                         "ratio": {"wall_s": 0.003, "peak_rss_gib": 0.2}, "ratio_is_bound": True}})
    assert "| svd | 2.00 | >600.00 | <0.00 | 0.30 | >1.50 | <0.20 |" in table
