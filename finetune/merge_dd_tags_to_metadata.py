"""Merge tag files (`<image>.txt`, from WD14 tagger or DeepDanbooru) into the fine-tuning metadata JSON as `tags`.

    python finetune/merge_dd_tags_to_metadata.py --full_path train_data --in_json meta_cap.json meta_cap_dd.json

See docs/merge_captions_to_metadata.md.
"""
from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.dataprep import merge

DESCRIPTION = ("Put each image's tag file into the metadata JSON (field 'tags'). Without --in_json an existing "
               "out_json is read and updated; entries of the input are never dropped.")


def main(argv: list[str] | None = None) -> int:
    return merge.main(argv, "tags", ".txt", DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
