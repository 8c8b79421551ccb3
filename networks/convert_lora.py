"""Key layouts of LoRA files written by other tools, read under kohya names; and the script that converts them.

    python networks/convert_lora.py --model peft_lora.safetensors --save_to kohya_lora.safetensors [--sdxl]

Layouts read (detected from the keys; every tool here reads them through `KeyMap` / `convert_state_dict`):
- kohya / LyCORIS: `lora_unet_<path>.<part>`, `lora_te[12]_<path>.<part>` (parts: `lora_down.weight`,
  `lora_up.weight`, `alpha`, `dora_scale`, `lora_mid.weight`, `hada_*`, `lokr_*`): as they are.
- diffusers / PEFT: `unet.<module path>.lora_A.weight` / `lora_B.weight` (and `text_encoder.`, `text_encoder_2.`,
  optional `base_model.model.`; older diffusers `...processor.to_q_lora.down.weight`), with an optional `.alpha`:
  `lora_A` is `lora_down`, `lora_B` is `lora_up`. Without alphas the scale is 1 (alpha = rank), as diffusers
  applies them.
- ComfyUI-saved: `diffusion_model.<original UNet path>.<part>` and `text_encoders.clip_l|clip_g|clip_h.transformer.
  <path>.<part>` (clip_l: `lora_te` / SDXL `lora_te1`; clip_g: `lora_te2`; clip_h: SD2's `lora_te`).
UNet paths keep their layout (diffusers or original): `networks.lora_names.LoRANameResolver` accepts both.
PEFT's DoRA magnitude (`lora_magnitude_vector`, one value per output row) is not the webui/ComfyUI `dora_scale`
(per input column) and is refused; so is any other key, with one line naming the format.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

if __package__ in (None, ""):  # run as `python networks/convert_lora.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.file_io import CheckpointError
from networks.adapter_math import ADAPTER_KEYS

logger = logging.getLogger(__name__)

FOREIGN_PARTS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                 "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                 "down.weight": "lora_down.weight", "up.weight": "lora_up.weight"}
OLD_DIFFUSERS = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
REFUSED = {"lora_magnitude_vector": "PEFT DoRA magnitude (per output row; the webui/ComfyUI dora_scale is per input "
                                    "column and needs the base weight to convert)",
           "diff": "LyCORIS full weight difference", "oft_blocks": "LyCORIS OFT", "oft_diag": "LyCORIS OFT",
           "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm", "a1.weight": "LyCORIS GLoRA"}


def _part_of(key: str) -> tuple[str, str] | None:
    """(module path, kohya part) of a key, or None when no known part ends it."""
    for part in sorted(ADAPTER_KEYS, key=len, reverse=True):
        if key.endswith("." + part):
            return key[: -len(part) - 1], part
    for part in sorted(FOREIGN_PARTS, key=len, reverse=True):
        if key.endswith("." + part):
            return key[: -len(part) - 1], FOREIGN_PARTS[part]
    return None


def _kohya_name(path: str, sdxl: bool) -> tuple[str, str] | None:
    """(kohya module name, layout) of a module path, or None."""
    if "." not in path:  # a kohya-style name (unknown ones are reported by the caller as matching no layer)
        return path, "kohya"
    path = path.removeprefix("base_model.model.")
    for old, new in OLD_DIFFUSERS.items():
        path = path.replace(f"processor.{old}", new)
    prefixes = (("unet.", "lora_unet", "diffusers/PEFT"), ("diffusion_model.", "lora_unet", "ComfyUI"),
                ("text_encoder_2.", "lora_te2", "diffusers/PEFT"),
                ("text_encoder.", "lora_te1" if sdxl else "lora_te", "diffusers/PEFT"),
                ("text_encoders.clip_l.transformer.", "lora_te1" if sdxl else "lora_te", "ComfyUI"),
                ("text_encoders.clip_h.transformer.", "lora_te", "ComfyUI"),
                ("text_encoders.clip_g.transformer.", "lora_te2", "ComfyUI"))
    for prefix, kohya, layout in prefixes:
        if path.startswith(prefix):
            rest = path[len(prefix):]
            if kohya.startswith("lora_te") and not rest.startswith("text_model."):
                rest = "text_model." + rest
            return f"{kohya}_{rest.replace('.', '_')}", layout
    return None


def _refused(key: str) -> str | None:
    for part, what in REFUSED.items():
        if key.endswith("." + part):
            return what
    return None


@dataclass
class KeyMap:
    """Kohya `<name>.<part>` keys of a file and the file keys they come from."""

    source: dict[str, str] = field(default_factory=dict)  # kohya key -> file key
    parts: dict[str, list[str]] = field(default_factory=dict)  # module name -> parts
    layout: str = "kohya"

    @classmethod
    def for_keys(cls, keys: Sequence[str], path: str | os.PathLike = "<weights>", sdxl: bool | None = None) -> "KeyMap":
        """`sdxl` (None: guessed from the keys, e.g. `text_encoder_2.`) decides `lora_te1` vs `lora_te` names."""
        if sdxl is None:
            sdxl = any(k.startswith(("text_encoder_2.", "text_encoders.clip_g.", "lora_te2_")) or ".add_embedding." in k
                       or ".label_emb." in k for k in keys)
        result = cls()
        layouts = set()
        for key in keys:
            found = _part_of(key)
            named = _kohya_name(found[0], sdxl) if found else None
            if named is None:
                what = _refused(key)
                raise CheckpointError(f"{path}: key {key} " + (f"is a {what} tensor, a format these tools do not read"
                                      if what else "is not a key of a LoRA / LoHa / LoKr / DoRA file in the kohya, "
                                      "LyCORIS, diffusers/PEFT or ComfyUI layout"))
            name, layout = named
            layouts.add(layout)
            result.source[f"{name}.{found[1]}"] = key
            result.parts.setdefault(name, []).append(found[1])
        result.layout = " + ".join(sorted(layouts)) or "kohya"
        if result.layout != "kohya":
            logger.info("%s: %s key layout, read under kohya names", path, result.layout)
        return result

    def get(self, f, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return f.get(self.source[key], dtype)

    def shape(self, f, key: str) -> tuple[int, ...]:
        return f.shape(self.source[key])


def convert_state_dict(sd: Mapping[str, torch.Tensor], source: str = "<weights>",
                       sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """A state dict of any layout above under kohya names (the same tensors, no copies); `sdxl` as in `KeyMap`."""
    if all(k.startswith("lora_") for k in sd):
        return dict(sd)  # already kohya names (the common case; unknown parts are reported by the caller)
    keys = KeyMap.for_keys(list(sd), source, sdxl)
    return {kohya: sd[key] for kohya, key in keys.source.items()}


def main(argv: Sequence[str] | None = None) -> None:
    from library.file_io import load_state_dict, read_metadata
    from networks.lora_cli import check_inputs, check_output, run_main
    from networks.lora_files import save_lora_file

    parser = argparse.ArgumentParser(prog="convert_lora.py", description="Write a diffusers/PEFT or ComfyUI-layout "
                                     "LoRA file in the kohya layout (lora_unet_... / lora_te_... keys).")
    parser.add_argument("--model", required=True, help="LoRA file to convert (.safetensors)")
    parser.add_argument("--save_to", required=True, help="output file in kohya layout (.safetensors)")
    parser.add_argument("--sdxl", action="store_true", help="the LoRA is for SDXL (names its first text encoder "
                        "lora_te1_; needed only when the file has no second text encoder or SDXL-only layer)")

    def run(args: argparse.Namespace) -> None:
        check_inputs([args.model], "--model")
        check_output(args.save_to, [args.model])
        sd = load_state_dict(args.model)
        converted = convert_state_dict(sd, args.model, True if args.sdxl else None)
        metadata = read_metadata(args.model) if Path(args.model).suffix == ".safetensors" else {}
        metadata.setdefault("ss_network_module", "networks.lora")
        save_lora_file(converted, args.save_to, None, metadata)
        logger.info("wrote %d tensors of %d modules to %s", len(converted),
                    len({k.split('.', 1)[0] for k in converted}), args.save_to)

    run_main(run, parser, argv)


if __name__ == "__main__":
    main()
