"""LoRA files: writing them with kohya's `sshs_*` hashes, and checking a loaded state dict against the models.

`save_lora_file` is used by the network's `save_weights` and by every LoRA tool that writes a file.
`normalize_weights` maps names (aliases included) to canonical ones, reshapes 1x1-conv / linear weights, lists
keys that name no layer, and refuses files for another architecture or with wrong shapes.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Mapping

import torch

from library.file_io import CheckpointError, save_state_dict
from networks.lora_names import LoRANameResolver, guess_file_family, lora_names_in, split_key

logger = logging.getLogger(__name__)



def safetensors_hashes(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """kohya's (`sshs_model_hash`, `sshs_legacy_hash`): sha256 of the tensor data of the safetensors encoding with
    only the `ss_*` metadata, and the legacy hash (sha256 of 64 KiB at 1 MiB, first 8 hex digits)."""
    from safetensors.torch import save

    ss_metadata = {k: str(v) for k, v in (metadata or {}).items() if k.startswith("ss_")}
    blob = save({k: v.contiguous() for k, v in state_dict.items()}, metadata=ss_metadata)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(memoryview(blob)[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(blob)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def save_lora_file(state_dict: Mapping[str, torch.Tensor], file: str | os.PathLike, dtype: torch.dtype | None = None,
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA state dict atomically; safetensors files get `metadata` plus the two `sshs_*` hashes."""
    sd = {k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
          .contiguous() for k, v in state_dict.items()}
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    if str(file).lower().endswith(".safetensors"):
        meta["sshs_model_hash"], meta["sshs_legacy_hash"] = safetensors_hashes(sd, meta)
    save_state_dict(sd, file, metadata=meta)


LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


def _family(network_or_sdxl) -> str:
    sdxl = network_or_sdxl if isinstance(network_or_sdxl, bool) else network_or_sdxl.is_sdxl
    return "SDXL" if sdxl else "SD1/SD2"


def normalize_weights(sd: Mapping[str, torch.Tensor], network=None, *,
                      resolver: LoRANameResolver | None = None, source: str = "<weights>",
                      parts: tuple[str, ...] = LORA_PARTS) -> dict[str, torch.Tensor]:
    """Check a LoRA state dict against the models and return it under canonical names.

    Aliased names are renamed; 1x1-conv / linear weights are reshaped to the module's layout; keys naming no
    layer are reported (a warning listing them) and left out; a file for another model family or with wrong
    shapes raises CheckpointError naming the file, key and shapes. `parts` are the keys kept after the module name
    (LoRA's by default; `networks.adapter_math.ADAPTER_KEYS` for the LoHa / LoKr / DoRA networks).
    """
    from networks.convert_lora import convert_state_dict

    sdxl = resolver.sdxl if resolver is not None else getattr(network, "is_sdxl", None)
    sd = convert_state_dict(sd, source, sdxl)  # diffusers/PEFT and ComfyUI layouts under kohya names
    modules = {}
    if network is not None:
        modules = {lora.lora_name: lora for lora in network.text_encoder_loras + network.unet_loras}
    names = lora_names_in(sd.keys())
    if resolver is None and network is None:
        raise ValueError("normalize_weights needs a network or a resolver")

    def canonical(name: str) -> str | None:
        if resolver is not None:
            return resolver.canonical(name)
        if name in modules:
            return name
        return None

    out: dict[str, torch.Tensor] = {}
    unmatched: list[str] = []
    other_parts: list[str] = []  # e.g. LyCORIS hada_w1_a / lokr_w1 / lora_mid: another network type
    for key, value in sd.items():
        name, rest = split_key(key)
        new_name = canonical(name)
        if new_name is None:
            unmatched.append(key)
        elif rest not in parts:
            other_parts.append(key)
        else:
            out[f"{new_name}.{rest}"] = value
    sdxl = resolver.sdxl if resolver is not None else network.is_sdxl
    if not out:
        if other_parts:
            raise CheckpointError(f"{source}: holds {split_key(other_parts[0])[1]} weights (e.g. {other_parts[0]}), "
                                  f"not weights of a known format (LoRA, LoHa, LoKr, DoRA)")
        raise CheckpointError(f"{source}: no key matches a LoRA layer of this {_family(sdxl)} model; the file looks "
                              f"like a LoRA for {guess_file_family(names)} ({len(names)} modules, e.g. "
                              f"{names[0] if names else 'none'})")
    _check_family(names, sdxl, source)
    if unmatched:
        logger.warning("%s: %d keys match no LoRA layer of this model and are ignored: %s", source, len(unmatched),
                       ", ".join(unmatched))
    if other_parts:
        logger.warning("%s: %d keys are not LoRA weights (lora_down/lora_up/alpha) and are ignored: %s", source,
                       len(other_parts), ", ".join(other_parts))
    if network is not None:
        conform_shapes(out, network.state_dict(), source, sdxl)
    return out


def _check_family(names: list[str], sdxl: bool, source: str) -> None:
    te_names = [n for n in names if n.startswith("lora_te")]
    wants = ("lora_te1_", "lora_te2_") if sdxl else ("lora_te_",)
    wrong = [n for n in te_names if not n.startswith(wants)]
    if wrong:
        raise CheckpointError(f"{source}: text-encoder key {wrong[0]} is for a {guess_file_family(names)} model, but "
                              f"this model is {_family(sdxl)} (expects {' / '.join(wants)} names)")


def conform_shapes(sd: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor], source: str, sdxl: bool) -> None:
    for key, value in sd.items():
        want = expected.get(key)
        if want is None or value.shape == want.shape:
            continue
        if value.numel() == want.numel() and value.dim() != want.dim() and key.endswith("weight"):
            sd[key] = value.reshape(want.shape)  # a 1x1 conv stored as linear (or the reverse) by another trainer
            continue
        raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, this {_family(sdxl)} model needs "
                              f"{tuple(want.shape)}; the LoRA was made for another model or architecture")
