"""The README's shell commands: run_tests.sh's worker count, the environment setup's two levels, the README's
launch lines."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_run_tests_starts_one_worker_per_core_even_with_omp_num_threads_set():
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as a user's shell (or run_tests.sh itself) may have it
    proc = subprocess.run(["bash", "run_tests.sh", "tests/test_entry_scripts.py", "-k", "documented"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    workers = min(len(os.sched_getaffinity(0)), 4)
    assert re.search(rf"created: {workers}/{workers} workers", proc.stdout), proc.stdout[-2000:]


LAUNCH = "accelerate launch -q --config_file examples/accelerate/single_process.yaml"


def readme_real_model_block() -> list[str]:
    """The README's "Training on a real model" commands, one per entry, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Training on a real model"):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_readme_real_model_command_runs_in_the_environment_the_demo_built(tmp_path, monkeypatch, capsys):
    """It enters .venv (the link tools/setup_env.sh makes), launches quietly with the bundled config, and its
    options train with the main install alone (no 8-bit optimizer): run here on the tiny model, 2 steps."""
    from library.file_io import read_metadata
    from library.network_trainer import main
    from tests.train_helpers import reset_accelerate, tiny_model_dir

    enter, launch = readme_real_model_block()
    assert enter == "source .venv/bin/activate" and (ROOT / ".venv/bin/activate").is_file()
    assert (ROOT / ".venv/bin/accelerate").is_file()
    assert launch.startswith(f"{LAUNCH} train_network.py ")
    assert (ROOT / "examples/accelerate/single_process.yaml").is_file()
    argv = launch.split("train_network.py ", 1)[1].split()
    substitutes = {"--pretrained_model_name_or_path=v1-5-pruned-emaonly.safetensors":
                   f"--pretrained_model_name_or_path={tiny_model_dir()}",
                   "--dataset_config=my_dataset.toml": "--dataset_config=examples/tiny_lora/dataset.toml",
                   "--output_dir=output/my_lora": f"--output_dir={tmp_path}", "--max_train_steps=400":
                   "--max_train_steps=2"}
    assert set(substitutes) <= set(argv)
    monkeypatch.chdir(ROOT)
    reset_accelerate()
    main([substitutes.get(a, a) for a in argv])
    assert f"LoRA saved: {tmp_path / 'my_lora.safetensors'}" in capsys.readouterr().out
    meta = read_metadata(tmp_path / "my_lora.safetensors")
    assert meta["ss_optimizer"].startswith("torch.optim")  # in torch: no optional package needed
    requirements = (ROOT / "requirements.txt").read_text()
    assert "bitsandbytes" not in requirements and "8bit" not in launch


def test_launch_line_ends_with_the_projects_one_line_error(tmp_path):
    accelerate = Path(os.sys.executable).parent / "accelerate"
    cmd = [str(accelerate), *LAUNCH.split()[1:], "train_network.py", "--pretrained_model_name_or_path",
           "missing.safetensors", "--network_module", "networks.lora", "--output_dir", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_CONFIG_FILE"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        "error: --pretrained_model_name_or_path missing.safetensors: no such file or folder"
    assert "Traceback" not in proc.stderr and "were not passed" not in proc.stderr + proc.stdout


def test_every_documented_launch_line_is_quiet():
    pages = [ROOT / "README.md", ROOT / "run_demo.sh", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(ROOT.glob("*.py")), *sorted((ROOT / "tools").glob("*.py"))]
    lines = [(page.name, line.strip()) for page in pages for line in page.read_text().splitlines()
             if re.match(r'\s*"?(\$venv/bin/)?accelerate"? launch ', line)]
    assert len(lines) >= 8
    for name, line in lines:  # a config file gives every value: no "values were not passed" warning
        assert re.search(r"launch -q --config_file examples/accelerate/\S+\.yaml ", line), (name, line)
