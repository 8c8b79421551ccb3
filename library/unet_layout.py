"""Where each diffusers UNet module sits in the original (LDM / SGM) UNet layout.

The original UNet numbers its blocks flatly: `input_blocks.N.M`, `middle_block.M`, `output_blocks.N.M`.
diffusers nests them: `down_blocks.i.{resnets,attentions}.j`, `down_blocks.i.downsamplers.0`, `mid_block`,
`up_blocks.i.*`. Both the single-file checkpoint converter and the SDXL LoRA key names
(`lora_unet_input_blocks_4_1_...`) and the block indices of block-wise LoRA settings are derived from this
one mapping, for any UNet2DConditionModel config of the SD1 / SD2 / SDXL families.
"""
from __future__ import annotations

from typing import Any, Mapping

# Sub-module renames inside a ResNet block (diffusers -> original).
RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# Top-level module renames (diffusers -> original); label_emb exists only with SDXL's text_time embedding.
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def block_prefix_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Map each diffusers block prefix (`down_blocks.1.attentions.0`) to its original one (`input_blocks.4.1`)."""
    layers = config["layers_per_block"]
    down_types = config["down_block_types"]
    up_types = config["up_block_types"]
    n_levels = len(down_types)
    mapping: dict[str, str] = {}

    for i, block_type in enumerate(down_types):
        for j in range(layers):
            n = 1 + i * (layers + 1) + j
            mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{n}.0"
            if "CrossAttn" in block_type:
                mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{n}.1"
        if i < n_levels - 1:
            n = 1 + i * (layers + 1) + layers
            mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"

    mapping["mid_block.resnets.0"] = "middle_block.0"
    mapping["mid_block.attentions.0"] = "middle_block.1"
    mapping["mid_block.resnets.1"] = "middle_block.2"

    for i, block_type in enumerate(up_types):
        has_attn = "CrossAttn" in block_type
        for j in range(layers + 1):
            n = i * (layers + 1) + j
            mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{n}.0"
            if has_attn:
                mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{n}.1"
        if i < n_levels - 1:
            n = i * (layers + 1) + layers
            mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if has_attn else 1}.conv"
    return mapping


def diffusers_to_ldm_module(name: str, config: Mapping[str, Any]) -> str:
    """Translate a diffusers UNet module or parameter path into the original layout's path.

    `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` -> `input_blocks.4.1.transformer_blocks.0.attn1.to_q`
    (with the SDXL config); parameter suffixes such as `.weight` carry over. Raises KeyError for a path that is
    not part of the UNet.
    """
    return _translate(name, _prefix_table(config))


def _prefix_table(config: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    key = _config_key(config)
    cached = _TABLE_CACHE.get(key)
    if cached is None:
        rows = [(d, o, ".resnets." in d or d.startswith("mid_block.resnets")) for d, o in block_prefix_map(config).items()]
        rows += [(d, o, False) for d, o in TOP_LEVEL.items()]
        rows.sort(key=lambda r: -len(r[0]))  # longest prefix first: "resnets.1" never matches "resnets.10"
        cached = _TABLE_CACHE[key] = rows
    return cached


_TABLE_CACHE: dict[tuple, list[tuple[str, str, bool]]] = {}


def _config_key(config: Mapping[str, Any]) -> tuple:
    return (config["layers_per_block"], tuple(config["down_block_types"]), tuple(config["up_block_types"]))


def _translate(name: str, table: list[tuple[str, str, bool]]) -> str:
    for diff_prefix, ldm_prefix, is_resnet in table:
        if name == diff_prefix or name.startswith(diff_prefix + "."):
            rest = name[len(diff_prefix):]
            if is_resnet and rest:
                sub = rest[1:]
                for d, o in RESNET_RENAMES.items():
                    if sub == d or sub.startswith(d + "."):
                        sub = o + sub[len(d):]
                        break
                rest = "." + sub
            return ldm_prefix + rest
    raise KeyError(f"{name!r} is not a module of this UNet layout")


def ldm_to_diffusers_map(config: Mapping[str, Any], diffusers_names: list[str]) -> dict[str, str]:
    """Inverse of `diffusers_to_ldm_module` over the given diffusers names: {original name: diffusers name}."""
    table = _prefix_table(config)
    return {_translate(n, table): n for n in diffusers_names}


def block_index(ldm_name: str, sdxl: bool) -> int:
    """Block number of an original-layout UNet path for block-wise LoRA settings.

    SD1/SD2, 25 blocks: input_blocks.N -> N (0..11), middle_block -> 12, output_blocks.N -> 13 + N.
    SDXL, 23 blocks: time/label embeddings -> 0, input_blocks.N -> 1 + N (1..9), middle_block.M -> 10 + M,
    output_blocks.N -> 13 + N (13..21), out -> 22. Returns -1 for paths outside these (SD1's embeddings / out).
    """
    parts = ldm_name.split(".")
    head = parts[0]
    if head == "input_blocks":
        return int(parts[1]) + (1 if sdxl else 0)
    if head == "middle_block":
        return 10 + int(parts[1]) if sdxl else 12
    if head == "output_blocks":
        return 13 + int(parts[1])
    if sdxl and head in ("time_embed", "label_emb"):
        return 0
    if sdxl and head == "out":
        return 22
    return -1


def num_blocks(sdxl: bool) -> int:
    return 23 if sdxl else 25
