"""Command-line options of the training scripts, `--config_file` / `--output_config`, and up-front validation.

The groups mirror sd-scripts (`train_util.add_*_arguments` and `train_network.setup_parser`) so the same
command lines and the same `args.toml` files work. A TOML config is read like sd-scripts: sections are
flattened into one namespace and the command line overrides it. Unlike sd-scripts, an unknown TOML key is an
error naming the key, and `validate_args` checks every flag combination and path before any model loads.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from library.sample_prompts import SAMPLERS as SAMPLER_NAMES

logger = logging.getLogger(__name__)

SAVE_MODEL_AS = ("ckpt", "pt", "safetensors")
_NOT_SERIALIZED = {"config_file", "output_config"}
_CAPTION_CHANGING = ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                     "caption_tag_dropout_rate", "token_warmup_step", "enable_wildcard")


def _add(group: argparse._ActionsContainer, *flags: str, **kwargs: Any) -> None:
    """Add an option unless another group (e.g. the dataset options) already defines it."""
    if any(f in group._option_string_actions for f in flags):
        return
    group.add_argument(*flags, **kwargs)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model", "the Stable Diffusion model to train on")
    _add(g, "--v2", action="store_true", help="the model is Stable Diffusion 2.x")
    _add(g, "--v_parameterization", action="store_true", help="v-prediction model (SD 2.x 768-v)")
    _add(g, "--pretrained_model_name_or_path", type=str, default=None,
         help=".ckpt / .safetensors file, Diffusers folder or model id")
    _add(g, "--tokenizer_cache_dir", type=str, default=None, help="folder to cache tokenizers in (offline use)")
    _add(g, "--vae", type=str, default=None, help="VAE checkpoint or Diffusers folder to use instead of the model's")
    _add(g, "--no_half_vae", action="store_true", help="keep the VAE in fp32 under mixed precision (SDXL)")


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network", "the LoRA network (kohya network modules)")
    _add(g, "--network_module", type=str, default=None, help="network module to train, e.g. networks.lora")
    _add(g, "--network_dim", type=int, default=None, help="rank of the network (default 4)")
    _add(g, "--network_alpha", type=float, default=1, help="alpha for LoRA weight scaling (default 1)")
    _add(g, "--network_dropout", type=float, default=None, help="dropout on the LoRA down output (0-1)")
    _add(g, "--network_args", type=str, default=None, nargs="*", help="extra key=value arguments of the network")
    _add(g, "--network_weights", type=str, default=None, help="LoRA weights to start from")
    _add(g, "--dim_from_weights", action="store_true", help="take the rank from --network_weights")
    _add(g, "--network_train_unet_only", action="store_true", help="train only the U-Net LoRA modules")
    _add(g, "--network_train_text_encoder_only", action="store_true",
         help="train only the text encoder LoRA modules")
    _add(g, "--unet_lr", type=float, default=None, help="learning rate of the U-Net modules")
    _add(g, "--text_encoder_lr", type=float, default=None, help="learning rate of the text encoder modules")
    _add(g, "--scale_weight_norms", type=float, default=None,
         help="scale LoRA weights down to this max norm after each step (1 is a good start)")
    _add(g, "--base_weights", type=str, default=None, nargs="*", help="LoRA files merged into the model first")
    _add(g, "--base_weights_multiplier", type=float, default=None, nargs="*", help="multipliers of --base_weights")
    _add(g, "--training_comment", type=str, default=None, help="comment stored in the metadata (ss_training_comment)")
    _add(g, "--no_metadata", action="store_true", help="write no ss_* metadata into the LoRA file")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training", "steps, precision, memory and noise")
    _add(g, "--output_dir", type=str, default=None, help="folder for the trained LoRA files")
    _add(g, "--output_name", type=str, default=None, help="file name of the LoRA, without extension")
    _add(g, "--save_model_as", type=str, default="safetensors", choices=SAVE_MODEL_AS,
         help="LoRA file format (default safetensors)")
    _add(g, "--max_train_steps", type=int, default=1600, help="training steps (default 1600)")
    _add(g, "--max_train_epochs", type=int, default=None, help="training epochs (overrides --max_train_steps)")
    _add(g, "--seed", type=int, default=None, help="random seed")
    _add(g, "--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="mixed precision")
    _add(g, "--full_fp16", action="store_true", help="fp16 weights and gradients (with --mixed_precision fp16)")
    _add(g, "--full_bf16", action="store_true", help="bf16 weights and gradients (with --mixed_precision bf16)")
    _add(g, "--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    _add(g, "--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    _add(g, "--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 for none (default 1)")
    _add(g, "--sdpa", action="store_true", help="PyTorch scaled dot product attention (the default)")
    _add(g, "--xformers", action="store_true", help="xformers attention (needs xformers with CUDA)")
    _add(g, "--mem_eff_attn", action="store_true",
         help="memory-efficient attention in plain PyTorch, any device (query chunks; slower than SDPA)")
    _add(g, "--clip_skip", type=int, default=None, help="use the output of the n-th last text encoder layer")
    _add(g, "--max_token_length", type=int, default=None, choices=[None, 150, 225],
         help="extend captions to 150 or 225 tokens (default 75)")
    _add(g, "--weighted_captions", action="store_true", help="A1111-style (word:1.2) weights in captions")
    _add(g, "--max_data_loader_n_workers", type=int, default=8, help="data loader processes (default min(8, cpus-1))")
    _add(g, "--persistent_data_loader_workers", action="store_true", help="keep loader processes between epochs")
    _add(g, "--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images")
    _add(g, "--noise_offset", type=float, default=None, help="noise offset (e.g. 0.1)")
    _add(g, "--noise_offset_random_strength", action="store_true", help="draw the offset in [0, noise_offset]")
    _add(g, "--adaptive_noise_scale", type=float, default=None,
         help="add this times |mean of latents| to the noise offset (with --noise_offset)")
    _add(g, "--multires_noise_iterations", type=int, default=None, help="multires (pyramid) noise iterations, 6-10")
    _add(g, "--multires_noise_discount", type=float, default=0.3, help="multires noise discount (default 0.3)")
    _add(g, "--ip_noise_gamma", type=float, default=None, help="input perturbation noise strength (e.g. 0.1)")
    _add(g, "--ip_noise_gamma_random_strength", action="store_true",
         help="draw the input perturbation strength in [0, ip_noise_gamma] per step")
    _add(g, "--min_snr_gamma", type=float, default=None, help="Min-SNR weighting gamma (paper: 5)")
    _add(g, "--scale_v_pred_loss_like_noise_pred", action="store_true",
         help="scale the v-prediction loss like the noise-prediction loss")
    _add(g, "--v_pred_like_loss", type=float, default=None, help="add a v-prediction-like loss with this weight")
    _add(g, "--debiased_estimation_loss", action="store_true", help="debiased estimation loss weighting")
    _add(g, "--zero_terminal_snr", action="store_true", help="rescale betas to zero terminal SNR")
    _add(g, "--min_timestep", type=int, default=None, help="lowest timestep sampled (default 0)")
    _add(g, "--max_timestep", type=int, default=None, help="timestep bound, exclusive (default 1000)")
    _add(g, "--lowram", action="store_true", help="accepted for compatibility (loading is already streamed)")
    _add(g, "--ddp_timeout", type=int, default=None,
         help="several processes: minutes a process waits for the others (default: torch's, 10 or 30)")
    _add(g, "--ddp_gradient_as_bucket_view", action="store_true",
         help="several processes: gradients are views into DDP's all-reduce buckets (less memory)")
    _add(g, "--ddp_static_graph", action="store_true",
         help="several processes: DDP may assume the same graph every step (not with DyLoRA or module_dropout)")


def add_optimizer_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimizer", "optimizer and learning-rate schedule")
    _add(g, "--optimizer_type", type=str, default="",
         help="AdamW (default), AdamW8bit, PagedAdamW8bit, Lion, Lion8bit, PagedLion8bit, SGDNesterov, "
              "SGDNesterov8bit, DAdaptation, DAdaptAdam, DAdaptAdaGrad, DAdaptAdan, DAdaptAdanIP, DAdaptLion, "
              "DAdaptSGD, Prodigy, AdaFactor, a torch.optim class name or module.Class")
    _add(g, "--use_8bit_adam", action="store_true", help="old name of --optimizer_type AdamW8bit")
    _add(g, "--use_lion_optimizer", action="store_true", help="old name of --optimizer_type Lion")
    _add(g, "--optimizer_args", type=str, default=None, nargs="*",
         help='optimizer arguments key=value, comma lists allowed: "weight_decay=0.01" "betas=.9,.999"')
    _add(g, "--learning_rate", type=float, default=2.0e-6, help="learning rate")
    _add(g, "--lr_scheduler", type=str, default="constant",
         help="linear, cosine, cosine_with_restarts, polynomial, constant (default), constant_with_warmup, "
              "adafactor, cosine_with_min_lr, warmup_stable_decay, inverse_sqrt, or module.Class")
    _add(g, "--lr_scheduler_type", type=str, default="", help="module.Class of a custom scheduler")
    _add(g, "--lr_scheduler_args", type=str, default=None, nargs="*", help="scheduler arguments key=value")
    _add(g, "--lr_warmup_steps", type=_int_or_float, default=0, help="warmup steps (a float < 1 is a ratio of all steps)")
    _add(g, "--lr_scheduler_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    _add(g, "--lr_scheduler_power", type=float, default=1, help="power of the polynomial scheduler")


def _int_or_float(text: str) -> int | float:
    from library.lr_schedulers import int_or_float

    return int_or_float(text)


def add_saving_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("saving", "intermediate saves, training state and resume")
    _add(g, "--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
         help="precision of the saved LoRA (default: as trained)")
    _add(g, "--save_every_n_epochs", type=int, default=None, help="save every n epochs")
    _add(g, "--save_every_n_steps", type=int, default=None, help="save every n steps")
    _add(g, "--save_n_epoch_ratio", type=int, default=None, help="save about this many times in the run")
    _add(g, "--save_last_n_epochs", type=int, default=None, help="keep only the last n epoch saves")
    _add(g, "--save_last_n_epochs_state", type=int, default=None, help="keep only the last n epoch states")
    _add(g, "--save_last_n_steps", type=int, default=None, help="keep only the saves of the last n steps")
    _add(g, "--save_last_n_steps_state", type=int, default=None, help="keep only the states of the last n steps")
    _add(g, "--save_state", action="store_true", help="also save the training state (<name>-000001-state/)")
    _add(g, "--save_state_on_train_end", action="store_true", help="save the state at the end of training")
    _add(g, "--resume", type=str, default=None, help="state folder to resume from")


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging", "TensorBoard / wandb logs")
    _add(g, "--logging_dir", type=str, default=None, help="TensorBoard log folder (a dated subfolder is made)")
    _add(g, "--log_with", type=str, default=None, choices=["tensorboard", "wandb", "all"], help="log backend")
    _add(g, "--log_prefix", type=str, default=None, help="prefix of the dated log folder")
    _add(g, "--log_tracker_name", type=str, default=None, help="tracker (project) name")
    _add(g, "--log_tracker_config", type=str, default=None, help="tracker config TOML")
    _add(g, "--wandb_api_key", type=str, default=None, help="wandb API key")
    _add(g, "--wandb_run_name", type=str, default=None, help="wandb run name")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling", "sample images during training")
    _add(g, "--sample_every_n_steps", type=int, default=None, help="sample every n steps")
    _add(g, "--sample_every_n_epochs", type=int, default=None, help="sample every n epochs (wins over steps)")
    _add(g, "--sample_at_first", action="store_true", help="sample before training")
    _add(g, "--sample_prompts", type=str, default=None, help="prompt file (.txt, .toml or .json)")
    _add(g, "--sample_sampler", type=str, default="ddim", choices=SAMPLER_NAMES, help="sampler (default ddim)")


_HUB_OPTIONS = ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface", "async_upload")


def add_huggingface_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("huggingface", "accepted for command-line compatibility; uploads are not supported")
    for name in _HUB_OPTIONS:
        if name in ("save_state_to_huggingface", "resume_from_huggingface", "async_upload"):
            _add(g, f"--{name}", action="store_true", help="not supported: an error (upload the files yourself)")
        else:
            _add(g, f"--{name}", type=str, default=None, help="not supported: an error (upload the files yourself)")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("config file")
    _add(g, "--config_file", type=str, default=None, help="read arguments from this TOML file (command line wins)")
    _add(g, "--output_config", action="store_true", help="write the arguments to --config_file and exit")


def add_te_cache_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("text encoder output caching",
                                  "SDXL's options, also accepted by train_network.py (needs --network_train_unet_only)")
    _add(g, "--cache_text_encoder_outputs", action="store_true", help="cache text encoder outputs in memory")
    _add(g, "--cache_text_encoder_outputs_to_disk", action="store_true", help="cache text encoder outputs on disk")


def add_all_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Every option group of train_network.py and sdxl_train_network.py (the dataset options are separate)."""
    add_model_arguments(parser)
    add_network_arguments(parser)
    add_training_arguments(parser)
    add_optimizer_arguments(parser)
    add_saving_arguments(parser)
    add_logging_arguments(parser)
    add_sampling_arguments(parser)
    add_config_arguments(parser)
    add_huggingface_arguments(parser)
    add_te_cache_arguments(parser)
    from library.train_features import add_feature_arguments

    add_feature_arguments(parser)
    from library.performance_args import add_performance_arguments

    add_performance_arguments(parser)
    add_release_compat_arguments(parser)


