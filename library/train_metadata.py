"""The `ss_*` training metadata that sd-scripts writes into a LoRA's safetensors header.

Web UIs and LoRA managers read these keys (ss_network_module, ss_network_dim, ss_tag_frequency, ...). The
values are strings, JSON for the structured ones, as sd-scripts writes them.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from typing import Any


def base_model_version(arch: str, v_parameterization: bool) -> str:
    if arch == "sdxl":
        return "sdxl_base_v1-0"
    if arch == "sd2":
        return "sd_v2_768_v" if v_parameterization else "sd_v2"
    return "sd_v1"


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _subset_dir(sub: Any) -> str:
    return os.path.basename(os.path.normpath(sub.image_dir or sub.metadata_file or ""))


def _tag_frequency(images: list[Any]) -> dict[str, int]:
    freq: dict[str, int] = {}
    for info in images:
        for tag in (info.caption or "").split(","):
            tag = tag.strip()
            if tag:
                freq[tag] = freq.get(tag, 0) + 1
    return freq


def dataset_metadata(group: Any) -> dict[str, Any]:
    """ss_* keys describing the data of a `library.datasets.DatasetGroup` (as sd-scripts writes them)."""
    meta: dict[str, Any] = {"ss_num_train_images": group.num_train_images, "ss_num_reg_images": group.num_reg_images}
    dirs: dict[str, Any] = {}
    reg_dirs: dict[str, Any] = {}
    tags: dict[str, Any] = {}
    datasets = []
    for ds in group.datasets:
        cfg = ds.config
        buckets = {str(i): {"resolution": list(reso), "count": len(ds.buckets[reso])}
                   for i, reso in enumerate(sorted(ds.buckets))}
        subsets = []
        for sub in cfg.subsets:
            used = [i for i in ds.images if i.subset is sub]
            name = _subset_dir(sub)
            (reg_dirs if sub.is_reg else dirs)[name] = {"n_repeats": sub.num_repeats, "img_count": len(used)}
            if not sub.is_reg:
                tags[name] = _tag_frequency(used)
            subsets.append({"image_dir": name, "img_count": len(used), "num_repeats": sub.num_repeats,
                            "is_reg": sub.is_reg, "class_tokens": sub.class_tokens, "keep_tokens": sub.keep_tokens,
                            "shuffle_caption": sub.shuffle_caption, "color_aug": sub.color_aug,
                            "flip_aug": sub.flip_aug, "random_crop": sub.random_crop,
                            "caption_dropout_rate": sub.caption_dropout_rate,
                            "caption_tag_dropout_rate": sub.caption_tag_dropout_rate})
        datasets.append({"is_dreambooth": not cfg.is_finetuning, "batch_size_per_device": cfg.batch_size,
                         "num_train_images": ds.num_train_images, "num_reg_images": ds.num_reg_images,
                         "resolution": list(cfg.resolution) if cfg.resolution else None,
                         "enable_bucket": cfg.enable_bucket, "min_bucket_reso": cfg.min_bucket_reso,
                         "max_bucket_reso": cfg.max_bucket_reso, "bucket_info": {"buckets": buckets},
                         "subsets": subsets})
    first = group.datasets[0].config if group.datasets else None
    if first is not None:
        sub = first.subsets[0]
        meta.update({
            "ss_batch_size_per_device": first.batch_size, "ss_enable_bucket": first.enable_bucket,
            "ss_min_bucket_reso": first.min_bucket_reso, "ss_max_bucket_reso": first.max_bucket_reso,
            "ss_bucket_no_upscale": first.bucket_no_upscale, "ss_keep_tokens": sub.keep_tokens,
            "ss_shuffle_caption": sub.shuffle_caption, "ss_color_aug": sub.color_aug, "ss_flip_aug": sub.flip_aug,
            "ss_random_crop": sub.random_crop, "ss_caption_dropout_rate": sub.caption_dropout_rate,
            "ss_caption_dropout_every_n_epochs": sub.caption_dropout_every_n_epochs,
            "ss_caption_tag_dropout_rate": sub.caption_tag_dropout_rate,
            "ss_bucket_info": _json(datasets[0]["bucket_info"]),
        })
        if first.resolution:
            meta["ss_resolution"] = str(tuple(first.resolution))
    meta.update({"ss_dataset_dirs": _json(dirs), "ss_reg_dataset_dirs": _json(reg_dirs),
                 "ss_tag_frequency": _json(tags), "ss_datasets": _json(datasets)})
    return meta


def training_metadata(args: argparse.Namespace, *, arch: str, v_parameterization: bool, dataset: Any,
                      num_batches_per_epoch: int, num_epochs: int, optimizer_text: str,
                      network_args: dict[str, Any], started_at: float,
                      max_train_steps: int | None = None, seed: int | None = None) -> dict[str, str]:
    """The metadata fixed at the start of training (steps and epoch are added at each save).
    `max_train_steps`: the run's length from its plan (`--max_train_epochs` converted), else the argument;
    `seed`: the run's seed when --seed was not given (drawn)."""
    meta: dict[str, Any] = {
        "ss_session_id": str(uuid.uuid4().int & (2**31 - 1)),
        "ss_training_started_at": started_at,
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": args.text_encoder_lr,
        "ss_unet_lr": args.unet_lr,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": args.gradient_checkpointing,
        "ss_gradient_accumulation_steps": args.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps if max_train_steps is not None else args.max_train_steps,
        "ss_lr_warmup_steps": args.lr_warmup_steps,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": args.network_dropout,
        "ss_network_args": _json(network_args) if network_args else None,
        "ss_mixed_precision": args.mixed_precision,
        "ss_full_fp16": bool(args.full_fp16),
        "ss_full_bf16": bool(args.full_bf16),
        "ss_v2": arch == "sd2",
        "ss_base_model_version": base_model_version(arch, v_parameterization),
        "ss_v_parameterization": v_parameterization,
        "ss_clip_skip": args.clip_skip,
        "ss_max_token_length": args.max_token_length,
        "ss_cache_latents": bool(getattr(args, "cache_latents", False)),
        "ss_seed": args.seed if seed is None else seed,
        "ss_lowram": args.lowram,
        "ss_noise_offset": args.noise_offset,
        "ss_adaptive_noise_scale": args.adaptive_noise_scale,
        "ss_multires_noise_iterations": args.multires_noise_iterations,
        "ss_multires_noise_discount": args.multires_noise_discount,
        "ss_ip_noise_gamma": args.ip_noise_gamma,
        "ss_zero_terminal_snr": args.zero_terminal_snr,
        "ss_min_snr_gamma": args.min_snr_gamma,
        "ss_scale_weight_norms": args.scale_weight_norms,
        "ss_debiased_estimation": bool(args.debiased_estimation_loss),
        "ss_prior_loss_weight": args.prior_loss_weight,
        "ss_min_timestep": args.min_timestep,
        "ss_max_timestep": args.max_timestep,
        "ss_training_comment": args.training_comment,
        "ss_optimizer": optimizer_text,
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_sd_model_name": os.path.basename(os.path.normpath(args.pretrained_model_name_or_path)),
        "ss_vae_name": os.path.basename(os.path.normpath(args.vae)) if args.vae else None,
        "ss_resolution": _resolution_text(getattr(args, "resolution", None)),
    }
    meta.update(dataset_metadata(dataset))
    from library.train_features import feature_metadata

    meta.update(feature_metadata(args, network_args))
    out = {k: str(v) for k, v in meta.items() if v is not None}
    out.update(model_spec(arch, v_parameterization, args.output_name or "", out.get("ss_resolution")))
    out.update(user_model_spec(args))
    return out


