"""The names of LoRA modules: which layers a LoRA targets and what each one is called in a file.

This is the one place that knows the naming of kohya-style LoRA files, which AUTOMATIC1111, ComfyUI and
diffusers read:

- UNet of SD1/SD2: `lora_unet_<diffusers module path, dots as underscores>`
  (`lora_unet_down_blocks_0_attentions_0_proj_in`).
- UNet of SDXL: `lora_unet_<original SGM module path>` (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`),
  translated by `library.unet_layout.diffusers_to_ldm_module`.
- Text encoders: `lora_te_` (SD1/SD2) or `lora_te1_` / `lora_te2_` (SDXL) followed by the transformers path
  *with* `text_model_` (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`), even where transformers 5's
  `CLIPTextModel` has no `.text_model` attribute: the names come from the format, not from a library version.

Targets (the module classes of kohya's `networks/lora.py`; every Linear / Conv2d inside one is a target):
- LoRA-LierLa: UNet `Transformer2DModel` (proj_in/out, attention q/k/v/out, feed-forward), text encoder
  `CLIPAttention` and `CLIPMLP`.
- LoRA-C3Lier adds the UNet's `ResnetBlock2D` (conv1, conv2 3x3; time_emb_proj Linear; conv_shortcut 1x1),
  `Downsample2D` and `Upsample2D` convs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch

from library.unet_layout import block_index, diffusers_to_ldm_module, ldm_to_diffusers_map

PREFIX_UNET = "lora_unet"
PREFIX_TE = "lora_te"
UNET_TARGET_CLASSES = ("Transformer2DModel",)
UNET_CONV_TARGET_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TE_TARGET_CLASSES = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
# layers outside the target classes that LyCORIS files (its "full" presets) and ComfyUI / the webui also adapt
UNET_EXTRA_TARGETS = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                      "add_embedding.linear_1", "add_embedding.linear_2")


@dataclass(frozen=True)
class LoRATarget:
    """One layer a LoRA module can attach to. Unpacks as `(path, module)` for `for name, (path, module) in ...`."""

    name: str  # lora_unet_... / lora_te_... (the key prefix in files)
    component: str  # "unet", "te" (SD1/SD2), "te1" / "te2" (SDXL)
    path: str  # module path inside its component (diffusers / transformers, as the loaded model has it)
    module: torch.nn.Module
    kind: str  # "linear", "conv1x1" or "conv3x3" (any Conv2d kernel other than 1x1)
    block: int  # block index for block-wise settings (UNet), -1 for text encoders

    def __iter__(self) -> Iterator:
        return iter((self.path, self.module))

    @property
    def is_unet(self) -> bool:
        return self.component == "unet"

    @property
    def text_encoder_index(self) -> int | None:
        """0 / 1 for SDXL's te1 / te2, 0 for the single encoder, None for the UNet."""
        return None if self.is_unet else (1 if self.component == "te2" else 0)


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    """Whether `unet` is an SDXL UNet (text_time additional embedding), whose LoRA names use the SGM layout."""
    config = getattr(unet, "config", None) or {}
    return config.get("addition_embed_type") == "text_time"


def as_text_encoder_list(text_encoder) -> list[torch.nn.Module]:
    """One model or a list/tuple of them (SDXL: [te1, te2]) as a list; None gives []."""
    if text_encoder is None:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [te for te in text_encoder if te is not None]
    return [text_encoder]


def module_kind(module: torch.nn.Module) -> str | None:
    """`linear`, `conv1x1`, `conv3x3` (any larger kernel) for the layers LoRA can wrap, else None."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv3x3"
    return None


def te_prefixes(n_text_encoders: int) -> list[str]:
    """`["lora_te"]` for one text encoder, `["lora_te1", "lora_te2"]` for SDXL's two."""
    return [PREFIX_TE] if n_text_encoders <= 1 else [f"{PREFIX_TE}{i + 1}" for i in range(n_text_encoders)]


