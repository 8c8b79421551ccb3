"""Cut a DyLoRA model into one ordinary LoRA per rank: unit, 2*unit, ..., the trained dim.

The rank-r LoRA is the first r rows of every `lora_down.weight` and the first r columns of every
`lora_up.weight`, with the alphas unchanged (so its scale is alpha / r, as DyLoRA trained it). Each file is
written as `<save_to stem>-<rank, 4 digits><ext>` (e.g. `model-split-0004.safetensors`), with the metadata of
the input, `ss_network_dim` set to the rank, a note in `ss_training_comment` and fresh `sshs_*` hashes.

Example: python networks/extract_lora_from_dylora.py --model dylora.safetensors --save_to split.safetensors --unit 4
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from library.file_io import CheckpointError, load_state_dict, read_metadata, refuse_overwrite
from networks.lora import save_lora_file
from networks.lora_names import split_key

logger = logging.getLogger(__name__)
EXTENSIONS = (".safetensors", ".ckpt", ".pt")


def module_ranks(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """The rank of every module (rows of its lora_down.weight)."""
    return {split_key(k)[0]: v.shape[0] for k, v in sd.items() if split_key(k)[1] == "lora_down.weight"}


def split_by_rank(sd: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """The LoRA of the first `rank` ranks (modules of a smaller rank are kept whole)."""
    out = {}
    for key, value in sd.items():
        kind = split_key(key)[1]
        if kind == "lora_down.weight":
            out[key] = value[:rank].contiguous()
        elif kind == "lora_up.weight":
            out[key] = value[:, :rank].contiguous()
        else:
            out[key] = value
    return out


def output_path(save_to: str, rank: int) -> str:
    stem, ext = os.path.splitext(save_to)
    return f"{stem}-{rank:04d}{ext}"


def extract(model: str, save_to: str, unit: int) -> list[str]:
    """Write one LoRA per rank; returns the written paths. Validates everything before writing anything."""
    if unit < 1:
        raise ValueError(f"--unit {unit}: must be 1 or more (the unit the DyLoRA was trained with)")
    if Path(save_to).suffix.lower() not in EXTENSIONS:
        raise ValueError(f"--save_to {save_to}: extension must be one of {', '.join(EXTENSIONS)}")
    sd = load_state_dict(model)
    ranks = module_ranks(sd)
    if not ranks:
        raise CheckpointError(f"{model}: no lora_down.weight keys; not a LoRA / DyLoRA file")
    max_rank = max(ranks.values())
    odd = sorted(name for name, r in ranks.items() if r % unit)
    if odd:
        raise ValueError(f"--unit {unit}: rank {ranks[odd[0]]} of {odd[0]} in {model} is not a multiple of the unit")
    outputs = [(rank, output_path(save_to, rank)) for rank in range(unit, max_rank + 1, unit)]
    for _, path in outputs:
        refuse_overwrite(path, [model], "--save_to")
    metadata = read_metadata(model)
    comment = metadata.get("ss_training_comment", "")
    for rank, path in outputs:
        meta = dict(metadata)
        meta.pop("sshs_model_hash", None)
        meta.pop("sshs_legacy_hash", None)
        meta["ss_network_dim"] = str(rank)
        meta["ss_training_comment"] = f"split from DyLoRA, rank {max_rank} to {rank}" + (f"; {comment}" if comment else "")
        save_lora_file(split_by_rank(sd, rank), path, metadata=meta)
        logger.info("saved rank %d: %s", rank, path)
    return [path for _, path in outputs]


def setup_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Extract one LoRA per rank from a DyLoRA model.")
    parser.add_argument("--model", required=True, help="DyLoRA model to split (.safetensors, .ckpt or .pt)")
    parser.add_argument("--save_to", required=True,
                        help="base output file name; the rank is appended: <name>-0004.safetensors, ...")
    parser.add_argument("--unit", type=int, required=True, help="the unit the DyLoRA was trained with")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = setup_parser().parse_args(argv)
    try:
        paths = extract(args.model, args.save_to, args.unit)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    logger.info("wrote %d LoRA files", len(paths))


if __name__ == "__main__":
    main()
