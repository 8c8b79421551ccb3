"""The quality report from an output folder's files: saves by step, best by validation loss, contact sheet."""
from __future__ import annotations

import json

import torch
from PIL import Image

from library.file_io import save_state_dict
from library.quality_report import build_report, format_table, write_report


def _folder(tmp_path):
    out = tmp_path / "run"
    (out / "sample").mkdir(parents=True)
    for name, step, epoch in (("my-step00000010", 10, 1), ("my-step00000020", 20, 1), ("my", 30, 2)):
        save_state_dict({"w": torch.zeros(1)}, out / f"{name}.safetensors",
                        metadata={"ss_steps": str(step), "ss_epoch": str(epoch)})
    save_state_dict({"w": torch.zeros(1)}, out / "my-raw.safetensors", metadata={"ss_steps": "30"})  # not a save
    save_state_dict({"w": torch.zeros(1)}, out / "other.safetensors", metadata={"ss_steps": "30"})  # other name
    (out / "my.validation.json").write_text(json.dumps({"records": [
        {"step": 10, "epoch": 0, "loss": 0.5}, {"step": 20, "epoch": 1, "loss": 0.25}, {"step": 30, "epoch": 2,
                                                                                         "loss": 0.375}]}))
    colours = {10: (255, 0, 0), 20: (0, 255, 0), 30: (0, 0, 255)}
    for step, colour in colours.items():
        for index in (0, 1):
            Image.new("RGB", (32, 48), colour).save(out / "sample" / f"my_{step:06d}_{index:02d}_20260101000000_{index}.png")
    Image.new("RGB", (32, 48)).save(out / "sample" / "other_000010_00_20260101000000_1.png")
    return out


def test_report_names_the_best_save_and_joins_losses_by_step(tmp_path):
    out = _folder(tmp_path)
    report = build_report(out, "my")
    assert [(s["file"], s["step"], s["validation_loss"]) for s in report["saves"]] == [
        ("my-step00000010.safetensors", 10, 0.5), ("my-step00000020.safetensors", 20, 0.25),
        ("my.safetensors", 30, 0.375)]
    assert report["best"] == "my-step00000020.safetensors"
    table = format_table(report).splitlines()
    assert table[2].endswith("0.250000  <- best") and table[-1] == "best by validation loss: my-step00000020.safetensors"


def test_contact_sheet_has_a_row_per_prompt_and_a_column_per_point_in_step_order(tmp_path):
    out = _folder(tmp_path)
    report = write_report(out, "my")
    assert json.loads((out / "my.report.json").read_text())["best"] == report["best"]
    with Image.open(out / "my.report.png") as sheet:
        assert sheet.size == (40 + 3 * 48, 16 + 2 * 48)  # cells at the samples' size
        sheet = sheet.convert("RGB")
        row_y = 16 + 48 + 24  # middle of the second prompt's row
        got = [sheet.getpixel((40 + c * 48 + 16, row_y)) for c in range(3)]
    assert got == [(255, 0, 0), (0, 255, 0), (0, 0, 255)]  # steps 10, 20, 30 left to right


def test_nothing_written_for_a_run_that_neither_validated_nor_sampled(tmp_path):
    out = tmp_path / "plain"
    out.mkdir()
    save_state_dict({"w": torch.zeros(1)}, out / "last.safetensors", metadata={"ss_steps": "5"})
    assert write_report(out, "last") is None and not (out / "last.report.json").exists()
    forced = write_report(out, "last", force=True)
    assert forced["best"] is None and forced["saves"][0]["validation_loss"] is None
    assert "-" in format_table(forced).splitlines()[1].split()
