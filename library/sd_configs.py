"""Architecture configurations of SD 1.x, SD 2.x and SDXL, at the real size and as tiny test models.

One table per family gives the diffusers / transformers configs. `tiny` keeps the real key layout, block
structure and module names (every code path is exercised) with small widths and depths; `full` is the real
size (for benchmarks and for inferring nothing: loaders infer sizes from checkpoints themselves).
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("sd1", "sd2", "sd2-v", "sdxl")
SIZES = ("tiny", "full")

# Token ids of the real CLIP vocabulary; the small tokenizer below keeps them at the same ids.
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_VOCAB_SIZE = 49408


@dataclass
class ArchConfig:
    """Everything needed to build one architecture's components from scratch."""

    arch: str  # "sd1" | "sd2" | "sdxl" (family); see `v_parameterization` for sd2-v
    size: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: list[dict[str, Any]]  # CLIPTextConfig kwargs; "class" says which model class
    tokenizer_kinds: list[str]  # "clip" (pad with <|endoftext|>) or "openclip" (pad with "!")
    v_parameterization: bool = False
    resolution: int = 512
    scheduler: dict[str, Any] = field(default_factory=dict)

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"


_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _clip_te(size: str, hidden: int, layers: int, heads: int, inter: int, act: str, proj: int,
             cls: str = "CLIPTextModel") -> dict[str, Any]:
    return {
        "class": cls,
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": proj,
        "bos_token_id": CLIP_BOS_ID,
        "eos_token_id": CLIP_EOS_ID,
        "pad_token_id": 1,
        "layer_norm_eps": 1e-5,
    }


def _vae(size: str, sdxl: bool) -> dict[str, Any]:
    channels = [128, 256, 512, 512] if size == "full" else [8, 16, 16, 16]
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": channels,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32 if size == "full" else 4,
        "sample_size": (1024 if sdxl else 512) if size == "full" else 64,
        "scaling_factor": 0.13025 if sdxl else 0.18215,
    }


def _sd_unet(size: str, v2: bool) -> dict[str, Any]:
    full = size == "full"
    return {
        "sample_size": (96 if v2 else 64) if full else 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280] if full else [16, 32, 32, 32],
        "layers_per_block": 2,
        "norm_num_groups": 32 if full else 8,
        "cross_attention_dim": (1024 if v2 else 768) if full else (40 if v2 else 32),
        "attention_head_dim": ([5, 10, 20, 20] if full else [2, 4, 4, 4]) if v2 else (8 if full else 2),
        "use_linear_projection": v2,
        "upcast_attention": v2 and full,
    }


def _sdxl_unet(size: str) -> dict[str, Any]:
    full = size == "full"
    te2_proj = 1280 if full else 24
    time_dim = 256 if full else 8
    return {
        "sample_size": 128 if full else 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [320, 640, 1280] if full else [16, 32, 32],
        "layers_per_block": 2,
        "norm_num_groups": 32 if full else 8,
        "transformer_layers_per_block": [1, 2, 10] if full else [1, 1, 2],
        "attention_head_dim": [5, 10, 20] if full else [2, 4, 4],
        "cross_attention_dim": 2048 if full else 32 + 40,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": time_dim,
        "projection_class_embeddings_input_dim": 6 * time_dim + te2_proj,
    }


