"""Single-file (LDM / SGM) checkpoint layout <-> diffusers / transformers state dicts, both directions.

A single-file Stable Diffusion checkpoint holds four components under fixed prefixes:

| family | UNet | VAE | text encoder(s) |
| --- | --- | --- | --- |
| sd1 | `model.diffusion_model.` | `first_stage_model.` | `cond_stage_model.transformer.text_model.` (CLIP ViT-L) |
| sd2 | same | same | `cond_stage_model.model.` (OpenCLIP ViT-H) |
| sdxl | same | same | `conditioner.embedders.0.transformer.text_model.` (CLIP ViT-L), `conditioner.embedders.1.model.` (OpenCLIP bigG) |

Every diffusers parameter maps to one original tensor (`ldm_param_for`), possibly a row slice of OpenCLIP's fused
`in_proj_weight` (q, k, v stacked), a transposed `text_projection`, or a 1x1 conv of the VAE's mid attention.
Both conversion directions and the LoRA merge tools use that one mapping.

Sizes are inferred from tensor shapes (`infer_layout`), plus conventions that shapes cannot show:
- attention heads of the UNet: SD1 has 8 heads per block; SD2 / SDXL have 64 channels per head. Test-sized
  models (first UNet width under 64) follow the same rules scaled down: SD1 `min(8, width // 8)` heads,
  SD2 / SDXL `min(64, width // 2)` channels per head;
- text encoders: 64 channels per head (`hidden // 64`), 2 heads below a width of 128; CLIP ViT-L uses
  quick_gelu, the OpenCLIP towers gelu;
- group norm groups: `min(32, first width // 2)` (32 at real sizes);
- SD2 keeps OpenCLIP's last layer in the file but diffusers drops it (SD2 uses the penultimate layer), and
  `text_projection` / `logit_scale` are unused: such tensors are carried through a load -> save in the text
  encoder's `ldm_extra_tensors` attribute; without them (a model from a Diffusers folder) saving writes the
  convention of the original scripts: the last layer is a copy of the one before it, `text_projection` the
  identity and `logit_scale` ln(100). SDXL's bigG keeps all layers; only `logit_scale` is carried or made.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from library.file_io import CheckpointError
from library.unet_layout import diffusers_to_ldm_module

FAMILIES = ("sd1", "sd2", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIXES = {
    "sd1": ["cond_stage_model.transformer.text_model."],
    "sd2": ["cond_stage_model.model."],
    "sdxl": ["conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."],
}
TE_COMPONENTS = ("text_encoder", "text_encoder_2")
EXTRA_ATTR = "ldm_extra_tensors"  # attribute of a text encoder holding file-only OpenCLIP tensors
LOGIT_SCALE_DEFAULT = math.log(100.0)

# VAE sub-module renames inside a block (diffusers -> original).
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
_OPENCLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


@dataclass(frozen=True)
class LdmParam:
    """Where one diffusers parameter lives in a single-file checkpoint.

    `key` is the full key; `rows` a slice of its first dimension (fused q/k/v); `kind` is "" (same shape),
    "conv1x1" (the file holds a (out, in, 1, 1) conv, diffusers a Linear) or "transpose" (text_projection).
    """

    key: str
    rows: slice | None = None
    kind: str = ""

    def from_ldm(self, tensor: torch.Tensor) -> torch.Tensor:
        """The diffusers tensor, given the whole file tensor at `key` (a view where possible)."""
        t = tensor[self.rows] if self.rows is not None else tensor
        if self.kind == "conv1x1" and t.ndim == 4:
            return t[:, :, 0, 0]
        if self.kind == "transpose":
            return t.t()
        return t

    def to_ldm(self, tensor: torch.Tensor) -> torch.Tensor:
        """The file's tensor (or row block) for a diffusers tensor."""
        if self.kind == "conv1x1" and tensor.ndim == 2:
            return tensor[:, :, None, None]
        if self.kind == "transpose":
            return tensor.t()
        return tensor

    def add_delta(self, state_dict: dict[str, torch.Tensor], delta: torch.Tensor) -> None:
        """Add a diffusers-shaped `delta` in place to this parameter inside a single-file state dict."""
        t = state_dict[self.key]
        target = t[self.rows] if self.rows is not None else t
        target += self.to_ldm(delta).reshape(target.shape).to(dtype=t.dtype, device=t.device)


