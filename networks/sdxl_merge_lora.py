"""sdxl_merge_lora.py: merge LoRAs into an SDXL checkpoint, or SDXL LoRAs into one LoRA.

The options are those of merge_lora.py (without --v2); both scripts share one implementation. See
docs/sdxl_merge_lora.md.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from networks import merge_lora


def setup_parser():
    return merge_lora.setup_parser(sdxl=True)


def main(argv: Sequence[str] | None = None) -> None:
    merge_lora.main(argv, sdxl=True)


if __name__ == "__main__":
    main()