def _children(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    for child_name, child in module.named_modules():
        kind = module_kind(child)
        if kind is not None:
            yield child_name, child, kind


def _join(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def text_encoder_targets(text_encoders: Sequence[torch.nn.Module]) -> dict[str, LoRATarget]:
    """LoRA targets of the text encoders (CLIPAttention / CLIPMLP linears), in model order."""
    targets: dict[str, LoRATarget] = {}
    prefixes = te_prefixes(len(text_encoders))
    for te, prefix in zip(text_encoders, prefixes):
        component = prefix[len("lora_"):]
        for name, module in te.named_modules():
            if type(module).__name__ not in TE_TARGET_CLASSES:
                continue
            for child_name, child, kind in _children(module):
                path = _join(name, child_name)
                format_path = path if path.startswith("text_model.") else "text_model." + path
                lora_name = f"{prefix}_{format_path.replace('.', '_')}"
                targets[lora_name] = LoRATarget(lora_name, component, path, child, kind, -1)
    return targets


def unet_targets(unet: torch.nn.Module, include_conv3x3: bool = False,
                 sdxl: bool | None = None, include_extra: bool = False) -> dict[str, LoRATarget]:
    """LoRA targets of the UNet: Transformer2DModel layers, plus ResNet / sampler layers for C3Lier, plus
    `UNET_EXTRA_TARGETS` (conv_in, conv_out, time / add embeddings) with `include_extra`."""
    sdxl = is_sdxl_unet(unet) if sdxl is None else sdxl
    classes = UNET_TARGET_CLASSES + (UNET_CONV_TARGET_CLASSES if include_conv3x3 else ())
    config = unet.config
    targets: dict[str, LoRATarget] = {}
    for name, module in unet.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_name, child, kind in _children(module):
            path = _join(name, child_name)
            ldm_path = diffusers_to_ldm_module(path, config)
            format_path = ldm_path if sdxl else path
            lora_name = f"{PREFIX_UNET}_{format_path.replace('.', '_')}"
            targets[lora_name] = LoRATarget(lora_name, "unet", path, child, kind, block_index(ldm_path, sdxl))
    if include_extra:
        modules = dict(unet.named_modules())
        for path in UNET_EXTRA_TARGETS:
            module = modules.get(path)
            kind = module_kind(module) if module is not None else None
            if kind is None:
                continue
            ldm_path = diffusers_to_ldm_module(path, config)
            lora_name = f"{PREFIX_UNET}_{(ldm_path if sdxl else path).replace('.', '_')}"
            targets[lora_name] = LoRATarget(lora_name, "unet", path, module, kind, block_index(ldm_path, sdxl))
    return targets


def lora_targets(text_encoders, unet: torch.nn.Module | None, sdxl: bool | None = None,
                 include_conv3x3: bool = False, include_extra: bool = False) -> dict[str, LoRATarget]:
    """All LoRA targets {lora_name: LoRATarget}: text encoders first, then the UNet (kohya's order).

    `text_encoders` is one model, a list ([te1, te2] for SDXL) or None; `unet` may be None.
    `include_conv3x3` selects the LoRA-C3Lier target set (adds ResnetBlock2D / Downsample2D / Upsample2D layers,
    including their Linear time_emb_proj and 1x1 conv_shortcut). `sdxl` (default: from the UNet config) picks
    the SGM naming of UNet layers. `include_extra` adds conv_in, conv_out and the time / add embeddings (layers
    LyCORIS files adapt). Works on meta-device models too (only names and shapes are read).
    """
    targets = text_encoder_targets(as_text_encoder_list(text_encoders))
    if unet is not None:
        targets.update(unet_targets(unet, include_conv3x3, sdxl, include_extra))
    return targets


class LoRANameResolver:
    """Map LoRA names found in files to targets of given models, accepting the aliases other tools write.

    Canonical names are those of `lora_targets` (with the C3Lier set). Also accepted: SDXL UNet names in the
    diffusers layout (`lora_unet_down_blocks_1_attentions_0_...`) and SD1/SD2 UNet names in the original layout
    (`lora_unet_input_blocks_1_1_...`), which some trainers write; both resolve to the same target.
    """

    def __init__(self, text_encoders, unet: torch.nn.Module | None, sdxl: bool | None = None):
        self.text_encoders = as_text_encoder_list(text_encoders)
        self.sdxl = (is_sdxl_unet(unet) if unet is not None else len(self.text_encoders) > 1) if sdxl is None else sdxl
        self.targets = lora_targets(self.text_encoders, unet, self.sdxl, include_conv3x3=True, include_extra=True)
        self.aliases: dict[str, str] = {}
        if unet is not None:
            unet_paths = [t.path for t in self.targets.values() if t.is_unet]
            by_path = {t.path: n for n, t in self.targets.items() if t.is_unet}
            if self.sdxl:
                alias_paths = {p: p for p in unet_paths}
            else:
                alias_paths = ldm_to_diffusers_map(unet.config, unet_paths)
            for alias_path, path in alias_paths.items():
                alias = f"{PREFIX_UNET}_{alias_path.replace('.', '_')}"
                if alias not in self.targets:
                    self.aliases[alias] = by_path[path]

    def resolve(self, lora_name: str) -> LoRATarget | None:
        """The target a file's LoRA name refers to, or None when it names no layer of these models."""
        target = self.targets.get(lora_name)
        if target is None and lora_name in self.aliases:
            target = self.targets[self.aliases[lora_name]]
        return target

    def canonical(self, lora_name: str) -> str | None:
        target = self.resolve(lora_name)
        return None if target is None else target.name


def split_key(key: str) -> tuple[str, str]:
    """`lora_unet_x.lora_down.weight` -> (`lora_unet_x`, `lora_down.weight`)."""
    name, _, rest = key.partition(".")
    return name, rest


def lora_names_in(keys: Iterable[str]) -> list[str]:
    """The distinct module names (text before the first dot) of state-dict keys, in first-seen order."""
    return list(dict.fromkeys(split_key(k)[0] for k in keys))


_CONV3X3_NAME = re.compile(r"_(conv1|conv2|conv|conv_in|conv_out|in_layers_2|out_layers_3|op|input_blocks_0_0|out_2)$")
_CONV1X1_NAME = re.compile(r"_(conv_shortcut|skip_connection)$")
_PROJ_NAME = re.compile(r"_(proj_in|proj_out)$")


def conv_kernel_of_name(lora_name: str, proj_is_conv: bool) -> tuple[int, int] | None:
    """The kernel of a UNet module from its name alone, in either layout: (3, 3) for SD's 3x3 convs (ResNet
    conv1/conv2, samplers, conv_in/out), (1, 1) for the ResNet shortcuts and, where `proj_is_conv` (SD 1.x),
    the transformers' proj_in/proj_out; None for a Linear. Used where a file stores a conv's kernel flattened
    (LoHa / LoKr factors) and no model is at hand."""
    if not lora_name.startswith("lora_unet_"):
        return None
    if _CONV3X3_NAME.search(lora_name):
        return (3, 3)
    if _CONV1X1_NAME.search(lora_name) or (proj_is_conv and _PROJ_NAME.search(lora_name)):
        return (1, 1)
    return None


_SD_UNET_NAME = re.compile(r"^lora_unet_(down_blocks|up_blocks|mid_block)_")
_SGM_UNET_NAME = re.compile(r"^lora_unet_(input_blocks|output_blocks|middle_block)_")


def guess_file_family(names: Iterable[str]) -> str:
    """Guess which model family a LoRA file was made for from its module names (for error messages)."""
    names = list(names)
    te12 = any(n.startswith(("lora_te1_", "lora_te2_")) for n in names)
    te = any(n.startswith("lora_te_") for n in names)
    sgm = any(_SGM_UNET_NAME.match(n) for n in names)
    diffusers = any(_SD_UNET_NAME.match(n) for n in names)
    if te12 or (sgm and not te):
        return "SDXL"
    if te or diffusers:
        return "SD1/SD2"
    return "unknown (no kohya-style lora_unet_/lora_te_ names)"