@dataclass
class LdmLayout:
    """The family and sizes of a single-file checkpoint, as diffusers / transformers configs."""

    family: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_configs: list[dict[str, Any]]  # sd_configs style: CLIPTextConfig kwargs plus "class"
    te_prefixes: list[str] = field(default_factory=list)
    vae_prefix: str = VAE_PREFIX

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    def te_is_openclip(self, index: int) -> bool:
        return self.family == "sd2" or (self.family == "sdxl" and index == 1)


# ----------------------------------------------------------------------------------------------------------------
# Family and size inference


def detect_family(keys: Sequence[str] | Mapping[str, Any], source: str = "<checkpoint>") -> str:
    """sd1 / sd2 / sdxl from the key names of a single-file checkpoint; CheckpointError if it is none of them."""
    keys = list(keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if not has(UNET_PREFIX):
        hint = ""
        if any(k.startswith(("lora_", "lora_unet", "lora_te")) for k in keys):
            hint = " (it looks like a LoRA file, not a model)"
        elif has("encoder.") and has("decoder."):
            hint = " (it looks like a VAE alone; pass it with --vae)"
        sample = ", ".join(keys[:3])
        raise CheckpointError(f"{source}: not a Stable Diffusion checkpoint{hint}: no {UNET_PREFIX}* keys "
                              f"(first keys: {sample}); expected an SD 1.x, SD 2.x or SDXL single file")
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise CheckpointError(f"{source}: looks like an SDXL refiner (OpenCLIP bigG only); only SD 1.x, SD 2.x and "
                              f"SDXL base layouts are supported")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise CheckpointError(f"{source}: unknown architecture: found {UNET_PREFIX}* but no text encoder "
                          f"(cond_stage_model.transformer.* for SD 1.x, cond_stage_model.model.* for SD 2.x, "
                          f"conditioner.embedders.* for SDXL)")


def _indices(shapes: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct integers N of keys `prefix + N + '.'...`."""
    found = set()
    n = len(prefix)
    for k in shapes:
        if k.startswith(prefix):
            head = k[n:].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return sorted(found)


def _shape(shapes: Mapping[str, Any], key: str, source: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"{source}: missing tensor {key}")
    return tuple(shapes[key])


def is_test_size(width: int) -> bool:
    """True for the project's tiny test models (first UNet / VAE width under 64)."""
    return width < 64


def norm_groups(width: int) -> int:
    return min(32, width // 2)


def unet_config_from_shapes(shapes: Mapping[str, Any], family: str, te2_projection: int | None = None,
                            v_parameterization: bool = False, source: str = "<checkpoint>",
                            prefix: str = UNET_PREFIX) -> dict[str, Any]:
    """The diffusers UNet2DConditionModel config of a single-file UNet, from its tensor shapes."""
    P = prefix
    inputs = _indices(shapes, P + "input_blocks.")
    downs = [n for n in inputs if P + f"input_blocks.{n}.0.op.weight" in shapes]
    n_levels = len(downs) + 1
    layers = (len(inputs) - 1 - len(downs)) // n_levels
    if layers < 1 or len(inputs) != 1 + n_levels * layers + len(downs):
        raise CheckpointError(f"{source}: unexpected UNet block structure ({len(inputs)} input blocks)")
    channels, down_types, depths = [], [], []
    for i in range(n_levels):
        first = 1 + i * (layers + 1)
        channels.append(_shape(shapes, P + f"input_blocks.{first}.0.out_layers.3.weight", source)[0])
        attn = P + f"input_blocks.{first}.1.proj_in.weight" in shapes
        down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
        depths.append(len(_indices(shapes, P + f"input_blocks.{first}.1.transformer_blocks.")) if attn else 1)
    up_types = []
    for i in range(n_levels):
        attn = P + f"output_blocks.{i * (layers + 1)}.1.proj_in.weight" in shapes
        up_types.append("CrossAttnUpBlock2D" if attn else "UpBlock2D")
    proj_in = next(k for k in shapes if k.startswith(P) and k.endswith(".proj_in.weight"))
    linear = len(shapes[proj_in]) == 2
    cross_dim = _shape(shapes, next(k for k in shapes if k.startswith(P) and k.endswith("attn2.to_k.weight")), source)[1]
    width = channels[0]
    tiny = is_test_size(width)
    if family == "sd1":
        heads: Any = min(8, width // 8)
    else:
        head_dim = min(64, width // 2)
        heads = [c // head_dim for c in channels]
    cfg: dict[str, Any] = {
        "sample_size": 8 if tiny else {"sd1": 64, "sd2": 96 if v_parameterization else 64, "sdxl": 128}[family],
        "in_channels": _shape(shapes, P + "input_blocks.0.0.weight", source)[1],
        "out_channels": _shape(shapes, P + "out.2.weight", source)[0],
        "down_block_types": down_types,
        "up_block_types": up_types,
        "block_out_channels": channels,
        "layers_per_block": layers,
        "norm_num_groups": norm_groups(width),
        "cross_attention_dim": cross_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
    }
    if family == "sd2":
        cfg["upcast_attention"] = not tiny
    if any(d != 1 for d in depths) or family == "sdxl":
        cfg["transformer_layers_per_block"] = depths
    if P + "label_emb.0.0.weight" in shapes:
        in_dim = _shape(shapes, P + "label_emb.0.0.weight", source)[1]
        proj = te2_projection if te2_projection is not None else (1280 if (in_dim - 1280) % 6 == 0 else 0)
        cfg.update(addition_embed_type="text_time", addition_time_embed_dim=(in_dim - proj) // 6,
                   projection_class_embeddings_input_dim=in_dim)
    return cfg


def vae_config_from_shapes(shapes: Mapping[str, Any], family: str, prefix: str = VAE_PREFIX,
                           v_parameterization: bool = False, source: str = "<checkpoint>") -> dict[str, Any]:
    """The diffusers AutoencoderKL config of an original-layout VAE, from its tensor shapes."""
    P = prefix
    levels = _indices(shapes, P + "encoder.down.")
    if not levels:
        raise CheckpointError(f"{source}: no VAE tensors ({P}encoder.down.*)")
    channels = [_shape(shapes, P + f"encoder.down.{i}.block.0.conv1.weight", source)[0] for i in levels]
    width = channels[0]
    sample = 64 if is_test_size(width) else (1024 if family == "sdxl" else 768 if v_parameterization else 512)
    return {
        "in_channels": _shape(shapes, P + "encoder.conv_in.weight", source)[1],
        "out_channels": _shape(shapes, P + "decoder.conv_out.weight", source)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": len(_indices(shapes, P + "encoder.down.0.block.")),
        "latent_channels": _shape(shapes, P + "decoder.conv_in.weight", source)[1],
        "norm_num_groups": norm_groups(width),
        "sample_size": sample,
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
    }


def _te_config(hidden: int, vocab: int, positions: int, layers: int, inter: int, openclip: bool,
               projection: int, cls: str) -> dict[str, Any]:
    from library.sd_configs import CLIP_BOS_ID, CLIP_EOS_ID

    return {
        "class": cls, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": hidden // 64 if hidden >= 128 else 2,
        "max_position_embeddings": positions, "hidden_act": "gelu" if openclip else "quick_gelu",
        "projection_dim": projection, "bos_token_id": CLIP_BOS_ID, "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": 1, "layer_norm_eps": 1e-5,
    }


def text_encoder_config_from_shapes(shapes: Mapping[str, Any], prefix: str, openclip: bool, with_projection: bool,
                                    drop_last_layer: bool, source: str = "<checkpoint>") -> dict[str, Any]:
    """The CLIPTextConfig kwargs (plus "class") of one text encoder in CLIP or OpenCLIP layout."""
    P = prefix
    cls = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
    if openclip:
        vocab, hidden = _shape(shapes, P + "token_embedding.weight", source)
        layers = len(_indices(shapes, P + "transformer.resblocks."))
        inter = _shape(shapes, P + "transformer.resblocks.0.mlp.c_fc.weight", source)[0]
        positions = _shape(shapes, P + "positional_embedding", source)[0]
        proj = tuple(shapes[P + "text_projection"])[1] if P + "text_projection" in shapes else hidden
        return _te_config(hidden, vocab, positions, layers - (1 if drop_last_layer else 0), inter, True, proj, cls)
    vocab, hidden = _shape(shapes, P + "embeddings.token_embedding.weight", source)
    layers = len(_indices(shapes, P + "encoder.layers."))
    inter = _shape(shapes, P + "encoder.layers.0.mlp.fc1.weight", source)[0]
    positions = _shape(shapes, P + "embeddings.position_embedding.weight", source)[0]
    return _te_config(hidden, vocab, positions, layers, inter, False, hidden, cls)


def _actual_te_prefix(shapes: Mapping[str, Any], canonical: str) -> str:
    """SD1 files from old transformers lack `text_model.` (`cond_stage_model.transformer.embeddings...`)."""
    if canonical.endswith("transformer.text_model."):
        short = canonical[: -len("text_model.")]
        if not any(k.startswith(canonical) for k in shapes) and any(k.startswith(short + "embeddings.") for k in shapes):
            return short
    return canonical


def infer_layout(shapes: Mapping[str, Sequence[int]], source: str = "<checkpoint>",
                 v_parameterization: bool = False, family: str | None = None) -> LdmLayout:
    """Family and diffusers configs of a single-file checkpoint, from {key: shape} (no tensor data needed)."""
    family = family or detect_family(shapes, source)
    prefixes = [_actual_te_prefix(shapes, p) for p in TE_PREFIXES[family]]
    tes = []
    for i, prefix in enumerate(prefixes):
        openclip = family == "sd2" or i == 1
        tes.append(text_encoder_config_from_shapes(shapes, prefix, openclip, with_projection=family == "sdxl" and i == 1,
                                                   drop_last_layer=family == "sd2", source=source))
    te2_proj = tes[1]["projection_dim"] if family == "sdxl" else None
    unet = unet_config_from_shapes(shapes, family, te2_proj, v_parameterization, source)
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    vae = vae_config_from_shapes(shapes, family, VAE_PREFIX, v_parameterization, source) if has_vae else {}
    return LdmLayout(family, unet, vae, tes, prefixes)


def layout_from_models(family: str, unet, vae, text_encoders: Sequence[Any]) -> LdmLayout:
    """The layout that saving these models writes (canonical prefixes)."""
    tes = [{**te.config.to_dict(), "class": type(te).__name__} for te in text_encoders]
    return LdmLayout(family, dict(unet.config), dict(vae.config) if vae is not None else {}, tes,
                     list(TE_PREFIXES[family]))


# ----------------------------------------------------------------------------------------------------------------
# Key mapping: one diffusers parameter -> its place in the file


def _rename_prefix(name: str, table: Mapping[str, str]) -> str:
    for d, o in table.items():
        if name == d or name.startswith(d + "."):
            return o + name[len(d):]
    return name


def _vae_ldm_name(name: str, n_levels: int) -> tuple[str, str]:
    """(original name, kind) of a diffusers AutoencoderKL parameter."""
    m = re.match(r"(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", name)
    if m:
        side, blocks, i, sub, j, rest = m.groups()
        level = int(i) if blocks == "down_blocks" else n_levels - 1 - int(i)
        group = "down" if blocks == "down_blocks" else "up"
        if sub == "resnets":
            return f"{side}.{group}.{level}.block.{j}.{_rename_prefix(rest, _VAE_RESNET)}", ""
        return f"{side}.{group}.{level}.{'downsample' if sub == 'downsamplers' else 'upsample'}.{rest}", ""
    m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", name)
    if m:
        side, sub, j, rest = m.groups()
        if sub == "resnets":
            return f"{side}.mid.block_{int(j) + 1}.{_rename_prefix(rest, _VAE_RESNET)}", ""
        renamed = _rename_prefix(rest, _VAE_ATTN)
        kind = "conv1x1" if renamed.endswith("weight") and not renamed.startswith("norm") else ""
        return f"{side}.mid.attn_1.{renamed}", kind
    m = re.match(r"(encoder|decoder)\.(.*)", name)
    if m:
        return f"{m.group(1)}.{_rename_prefix(m.group(2), _VAE_TOP)}", ""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name, ""
    raise KeyError(f"{name!r} is not a parameter of AutoencoderKL")


def _openclip_param(name: str, prefix: str, hidden: int) -> LdmParam:
    if name in _OPENCLIP_TOP:
        return LdmParam(prefix + _OPENCLIP_TOP[name])
    if name == "text_projection.weight":
        return LdmParam(prefix + "text_projection", kind="transpose")
    m = re.match(r"encoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        raise KeyError(f"{name!r} is not a parameter of an OpenCLIP text encoder")
    i, rest = m.groups()
    base = f"{prefix}transformer.resblocks.{i}."
    qkv = re.match(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
    if qkv:
        part = "qkv".index(qkv.group(1))
        return LdmParam(base + f"attn.in_proj_{qkv.group(2)}", rows=slice(part * hidden, (part + 1) * hidden))
    renamed = _rename_prefix(rest, _OPENCLIP_LAYER)
    if renamed == rest:
        raise KeyError(f"{name!r} is not a parameter of an OpenCLIP text encoder")
    return LdmParam(base + renamed)


def ldm_param_for(component: str, diffusers_name: str, layout: LdmLayout) -> LdmParam:
    """Where the diffusers parameter `diffusers_name` of `component` lives in a single file of `layout`.

    `component` is unet, vae, text_encoder or text_encoder_2; text-encoder names may carry transformers'
    `text_model.` prefix or not. Raises KeyError for a name that is not part of the component.
    """
    if component == "unet":
        return LdmParam(UNET_PREFIX + diffusers_to_ldm_module(diffusers_name, layout.unet_config))
    if component == "vae":
        name, kind = _vae_ldm_name(diffusers_name, len(layout.vae_config["block_out_channels"]))
        return LdmParam(layout.vae_prefix + name, kind=kind)
    if component not in TE_COMPONENTS:
        raise KeyError(f"unknown component {component!r}; expected unet, vae, text_encoder, text_encoder_2")
    index = TE_COMPONENTS.index(component)
    if index >= len(layout.te_prefixes):
        raise KeyError(f"{layout.family} has no {component}")
    name = diffusers_name[len("text_model."):] if diffusers_name.startswith("text_model.") else diffusers_name
    prefix = layout.te_prefixes[index]
    if layout.te_is_openclip(index):
        return _openclip_param(name, prefix, layout.text_encoder_configs[index]["hidden_size"])
    if name == "text_projection.weight":
        raise KeyError(f"{name!r}: CLIP ViT-L has no text projection in the file")
    return LdmParam(prefix + name)


# ----------------------------------------------------------------------------------------------------------------
# Conversions


def ldm_to_diffusers(component: str, names: Sequence[str], get: Callable[[str], torch.Tensor], layout: LdmLayout,
                     dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                     source: str = "<checkpoint>") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (diffusers name, tensor) for `names`, reading file tensors through `get(key)` one at a time.

    A fused q/k/v tensor is read once for its three parts. Tensors are cast to `dtype` and moved to `device`.
    """
    cache: dict[str, torch.Tensor] = {}  # the fused in_proj weight and bias of the current layer
    for name in names:
        p = ldm_param_for(component, name, layout)
        if p.key not in cache:
            try:
                tensor = get(p.key)
            except KeyError:
                raise CheckpointError(f"{source}: missing tensor {p.key} (for {component} {name})") from None
            if p.rows is None:
                cache.clear()
            elif len(cache) >= 2:
                cache.pop(next(iter(cache)))
            cache[p.key] = tensor
        t = p.from_ldm(cache[p.key])
        if p.rows is None:
            cache.pop(p.key)
        out_dtype = dtype if dtype is not None and t.is_floating_point() else t.dtype
        converted = t.to(device=device, dtype=out_dtype)
        if p.rows is not None and converted.data_ptr() == t.data_ptr():
            converted = converted.clone()  # q/k/v must not share the fused tensor's storage
        yield name, converted.contiguous()


def extra_ldm_keys(layout: LdmLayout, index: int, keys: Sequence[str]) -> list[str]:
    """File-only tensors of text encoder `index` (OpenCLIP's unused last layer / projection / logit scale)."""
    if not layout.te_is_openclip(index):
        return []
    prefix = layout.te_prefixes[index]
    wanted = [prefix + "logit_scale"]
    if layout.family == "sd2":
        last = layout.text_encoder_configs[index]["num_hidden_layers"]
        wanted.append(prefix + "text_projection")
        wanted.extend(k for k in keys if k.startswith(f"{prefix}transformer.resblocks.{last}."))
    return [k for k in wanted if k in keys]


def text_encoder_to_ldm(index: int, state_dict: Mapping[str, torch.Tensor], layout: LdmLayout,
                        extras: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """File tensors of text encoder `index`: mapped parameters, fused q/k/v, position ids and file-only tensors.

    `extras` holds file-only tensors keyed by their name after the prefix (as kept in `EXTRA_ATTR`); missing
    ones follow the convention in the module docstring.
    """
    component = TE_COMPONENTS[index]
    cfg = layout.text_encoder_configs[index]
    prefix = layout.te_prefixes[index]
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, list[tuple[slice, torch.Tensor]]] = {}
    for name, tensor in state_dict.items():
        if name.endswith("position_ids"):
            continue
        p = ldm_param_for(component, name, layout)
        if p.rows is not None:
            fused.setdefault(p.key, []).append((p.rows, tensor))
        else:
            out[p.key] = p.to_ldm(tensor)
    for key, parts in fused.items():
        out[key] = torch.cat([t for _, t in sorted(parts, key=lambda x: x[0].start)], dim=0)
    if not layout.te_is_openclip(index):
        out[prefix + "embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"], dtype=torch.int64)[None]
        return out
    out.update(_openclip_extras(layout, index, out, extras or {}))
    return out


def _openclip_extras(layout: LdmLayout, index: int, mapped: Mapping[str, torch.Tensor],
                     extras: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = layout.te_prefixes[index]
    cfg = layout.text_encoder_configs[index]
    hidden = cfg["hidden_size"]
    ref = mapped[prefix + "ln_final.weight"]
    made: dict[str, torch.Tensor] = {"logit_scale": torch.tensor(LOGIT_SCALE_DEFAULT, dtype=ref.dtype)}
    if layout.family == "sd2":
        last = cfg["num_hidden_layers"]
        before = f"{prefix}transformer.resblocks.{last - 1}."
        for key, tensor in mapped.items():
            if key.startswith(before):
                made[f"transformer.resblocks.{last}." + key[len(before):]] = tensor.clone()
        made["text_projection"] = torch.eye(hidden, dtype=ref.dtype)
    out = {}
    for name, default in made.items():
        kept = extras.get(name)
        use = kept if kept is not None and tuple(kept.shape) == tuple(default.shape) else default
        out[prefix + name] = use
    return out


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], layout: LdmLayout) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        p = ldm_param_for("vae", name, layout)
        out[p.key] = p.to_ldm(tensor)
    return out


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], layout: LdmLayout) -> dict[str, torch.Tensor]:
    return {ldm_param_for("unet", n, layout).key: t for n, t in state_dict.items()}


def models_to_ldm(family: str, unet, vae, text_encoders: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The single-file state dict of these models (views of their parameters where shapes allow)."""
    layout = layout_from_models(family, unet, vae, text_encoders)
    out = unet_to_ldm(unet.state_dict(), layout)
    if vae is not None:
        out.update(vae_to_ldm(vae.state_dict(), layout))
    for i, te in enumerate(text_encoders):
        out.update(text_encoder_to_ldm(i, te.state_dict(), layout, getattr(te, EXTRA_ATTR, None)))
    return out


def ldm_state_dict_to_diffusers(state_dict: Mapping[str, torch.Tensor], layout: LdmLayout | None = None,
                                source: str = "<checkpoint>") -> dict[str, dict[str, torch.Tensor]]:
    """Convert a whole in-memory single-file state dict: {component: diffusers state dict} (for tests / tools).

    The diffusers names come from models built on the meta device from the inferred layout.
    """
    from library.model_loading import empty_models_for_layout

    layout = layout or infer_layout({k: v.shape for k, v in state_dict.items()}, source)
    models = empty_models_for_layout(layout, with_vae=bool(layout.vae_config))
    return {comp: dict(ldm_to_diffusers(comp, list(m.state_dict().keys()), state_dict.__getitem__, layout, source=source))
            for comp, m in models.items()}
