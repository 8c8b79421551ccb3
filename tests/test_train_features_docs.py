"""The worked example of docs/train_network.md's training features section, run as printed (tiny model, temp
output folder), and its masked-loss TOML block."""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from PIL import Image

from library.file_io import read_metadata
from tests.train_helpers import parse, reset_accelerate, tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "train_network.md").read_text(encoding="utf-8")
SECTION = DOC.split("## Training features", 1)[1].split("\n## ", 1)[0]


def _commands() -> list[list[str]]:
    example = SECTION.split("### Worked example", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", example, re.S)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_worked_example_runs_as_printed(tmp_path, capsys, monkeypatch):
    from library.network_trainer import main as train_main
    from tools.lora_report import main as report_main

    monkeypatch.chdir(ROOT)
    train_cmd, report_cmd = _commands()
    assert train_cmd[:2] == ["python", "train_network.py"] and report_cmd[:2] == ["python", "tools/lora_report.py"]
    out = tmp_path / "tiny_lora_features"
    swap = {"output/tiny_sd1": tiny_model_dir(), "output/tiny_lora_features": str(out)}
    reset_accelerate()
    train_main([swap.get(w, w) for w in train_cmd[2:]])
    printed = capsys.readouterr().out
    records = json.loads((out / "tiny_lora.validation.json").read_text())["records"]
    assert [r["step"] for r in records] == [12, 24]  # each epoch end (= each save)
    assert f"validation loss (step 24): {records[-1]['loss']:.6f}" in printed
    assert f"LoRA saved: {out / 'tiny_lora.safetensors'}" in printed

    meta = read_metadata(out / "tiny_lora.safetensors")
    assert meta["ss_loraplus_lr_ratio"] == "16.0" and meta["ss_loss_type"] == "huber"
    assert meta["ss_huber_schedule"] == "snr" and meta["ss_ema_decay"] == "0.9" and meta["ss_immiscible_noise"] == "4"
    assert meta["ss_ip_noise_gamma_random_strength"] == "True" and meta["ss_num_train_images"] == "24"

    report_main([swap.get(w, w) for w in report_cmd[2:]])
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "epoch", "step", "val.", "loss"]
    best = min(records, key=lambda r: r["loss"])
    best_file = "tiny_lora.safetensors" if best["step"] == 24 else "tiny_lora-000001.safetensors"
    assert table[1].split()[:4] == ["tiny_lora-000001.safetensors", "1", "12", f"{records[0]['loss']:.6f}"]
    assert table[2].split()[:4] == ["tiny_lora.safetensors", "2", "24", f"{records[1]['loss']:.6f}"]
    assert f"best by validation loss: {best_file}" in table
    report = json.loads((out / "tiny_lora.report.json").read_text())
    assert report["best"] == best_file and sorted(report["samples"]) == ["0", "1"]
    with Image.open(out / "tiny_lora.report.png") as sheet:  # 2 prompts x 2 epochs of 64 px samples + labels
        assert sheet.size == (40 + 2 * 64, 16 + 2 * 64)


def test_lora_report_errors_name_the_folder(tmp_path):
    from tools.lora_report import main as report_main

    with pytest.raises(SystemExit, match="no such output folder"):
        report_main([str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no saved LoRA named last"):
        report_main([str(tmp_path)])


def test_masked_loss_toml_block_loads_with_masks(tmp_path, monkeypatch):
    from library.datasets import build_dataset_group

    block = re.findall(r"```toml\n(.*?)```", SECTION, re.S)[0]
    shutil.copytree(ROOT / "examples" / "tiny_lora" / "images", tmp_path / "images")
    masks = tmp_path / "masks" / "4_sks shape"
    masks.mkdir(parents=True)
    for image in (tmp_path / "images" / "4_sks shape").glob("*.png"):
        Image.new("L", (64, 64), 255).save(masks / image.name)
    (tmp_path / "data.toml").write_text('[general]\ncaption_extension = ".caption"\n' + block)
    monkeypatch.chdir(tmp_path)
    args = parse(["--pretrained_model_name_or_path", tiny_model_dir(), "--dataset_config", "data.toml",
                  "--output_dir", "out", "--network_module", "networks.lora", "--masked_loss"])
    group = build_dataset_group(args, None)
    group.set_epoch(1)
    batch = group[0]
    assert batch["alpha_masks"].shape == (1, 64, 64) and float(batch["alpha_masks"].min()) == 1.0