def arch_config(arch: str, size: str = "tiny") -> ArchConfig:
    """Return the configuration of `arch` (sd1, sd2, sd2-v, sdxl) at `size` (tiny, full)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {', '.join(SIZES)}")
    full = size == "full"
    if arch == "sd1":
        te = _clip_te(size, 768, 12, 12, 3072, "quick_gelu", 768) if full else _clip_te(size, 32, 2, 2, 64, "quick_gelu", 32)
        return ArchConfig("sd1", size, _sd_unet(size, False), _vae(size, False), [te], ["clip"],
                          resolution=512, scheduler=dict(_SCHEDULER))
    if arch in ("sd2", "sd2-v"):
        # SD2's text encoder is OpenCLIP ViT-H with its last layer dropped (the penultimate layer is used).
        te = _clip_te(size, 1024, 23, 16, 4096, "gelu", 512) if full else _clip_te(size, 40, 3, 2, 80, "gelu", 40)
        v = arch == "sd2-v"
        sched = dict(_SCHEDULER, prediction_type="v_prediction" if v else "epsilon")
        return ArchConfig("sd2", size, _sd_unet(size, True), _vae(size, False), [te], ["openclip"],
                          v_parameterization=v, resolution=768 if v else 512, scheduler=sched)
    te1 = _clip_te(size, 768, 12, 12, 3072, "quick_gelu", 768) if full else _clip_te(size, 32, 2, 2, 64, "quick_gelu", 32)
    te2 = (_clip_te(size, 1280, 32, 20, 5120, "gelu", 1280, "CLIPTextModelWithProjection") if full
           else _clip_te(size, 40, 3, 2, 80, "gelu", 24, "CLIPTextModelWithProjection"))
    return ArchConfig("sdxl", size, _sdxl_unet(size), _vae(size, True), [te1, te2], ["clip", "openclip"],
                      resolution=1024, scheduler=dict(_SCHEDULER))


@dataclass
class ModelComponents:
    """The models of one Stable Diffusion checkpoint, as diffusers / transformers objects."""

    arch: str  # "sd1" | "sd2" | "sdxl"
    unet: Any
    vae: Any
    text_encoders: list[Any]
    tokenizers: list[Any]
    v_parameterization: bool = False
    scheduler_config: dict[str, Any] = field(default_factory=lambda: dict(_SCHEDULER))
    load_unet: Any = None  # set while the U-Net's weights are still to be read (model_loading's defer_unet)

    @property
    def is_sdxl(self) -> bool:
        return self.arch == "sdxl"

    @property
    def text_encoder(self) -> Any:
        """The single text encoder of SD1/SD2, the list [te1, te2] of SDXL (as create_network expects)."""
        return self.text_encoders if self.is_sdxl else self.text_encoders[0]


def text_encoder_config(te: dict[str, Any]):
    from transformers import CLIPTextConfig

    kwargs = {k: v for k, v in te.items() if k != "class"}
    return CLIPTextConfig(**kwargs)


def build_text_encoder(te: dict[str, Any]):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if te["class"] == "CLIPTextModelWithProjection" else CLIPTextModel
    return cls(text_encoder_config(te))


def build_models(arch: str, size: str = "tiny", seed: int = 0, meta: bool = False,
                 tokenizers: bool = True) -> ModelComponents:
    """Build random-weight models with the real architecture (deterministic for a seed).

    `meta=True` builds on the meta device: key names and shapes without memory.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = arch_config(arch, size)
    device = torch.device("meta") if meta else None
    torch.manual_seed(seed)
    with torch.device(device) if device is not None else _nullcontext():
        unet = UNet2DConditionModel(**copy.deepcopy(cfg.unet))
        vae = AutoencoderKL(**copy.deepcopy(cfg.vae))
        tes = [build_text_encoder(te) for te in cfg.text_encoders]
    toks = [make_clip_tokenizer(kind) for kind in cfg.tokenizer_kinds] if tokenizers else []
    sched = dict(cfg.scheduler)
    return ModelComponents(cfg.arch, unet.eval(), vae.eval(), [t.eval() for t in tes], toks,
                           v_parameterization=cfg.v_parameterization, scheduler_config=sched)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE uses, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(save_dir: str, kind: str = "clip") -> str:
    """Write a small but valid CLIP BPE tokenizer (vocab.json, merges.txt, configs) into `save_dir`.

    Single characters get the ids of the real CLIP vocabulary (`a</w>` = 320) and `<|startoftext|>` /
    `<|endoftext|>` keep 49406 / 49407 (the ids between are unused placeholders), so token counts and the
    special ids match the real tokenizer; there are no merges, so every character is one token.
    `kind="openclip"` pads with "!" (id 0) as SD2 and SDXL's second encoder do.
    """
    os.makedirs(save_dir, exist_ok=True)
    symbols = _bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    for i in range(512, CLIP_BOS_ID):
        vocab[f"<|unused{i}|>"] = i
    vocab["<|startoftext|>"] = CLIP_BOS_ID
    vocab["<|endoftext|>"] = CLIP_EOS_ID
    with open(os.path.join(save_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(save_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    pad = "!" if kind == "openclip" else "<|endoftext|>"
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad,
        "do_lower_case": True,
    }
    with open(os.path.join(save_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(save_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=2)
    return save_dir


def make_clip_tokenizer(kind: str = "clip"):
    """Return the small CLIP tokenizer of `write_clip_tokenizer_files` as a `CLIPTokenizer`."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer_files(tmp, kind))
    tok.model_max_length = 77
    return tok