# ---------------------------------------------------------------- issue 19: options of sd-scripts' releases
# v0.7.1's modelspec metadata options and later releases' logging / scheduler options work as there; the options
# this project does not implement are recognised and refused with the reason (never "unrecognized arguments").

REFUSED_OPTIONS = {  # option: why it is refused (one line, with what to do instead)
    **{name: "DeepSpeed is not supported; use accelerate's multi-GPU data parallel (run `accelerate config`)"
       for name in ("deepspeed", "zero_stage", "offload_optimizer_device", "offload_optimizer_nvme_path",
                    "offload_param_device", "offload_param_nvme_path", "zero3_init_flag", "zero3_save_16bit_model",
                    "fp16_master_weights_and_gradients")},
    "highvram": "not needed: models are loaded once onto the training device and caches are freed as used",
    "dataset_class": "user dataset classes are not supported; describe the data with --dataset_config (a TOML of "
                     "folders, captions and repeats) or --in_json metadata (docs/dataset_config.md)",
    "initial_step": "not supported; --resume <state folder> continues at the saved step, epoch and lr",
    "initial_epoch": "not supported; --resume <state folder> continues at the saved step, epoch and lr",
    "skip_until_initial_step": "not supported; --resume <state folder> continues at the saved step and epoch",
    "resize_interpolation": "not supported; images are resized with OpenCV's area filter when shrinking and "
                            "Lanczos when enlarging (sd-scripts' default)",
    "skip_cache_check": "not supported; the latent cache check reads only each .npz header, and a stale cache is "
                        "recomputed rather than trusted",
}


