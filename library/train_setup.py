"""Model and network setup for the trainer: precisions, loading, attention, the network from --network_*.

Split from `library.network_trainer` (which uses all of it); `bench/bench_train.py` uses the model helpers.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import logging
from typing import Any

import torch

logger = logging.getLogger("library.network_trainer")


def weight_dtypes(args: argparse.Namespace, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(frozen model dtype, network dtype). Frozen weights follow the mixed precision, on every device (fp16
    autocast and its grad scaler run on CPUs too: library.precision)."""
    mixed = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    network = mixed if (args.full_fp16 or args.full_bf16) else torch.float32
    return mixed, network


def load_components(args: argparse.Namespace, sdxl: bool, dtype: torch.dtype, defer_unet: bool = False) -> Any:
    from library.model_loading import load_models

    return load_models(args.pretrained_model_name_or_path, v2=args.v2, sdxl=sdxl,
                       v_parameterization=args.v_parameterization, vae=args.vae,
                       tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=dtype, defer_unet=defer_unet)


def set_attention(unet: torch.nn.Module, args: argparse.Namespace) -> None:
    if args.xformers:
        unet.enable_xformers_memory_efficient_attention()
    elif getattr(args, "mem_eff_attn", False):  # plain-PyTorch chunked attention (library.attention), any device
        from library.attention import ChunkedAttnProcessor

        unet.set_attn_processor(ChunkedAttnProcessor())
    else:  # SDPA: diffusers' default processor
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


def parse_network_args(items: list[str] | None) -> dict[str, str]:
    """`--network_args "conv_dim=4" "down_lr_weight=0,0,1"` -> raw strings, as sd-scripts hands them over."""
    kwargs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--network_args {item!r}: expected key=value")
        kwargs[key.strip()] = value.strip()
    return kwargs


def create_network(args: argparse.Namespace, components: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Import --network_module, create (or load) the network and apply it; returns (network, module, kwargs)."""
    module = importlib.import_module(args.network_module)
    net_kwargs = parse_network_args(args.network_args)
    # Frozen text encoders get no LoRA modules at all (rather than created and dropped by apply_to), so the
    # network's random init does not depend on whether their outputs were cached.
    te = components.text_encoder if not args.network_train_unet_only else \
        ([None] * len(components.text_encoders) if components.is_sdxl else None)
    if args.network_weights and args.dim_from_weights:
        network, weights_sd = module.create_network_from_weights(1, args.network_weights, components.vae, te,
                                                                 components.unet, for_inference=False, **net_kwargs)
    else:
        if args.network_dropout is not None:
            net_kwargs["neuron_dropout"] = args.network_dropout
        network = module.create_network(1.0, args.network_dim, args.network_alpha, components.vae, te,
                                        components.unet, **net_kwargs)
    if network is None:
        raise ValueError(f"--network_module {args.network_module}: create_network returned nothing")
    from networks.loraplus import parse_ratios

    if parse_ratios(net_kwargs).enabled and not hasattr(network, "set_loraplus_lr_ratio"):
        raise ValueError(f"--network_args loraplus_*: --network_module {args.network_module} does not support LoRA+")
    train_unet = not args.network_train_text_encoder_only
    train_te = not args.network_train_unet_only
    network.apply_to(te, components.unet, train_te, train_unet)
    if args.network_weights and args.dim_from_weights:
        network.load_state_dict(weights_sd, strict=False)
    elif args.network_weights:
        network.load_weights(args.network_weights)
        logger.info("loaded network weights from %s", args.network_weights)
    return network, module, net_kwargs


def merge_base_weights(args: argparse.Namespace, components: Any) -> None:
    """--base_weights: merge these LoRA files into the model before training (with their multipliers)."""
    module = importlib.import_module(args.network_module)
    multipliers = args.base_weights_multiplier or []
    for i, path in enumerate(args.base_weights):
        mult = multipliers[i] if i < len(multipliers) else 1.0
        net, weights = module.create_network_from_weights(mult, path, components.vae, components.text_encoder,
                                                          components.unet, for_inference=True)
        net.merge_to(components.text_encoder, components.unet, weights)
        logger.info("merged base weights %s (multiplier %s)", path, mult)


def optimizer_groups(network: Any, args: argparse.Namespace) -> list[Any]:
    result = network.prepare_optimizer_params(args.text_encoder_lr, args.unet_lr, args.learning_rate)
    if isinstance(result, tuple):  # newer kohya API: (params, lr descriptions)
        result = result[0]
    return result


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise; RSS stays high)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move only what differs (diffusers warns about dtype casts even when they change nothing)."""
    param = next(model.parameters(), None)
    if param is None or param.dtype != dtype:
        model.to(device=device, dtype=dtype)
    elif param.device != device:
        model.to(device)
