"""Rebuild the quality report of a training output folder: validation loss per saved file, the best one,
and a contact sheet of the sample images per prompt across saves. See docs/train_network.md.

    python tools/lora_report.py output/my_lora --output_name my_lora
"""
import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.quality_report import format_table, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="quality report of a LoRA training output folder")
    parser.add_argument("output_dir", help="the --output_dir of the training run")
    parser.add_argument("--output_name", default="last", help="the --output_name of the run (default last)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = write_report(args.output_dir, args.output_name, force=True)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    if not report["saves"]:
        raise SystemExit(f"error: {args.output_dir}: no saved LoRA named {args.output_name}(-*) "
                         "(check --output_name)")
    print(format_table(report))
    print(f"report: {Path(args.output_dir) / (args.output_name + '.report.json')}")
    if report.get("contact_sheet"):
        print(f"contact sheet: {report['contact_sheet']}")


if __name__ == "__main__":
    main()