def add_release_compat_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("metadata", "Stability AI model-spec keys written into the LoRA file")
    _add(g, "--metadata_title", type=str, default=None, help="modelspec.title (default: --output_name)")
    _add(g, "--metadata_author", type=str, default=None, help="modelspec.author")
    _add(g, "--metadata_description", type=str, default=None, help="modelspec.description")
    _add(g, "--metadata_license", type=str, default=None, help="modelspec.license")
    _add(g, "--metadata_tags", type=str, default=None, help="modelspec.tags (comma separated)")
    g = parser.add_argument_group("console", "what the console (and a log file) shows")
    _add(g, "--console_log_level", type=str.upper, default=None,
         choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="console log level (default INFO)")
    _add(g, "--console_log_file", type=str, default=None, help="also write the log to this file")
    _add(g, "--console_log_simple", action="store_true", help="plain log lines: the message only")
    _add(g, "--log_config", action="store_true", help="log the training arguments to the trackers (secrets masked)")
    g = parser.add_argument_group("scheduler extras", "options of the cosine_with_min_lr, warmup_stable_decay and "
                                  "inverse_sqrt schedulers")
    _add(g, "--lr_scheduler_min_lr_ratio", type=float, default=None,
         help="lowest lr as a ratio of --learning_rate (cosine_with_min_lr, warmup_stable_decay; default 0)")
    _add(g, "--lr_decay_steps", type=_int_or_float, default=0,
         help="decay steps of warmup_stable_decay (a float < 1 is a ratio of all steps)")
    _add(g, "--lr_scheduler_timescale", type=int, default=None,
         help="timescale of inverse_sqrt (default: the warmup steps)")
    g = parser.add_argument_group("not supported", "recognised for command-line compatibility; each stops with "
                                  "the reason")
    for name, why in REFUSED_OPTIONS.items():
        _add(g, f"--{name}", nargs="?", const=True, default=None, help=f"refused: {why}")


