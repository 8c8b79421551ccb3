"""The quality report of a training output folder: validation loss per save, the best save, a contact sheet.

Built only from the files a run wrote: the saved LoRA files (`<name>.safetensors`, `<name>-000002...`,
`<name>-step00000100...`; their `ss_steps` / `ss_epoch` metadata), the validation records
(`<name>.validation.json`, `library.validation`) and the sample images (`sample/<name>_<e000002|000100>_<prompt
index>_...png`). It writes `<name>.report.json` and, when there are samples, `<name>.report.png` (one row per
prompt, one column per sampling point, labelled), and returns the table as text. `tools/lora_report.py` rebuilds
it for any output folder; the trainer writes it at the end of every run that validated or sampled.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SAVE_EXTS = (".safetensors", ".ckpt", ".pt")
_SAMPLE = re.compile(r"^(?:(?P<name>.+)_)?(?P<when>e\d{6}|\d{6})_(?P<index>\d{2})_\d{14}_\d+(?:_\d+)?\.png$")


def _saves(folder: Path, name: str) -> list[dict[str, Any]]:
    from library.file_io import read_metadata

    pattern = re.compile(rf"^{re.escape(name)}(-(\d{{6}}|step\d{{8}}))?(\.safetensors|\.ckpt|\.pt)$")
    out = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or not pattern.match(path.name):
            continue
        meta = read_metadata(path)
        step = int(meta["ss_steps"]) if "ss_steps" in meta else None
        epoch = int(meta["ss_epoch"]) if "ss_epoch" in meta else None
        out.append({"file": path.name, "step": step, "epoch": epoch})
    return sorted(out, key=lambda s: (s["step"] is None, s["step"] or 0, s["file"]))


def _validation(folder: Path, name: str) -> list[dict[str, Any]]:
    path = folder / f"{name}.validation.json"
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text(encoding="utf-8")).get("records", []))
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{path}: not a validation record file ({e})") from None


def _samples(folder: Path, name: str) -> dict[int, dict[str, str]]:
    """{prompt index: {point label: path}}; labels are 'e000002' (epoch) or '000100' (step)."""
    out: dict[int, dict[str, str]] = {}
    sample_dir = folder / "sample"
    if not sample_dir.is_dir():
        return out
    for path in sorted(sample_dir.iterdir()):
        m = _SAMPLE.match(path.name)
        if m and (m.group("name") or "") == name:
            out.setdefault(int(m.group("index")), {})[m.group("when")] = str(path)
    return out


def build_report(output_dir: str | os.PathLike, output_name: str) -> dict[str, Any]:
    """The report as a dict: saves (file, step, epoch, validation_loss), best, validation, samples."""
    folder = Path(output_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such output folder")
    saves = _saves(folder, output_name)
    records = _validation(folder, output_name)
    by_step = {r["step"]: r["loss"] for r in records}
    for s in saves:
        s["validation_loss"] = by_step.get(s["step"])
    scored = [s for s in saves if s["validation_loss"] is not None]
    best = min(scored, key=lambda s: (s["validation_loss"], s["step"] or 0)) if scored else None
    return {"output_name": output_name, "saves": saves, "best": best["file"] if best else None,
            "validation": records, "samples": {str(k): v for k, v in sorted(_samples(folder, output_name).items())}}


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'file':<40} {'epoch':>6} {'step':>8} {'val. loss':>11}"]
    for s in report["saves"]:
        loss = "-" if s["validation_loss"] is None else f"{s['validation_loss']:.6f}"
        mark = "  <- best" if s["file"] == report["best"] else ""
        lines.append(f"{s['file']:<40} {s['epoch'] if s['epoch'] is not None else '-':>6} "
                     f"{s['step'] if s['step'] is not None else '-':>8} {loss:>11}{mark}")
    if report["best"]:
        lines.append(f"best by validation loss: {report['best']}")
    return "\n".join(lines)


def contact_sheet(samples: dict[str, dict[str, str]], path: str, max_cell: int = 256) -> str | None:
    """A grid PNG: one row per prompt, one column per sampling point, column labels on top; cells are the
    samples' size, at most `max_cell` pixels."""
    from PIL import Image, ImageDraw

    from library.file_io import atomic_path

    points = sorted({p for row in samples.values() for p in row}, key=lambda p: (p.startswith("e"), p))
    if not points:
        return None
    with Image.open(next(iter(next(iter(samples.values())).values()))) as first:
        thumb = min(max_cell, max(first.size))
    label_h, label_w = 16, 40
    sheet = Image.new("RGB", (label_w + thumb * len(points), label_h + thumb * len(samples)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, point in enumerate(points):
        text = f"epoch {int(point[1:])}" if point.startswith("e") else f"step {int(point)}"
        draw.text((label_w + c * thumb + 4, 2), text, fill="black")
    for r, (index, row) in enumerate(samples.items()):
        draw.text((4, label_h + r * thumb + thumb // 2 - 6), f"#{index}", fill="black")
        for c, point in enumerate(points):
            if point in row:
                with Image.open(row[point]) as img:
                    img = img.convert("RGB")
                    img.thumbnail((thumb, thumb))
                    sheet.paste(img, (label_w + c * thumb, label_h + r * thumb))
    with atomic_path(path) as tmp:  # the report of an earlier run of this name is replaced
        sheet.save(tmp, format="PNG")
    return path


def write_report(output_dir: str | os.PathLike, output_name: str, force: bool = False) -> dict[str, Any] | None:
    """Write `<name>.report.json` (and `<name>.report.png` with samples); None when the run neither validated
    nor sampled (nothing to compare) unless `force`."""
    report = build_report(output_dir, output_name)
    if not force and not report["validation"] and not report["samples"]:
        return None
    from library.file_io import atomic_path

    folder = Path(output_dir)
    if report["samples"]:
        report["contact_sheet"] = contact_sheet(report["samples"], str(folder / f"{output_name}.report.png"))
    with atomic_path(folder / f"{output_name}.report.json") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
    logger.info("quality report:\n%s", format_table(report))
    return report