USER_SPEC_KEYS = ("title", "author", "description", "license", "tags")


def user_model_spec(args: argparse.Namespace) -> dict[str, str]:
    """`--metadata_title/author/description/license/tags` -> `modelspec.<key>` (as sd-scripts writes them)."""
    return {f"modelspec.{key}": str(value) for key in USER_SPEC_KEYS
            if (value := getattr(args, f"metadata_{key}", None)) not in (None, "")}


def _resolution_text(resolution: Any) -> str | None:
    if resolution is None:
        return None
    if isinstance(resolution, str):
        parts = [int(p) for p in resolution.split(",")]
    elif isinstance(resolution, (int, float)):
        parts = [int(resolution)]
    else:
        parts = [int(p) for p in resolution]
    return str(tuple(parts * 2 if len(parts) == 1 else parts))


# What sd-scripts keeps with --no_metadata: enough for a loader to rebuild the network.
MINIMUM_KEYS = ("ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
                "ss_network_args")


def minimum_metadata(meta: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in meta.items() if k in MINIMUM_KEYS}


def model_spec(arch: str, v_parameterization: bool, title: str, resolution: str | None) -> dict[str, str]:
    """The Stability AI model-spec keys (`modelspec.*`) that sd-scripts also writes."""
    architecture = {"sdxl": "stable-diffusion-xl-v1-base", "sd2": "stable-diffusion-v2-768-v" if v_parameterization
                    else "stable-diffusion-v2-512"}.get(arch, "stable-diffusion-v1")
    spec = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{architecture}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if arch == "sdxl"
            else "diffusers", "modelspec.title": title,
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()),
            "modelspec.prediction_type": "v" if v_parameterization else "epsilon"}
    if resolution:
        w, h = (int(x) for x in resolution.strip("()").split(","))
        spec["modelspec.resolution"] = f"{w}x{h}"
    return spec


def at_save(meta: dict[str, str], steps: int, epoch: int, minimal: bool = False) -> dict[str, str]:
    """The metadata of one saved file: everything (or, with --no_metadata, the minimum) plus progress."""
    if minimal:
        return minimum_metadata(meta) | {k: v for k, v in meta.items() if k.startswith("modelspec.")}
    return {**meta, "ss_steps": str(steps), "ss_epoch": str(epoch), "ss_training_finished_at": str(time.time())}