SECRETS = ("wandb_api_key", "huggingface_token")


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """--log_config: the arguments as tracker hyperparameters (lists as text, unset ones left out, secrets masked)."""
    config = {}
    for key, value in sorted(vars(args).items()):
        if value is None or key in _NOT_SERIALIZED:
            continue
        config[key] = "***" if key in SECRETS else value if isinstance(value, (bool, int, float, str)) else str(value)
    return config


def refused_option(args: argparse.Namespace) -> str | None:
    """The one-line refusal of the first refused option that is set (None when none is)."""
    for name, why in REFUSED_OPTIONS.items():
        if getattr(args, name, None) not in (None, False):
            return f"--{name}: {why}"
    return None


# ---------------------------------------------------------------- config files

def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; with `--config_file` read the TOML first (sections flattened, command line overrides).

    With `--output_config` the arguments are written to the config file (the `.toml` suffix added if missing)
    and the program exits.
    """
    from library.switch_flags import make_switchable  # `--save_state false` / `--no-save_state` (issue 19)

    from library.console_log import configure_console_log  # --console_log_* (issue 19)

    args = make_switchable(parser).parse_args(argv)
    if not args.config_file:
        if args.output_config:
            parser.error("--output_config needs --config_file (the file to write)")
        return configure_console_log(args)
    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if args.output_config:
        write_config(args, path)
        raise SystemExit(0)
    config = read_config(path, parser)
    return configure_console_log(parser.parse_args(argv, namespace=argparse.Namespace(**config)))


def read_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The flattened arguments of a TOML config; unknown keys are an error naming them."""
    import toml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config_file {path}: no such file")
    try:
        config = _flatten(toml.load(path))
    except toml.TomlDecodeError as e:
        raise ValueError(f"--config_file {path}: not valid TOML ({e})") from None
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"--config_file {path}: unknown option(s) {', '.join(unknown)}")
    logger.info("read arguments from %s", path)
    return config


def write_config(args: argparse.Namespace, path: str) -> None:
    """Write the non-default-None arguments to a TOML file (atomically)."""
    import toml

    from library.file_io import atomic_path

    values = {k: v for k, v in vars(args).items() if k not in _NOT_SERIALIZED and v is not None}
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            toml.dump(values, f)
    logger.info("wrote arguments to %s", path)


# ---------------------------------------------------------------- validation

def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _exists(path: str | None, flag: str) -> None:
    if path and not os.path.exists(path) and not _looks_like_hub_id(path):
        raise FileNotFoundError(f"{flag} {path}: no such file or folder")


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/")) and not Path(path).suffix


def attention_problem(args: argparse.Namespace) -> str | None:
    """Why --xformers / --mem_eff_attn cannot be used here (None when they can)."""
    import torch

    if args.xformers:
        if importlib.util.find_spec("xformers") is None:
            return "--xformers: xformers is not installed (pip install xformers); the default SDPA attention needs nothing"
        if not torch.cuda.is_available():
            return "--xformers: xformers attention needs a CUDA GPU; leave it out to use SDPA (the default)"
    return None


def validate_args(args: argparse.Namespace, sdxl: bool = False) -> None:
    """Check every flag combination and input path; raises ValueError / FileNotFoundError with one line."""
    from library import lr_schedulers, optimizers

    refusal = refused_option(args)
    if refusal:
        raise ValueError(refusal)
    for name in _HUB_OPTIONS:
        _need(not getattr(args, name, None), f"--{name}: uploading to / resuming from the Hugging Face hub is not "
              "supported; train locally and upload the files yourself")
    if getattr(args, "cache_latents_to_disk", False):  # as in sd-scripts: caching to disk is caching
        args.cache_latents = True
    _need(bool(args.pretrained_model_name_or_path), "--pretrained_model_name_or_path is required (model to train on)")
    _exists(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
    _exists(args.vae, "--vae")
    _exists(args.network_weights, "--network_weights")
    for path in args.base_weights or []:
        _exists(path, "--base_weights")
    _exists(args.sample_prompts, "--sample_prompts")
    if args.resume:
        _need(os.path.isdir(args.resume), f"--resume {args.resume}: not a state folder")
    _need(bool(args.network_module), "--network_module is required (e.g. networks.lora)")
    if importlib.util.find_spec(args.network_module.split(".")[0]) is None:
        raise ValueError(f"--network_module {args.network_module}: module not found")
    _need(not (args.network_train_unet_only and args.network_train_text_encoder_only),
          "--network_train_unet_only and --network_train_text_encoder_only exclude each other")
    _need(args.max_train_steps > 0 or (args.max_train_epochs or 0) > 0, "--max_train_steps must be > 0")
    _need(args.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1")
    _need(args.ddp_timeout is None or args.ddp_timeout > 0, "--ddp_timeout must be a number of minutes > 0")
    _need(args.clip_skip is None or args.clip_skip >= 1, "--clip_skip must be >= 1")
    if args.full_fp16:
        _need(args.mixed_precision == "fp16", "--full_fp16 needs --mixed_precision fp16")
    if args.full_bf16:
        _need(args.mixed_precision == "bf16", "--full_bf16 needs --mixed_precision bf16")
    _need(not (args.full_fp16 and args.full_bf16), "--full_fp16 and --full_bf16 exclude each other")
    if args.min_timestep is not None or args.max_timestep is not None:
        lo = args.min_timestep or 0
        hi = 1000 if args.max_timestep is None else args.max_timestep
        _need(0 <= lo < hi <= 1000, f"--min_timestep {lo} / --max_timestep {hi}: need 0 <= min < max <= 1000")
    _need(args.noise_offset is not None or args.adaptive_noise_scale is None,
          "--adaptive_noise_scale needs --noise_offset")
    _need(args.network_dropout is None or 0 <= args.network_dropout < 1, "--network_dropout must be in [0, 1)")
    _need(args.log_with not in ("tensorboard", "all") or bool(args.logging_dir),
          f"--log_with {args.log_with} needs --logging_dir (the folder of the TensorBoard logs)")
    if args.log_with in ("wandb", "all"):
        _need(importlib.util.find_spec("wandb") is not None,
              f"--log_with {args.log_with}: needs the pip package 'wandb' (pip install wandb)")
        if args.wandb_api_key:
            os.environ.setdefault("WANDB_API_KEY", args.wandb_api_key)
    _exists(args.log_tracker_config, "--log_tracker_config")
    _need(not args.base_weights_multiplier or len(args.base_weights_multiplier) <= len(args.base_weights or []),
          "--base_weights_multiplier: more multipliers than --base_weights files")
    from library.network_trainer import parse_network_args

    from networks.loraplus import parse_ratios

    parse_ratios(parse_network_args(args.network_args))  # LoRA+ ratios: positive numbers
    problem = attention_problem(args)
    if problem:
        raise ValueError(problem)
    optimizers.check_optimizer_available(optimizer_name(args))
    te_lr, unet_lr = args.text_encoder_lr or args.learning_rate, args.unet_lr or args.learning_rate
    part_lrs = {"--text_encoder_lr": None if args.network_train_unet_only else te_lr,
                "--unet_lr": None if args.network_train_text_encoder_only else unet_lr}
    optimizers.check_single_lr(optimizer_name(args), part_lrs)
    lr_schedulers.check_scheduler_name(args.lr_scheduler_type or args.lr_scheduler)
    if args.sample_prompts:
        _need(Path(args.sample_prompts).suffix.lower() in (".txt", ".toml", ".json"),
              f"--sample_prompts {args.sample_prompts}: expected a .txt, .toml or .json file")
    validate_te_cache_args(args)
    from library.train_features import validate_feature_args

    validate_feature_args(args)
    from library.performance_args import validate_performance_args

    validate_performance_args(args, sdxl, optimizer_name(args))
    if sdxl:
        _need(not args.weighted_captions, "--weighted_captions is not supported for SDXL (as in sd-scripts)")


def optimizer_name(args: argparse.Namespace) -> str:
    """The optimizer type, resolving the old --use_8bit_adam / --use_lion_optimizer flags."""
    if args.use_8bit_adam and args.use_lion_optimizer:
        raise ValueError("--use_8bit_adam and --use_lion_optimizer exclude each other; use --optimizer_type")
    if args.optimizer_type and (args.use_8bit_adam or args.use_lion_optimizer):
        raise ValueError("--optimizer_type cannot be combined with --use_8bit_adam / --use_lion_optimizer")
    if args.use_8bit_adam:
        return "AdamW8bit"
    if args.use_lion_optimizer:
        return "Lion"
    return args.optimizer_type or "AdamW"


def validate_te_cache_args(args: argparse.Namespace) -> None:
    """Text-encoder output caching is refused with caption changes, weighted captions or TE training."""
    if getattr(args, "cache_text_encoder_outputs_to_disk", False):
        args.cache_text_encoder_outputs = True
    if not getattr(args, "cache_text_encoder_outputs", False):
        return
    _need(args.network_train_unet_only,
          "--cache_text_encoder_outputs needs --network_train_unet_only (cached outputs cannot train the text encoders)")
    _need(not args.weighted_captions, "--cache_text_encoder_outputs cannot be used with --weighted_captions")
    for flag in _CAPTION_CHANGING:
        _need(not getattr(args, flag, None),
              f"--cache_text_encoder_outputs cannot be used with --{flag} (captions must not change)")


def check_captions_fixed(data_config: Any) -> None:
    """Text-encoder output caching needs captions that never change: refuse subsets that shuffle or drop."""
    for ds in data_config.datasets:
        for sub in ds.subsets:
            for flag in _CAPTION_CHANGING:
                _need(not getattr(sub, flag, None), f"{sub.where}: {flag} cannot be used with "
                      "--cache_text_encoder_outputs (captions must not change)")


