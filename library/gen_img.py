"""The command line of gen_img_diffusers.py (SD1.x/2.x) and sdxl_gen_img.py (SDXL): one implementation.

Text-to-image with any number of LoRA networks (applied with per-prompt multipliers, or merged), sd-scripts'
prompt options (`--n --w --h --d --l --nl --s --am` and SDXL's `--ow --oh --nw --nh --ct --cl`), A1111-weighted
and long prompts, PNGs with the generation settings in text chunks. The sampling itself is library.sampling.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.util
import logging
import random
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from library import sampling as S
from library import gen_img_stages as stages
from library.image_output import png_metadata, save_png

logger = logging.getLogger(__name__)

# sd-scripts options this suite does not implement: accepted by the parser so that using one gives a clear error
UNSUPPORTED = {
    "inpainting / CLIP Vision": ["mask_path", "clip_vision_strength"],
    "highres fix upscaler modules": ["highres_fix_upscaler", "highres_fix_upscaler_args",
                                     "highres_fix_disable_control_net"],
    "ControlNet / guidance": ["control_net_models", "control_net_preps", "control_net_weights", "control_net_ratios",
                              "control_net_multipliers", "control_net_lllite_models", "guide_image_path",
                              "clip_guidance_scale", "clip_image_guidance_scale", "vgg16_guidance_scale",
                              "vgg16_guidance_layer"],
    "Extended Textual Inversion": ["XTI_embeddings"],
    "Deep Shrink": ["ds_depth_1", "ds_timesteps_1", "ds_depth_2", "ds_timesteps_2", "ds_ratio"],
    "regional networks / VAE slicing": ["network_regional_mask_max_color_codes", "vae_slices"],
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def build_parser(sdxl: bool) -> argparse.ArgumentParser:
    """The argument parser of sdxl_gen_img.py (`sdxl=True`) or gen_img_diffusers.py."""
    size = 1024 if sdxl else 512
    p = argparse.ArgumentParser(
        prog="sdxl_gen_img.py" if sdxl else "gen_img_diffusers.py",
        description=f"Generate images with Stable Diffusion {'XL ' if sdxl else '1.x/2.x '}and LoRA networks. "
                    "Prompt options: --n negative, --w/--h size, --d seed(s), --l scale, --nl negative scale, "
                    "--s steps, --am network multipliers" + (", --ow/--oh/--nw/--nh/--ct/--cl size conditioning."
                                                              if sdxl else "."))
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", required=True, help="model: .safetensors/.ckpt file or Diffusers folder")
    if not sdxl:
        g.add_argument("--v2", action="store_true", help="the model is Stable Diffusion 2.x")
        g.add_argument("--v_parameterization", action="store_true", help="v-prediction model (SD2 768-v)")
    g.add_argument("--vae", help="VAE to use instead of the model's (file or Diffusers folder)")
    g.add_argument("--tokenizer_cache_dir", help="folder caching the tokenizers (for offline use)")
    g.add_argument("--fp16", action="store_true", help="run in float16")
    g.add_argument("--bf16", action="store_true", help="run in bfloat16")
    g.add_argument("--no_half_vae", action="store_true", help="keep the VAE in float32 with --fp16/--bf16")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--sdpa", action="store_true", help="PyTorch scaled-dot-product attention (the default)")
    g.add_argument("--xformers", action="store_true", help="xformers memory-efficient attention (CUDA only)")
    g.add_argument("--diffusers_xformers", action="store_true", help="same as --xformers")
    g.add_argument("--mem_eff_attn", action="store_true",
                   help="memory-efficient attention in plain PyTorch, any device (query chunks)")
    g.add_argument("--opt_channels_last", action="store_true", help="channels-last memory format for the models")
    g.add_argument("--textual_inversion_embeddings", nargs="*",
                   help="Textual Inversion embedding files; the token is the file name without extension")

    g = p.add_argument_group("prompts and seeds")
    g.add_argument("--prompt", help="the prompt (prompt options such as --n may follow inside the string)")
    g.add_argument("--from_file", help="prompt file: .txt one prompt a line (# comments), or .toml/.json")
    g.add_argument("--interactive", action="store_true", help="read prompts from standard input until EOF")
    g.add_argument("--no_preview", action="store_true", help="accepted for compatibility (no preview window)")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt (default 1)")
    g.add_argument("--n_iter", type=int, default=1, help="repeat the whole prompt list this often (default 1)")
    g.add_argument("--seed", type=int, help="seed of a single image, or seed of the seeds of many images")
    g.add_argument("--iter_same_seed", action="store_true",
                   help="without --seed/--d, all prompts of one iteration share one random seed")

    g = p.add_argument_group("sampling")
    g.add_argument("--W", type=int, help=f"image width (default {size}; img2img: the source's)")
    g.add_argument("--H", type=int, help=f"image height (default {size}; img2img: the source's)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps (default 50)")
    g.add_argument("--sampler", default="ddim", choices=S.SAMPLERS, help="sampler (default ddim)")
    g.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    g.add_argument("--negative_scale", type=float, help="separate guidance scale for the negative prompt")
    g.add_argument("--clip_skip", type=int, help="use the n-th layer from the end of the text encoder (SD1/2)")
    g.add_argument("--max_embeddings_multiples", type=int, default=1,
                   help="prompt length in units of 75 tokens: 1, 2 or 3 (default 1)")
    g.add_argument("--batch_size", type=int, default=1, help="images per batch (default 1)")
    g.add_argument("--vae_batch_size", type=float, help="VAE decode batch size; < 1 is a ratio of --batch_size")
    if sdxl:
        g = p.add_argument_group("SDXL size conditioning (default: the image size, no crop)")
        for name in ("original_width", "original_height", "original_width_negative", "original_height_negative",
                     "crop_top", "crop_left"):
            g.add_argument(f"--{name}", type=int, help=name.replace("_", " "))

    g = p.add_argument_group("img2img and highres fix")
    g.add_argument("--image_path", help="img2img source: an image file or a folder of images (used in turn)")
    g.add_argument("--strength", type=float, help="img2img / highres fix 2nd pass strength, 0..1 (default 0.8)")
    g.add_argument("--use_original_file_name", action="store_true", help="img2img: name outputs after the sources")
    g.add_argument("--highres_fix_scale", type=float, help="enable highres fix: first pass at this scale (0..1)")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="steps of the first pass (default 28)")
    g.add_argument("--highres_fix_strength", type=float, help="strength of the first pass when it is img2img")
    g.add_argument("--highres_fix_save_1st", action="store_true", help="also save the first-pass images")
    g.add_argument("--highres_fix_latents_upscaling", action="store_true",
                   help="upscale the first pass's latents (bilinear) instead of its image (LANCZOS)")

    g = p.add_argument_group("output")
    g.add_argument("--outdir", default="outputs", help="output folder (default outputs)")
    g.add_argument("--sequential_file_name", action="store_true", help="name files im_000001.png, ...")

    g = p.add_argument_group("networks (LoRA)")
    g.add_argument("--network_module", nargs="*", help="module of each network (one for all; default networks.lora)")
    g.add_argument("--network_weights", nargs="*", help="weights file of each network")
    g.add_argument("--network_mul", type=float, nargs="*", help="multiplier of each network (default 1.0)")
    g.add_argument("--network_args", nargs="*", help='per network "key=value;key=value" options')
    g.add_argument("--network_show_meta", action="store_true", help="log each network file's metadata")
    g.add_argument("--network_merge", action="store_true", help="merge all networks into the model weights")
    g.add_argument("--network_merge_n_models", type=int, help="merge the first N networks, apply the others")
    g.add_argument("--network_pre_calc", action="store_true", help="accepted for compatibility (no effect)")

    for names in UNSUPPORTED.values():
        for name in names:
            p.add_argument(f"--{name}", nargs="*", default=None, help=argparse.SUPPRESS)
    return p


# ---------------------------------------------------------------------------------------------------- checks

def validate_args(args: argparse.Namespace, sdxl: bool) -> None:
    """Every check that needs no model: raises ValueError / FileNotFoundError naming the flag."""
    for feature, names in UNSUPPORTED.items():
        for name in names:
            if getattr(args, name) is not None:
                raise ValueError(f"--{name} ({feature}) is not supported by this generation script")
    if args.fp16 and args.bf16:
        raise ValueError("--fp16 and --bf16 are exclusive; choose one")
    if args.device:
        _check_device(args.device)
    ckpt = Path(args.ckpt)
    if not ckpt.exists() and not _HUB_ID.match(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file or folder")
    if args.vae and not Path(args.vae).exists():
        raise FileNotFoundError(f"--vae {args.vae}: no such file or folder")
    if not (args.prompt or args.from_file or args.interactive):
        raise ValueError("give --prompt, --from_file or --interactive")
    if args.from_file and not Path(args.from_file).is_file():
        raise FileNotFoundError(f"--from_file {args.from_file}: no such file")
    for flag in ("images_per_prompt", "n_iter", "batch_size", "steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if not 1 <= args.max_embeddings_multiples <= 3:
        raise ValueError(f"--max_embeddings_multiples {args.max_embeddings_multiples}: expected 1, 2 or 3")
    if sdxl and args.clip_skip:
        logger.warning("--clip_skip has no effect on SDXL (it always uses the penultimate layers)")
    if (args.W or 0) % 8 or (args.H or 0) % 8:
        logger.warning("--W/--H %sx%s: rounded down to multiples of 8", args.W, args.H)
    _validate_stages(args)
    _validate_networks(args)
    for f in args.textual_inversion_embeddings or []:
        if not Path(f).is_file():
            raise FileNotFoundError(f"--textual_inversion_embeddings {f}: no such file")
    if args.xformers or args.diffusers_xformers:
        _check_xformers(args.device)


def _validate_networks(args: argparse.Namespace) -> None:
    weights = args.network_weights or []
    modules = args.network_module or []
    if not weights and not modules:
        return
    if not weights:
        raise ValueError("--network_module given without --network_weights; every network needs a weights file")
    if len(modules) not in (0, 1, len(weights)):
        raise ValueError(f"--network_module: give one module for all networks or one per --network_weights "
                         f"({len(weights)}), got {len(modules)}")
    for n, flag in ((args.network_mul, "--network_mul"), (args.network_args, "--network_args")):
        if n is not None and len(n) > len(weights):
            raise ValueError(f"{flag}: {len(n)} values for {len(weights)} networks")
    for w in weights:
        if not Path(w).is_file():
            raise FileNotFoundError(f"--network_weights {w}: no such file")
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ValueError(f"--network_module {name}: no such Python module (e.g. networks.lora)")
    for arg in args.network_args or []:
        for item in filter(None, arg.split(";")):
            if "=" not in item:
                raise ValueError(f"--network_args {arg!r}: expected key=value pairs separated by ';'")


def _validate_stages(args: argparse.Namespace) -> None:
    for flag in ("strength", "highres_fix_strength"):
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"--{flag} {value}: expected a value from 0 to 1")
    if args.highres_fix_scale is not None and not 0.0 < args.highres_fix_scale <= 1.0:
        raise ValueError(f"--highres_fix_scale {args.highres_fix_scale}: expected a value above 0 and up to 1")
    if args.highres_fix_steps < 1:
        raise ValueError(f"--highres_fix_steps must be at least 1 (got {args.highres_fix_steps})")
    if args.image_path:
        stages.image_files(args.image_path)  # raises for a missing path or an empty folder


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")


def _check_xformers(device: str | None) -> None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as e:  # ImportError, or an extension built for another torch/CUDA
        raise ValueError(f"--xformers: xformers is not usable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         "use --sdpa (the default attention)") from None
    if not torch.cuda.is_available() or (device and not device.startswith("cuda")):
        raise ValueError("--xformers needs a CUDA device; use --sdpa on CPU")


# ---------------------------------------------------------------------------------------------------- models

def model_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def load_components(args: argparse.Namespace, sdxl: bool, dtype: torch.dtype, device: torch.device):
    """Load the model (and --vae) and put it on `device` in `dtype` (the VAE in float32 where needed)."""
    from library.model_loading import load_models

    comps = load_models(args.ckpt, v2=getattr(args, "v2", False), sdxl=sdxl,
                        v_parameterization=getattr(args, "v_parameterization", False), vae=args.vae,
                        tokenizer_cache_dir=args.tokenizer_cache_dir, dtype=dtype, device=device)
    return prepare_components(comps, args, dtype, device)


def prepare_components(comps, args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """Move models to device/dtype, eval mode, attention implementation."""
    vae_fp32 = args.no_half_vae or (comps.is_sdxl and dtype == torch.float16)  # SDXL's VAE overflows in fp16
    _place(comps.vae, device, torch.float32 if vae_fp32 else dtype)
    for model in (comps.unet, *comps.text_encoders):
        _place(model, device, dtype)
    if args.xformers or args.diffusers_xformers:
        comps.unet.enable_xformers_memory_efficient_attention()
        comps.vae.enable_xformers_memory_efficient_attention()
    elif args.mem_eff_attn:  # plain-PyTorch chunked attention (library.attention), any device
        from library.attention import ChunkedAttnProcessor

        comps.unet.set_attn_processor(ChunkedAttnProcessor())
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        comps.unet.set_attn_processor(AttnProcessor2_0())
    if args.opt_channels_last:
        comps.unet.to(memory_format=torch.channels_last)
        comps.vae.to(memory_format=torch.channels_last)
    return comps


def _place(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    p = next(model.parameters())
    if p.device != device or p.dtype != dtype:  # diffusers warns on every .to(dtype=...), even a no-op one
        model.to(device, dtype)
    model.eval()


def load_networks(args: argparse.Namespace, comps, dtype: torch.dtype, device: torch.device
                  ) -> tuple[list[Any], list[float], list[dict[str, Any]]]:
    """Create, then apply or merge each network. Returns (applied networks, their default multipliers,
    descriptions of every network for the PNG metadata)."""
    from library.file_io import read_metadata

    weights = args.network_weights or []
    modules = args.network_module or ["networks.lora"]
    n_merge = len(weights) if args.network_merge else (args.network_merge_n_models or 0)
    applied, default_muls, described = [], [], []
    for i, file in enumerate(weights):
        module = importlib.import_module(modules[i] if len(modules) > 1 else modules[0])
        mul = args.network_mul[i] if args.network_mul and i < len(args.network_mul) else 1.0
        kwargs = dict(item.split("=", 1) for item in (args.network_args[i].split(";")
                      if args.network_args and i < len(args.network_args) else []) if item)
        if args.network_show_meta:
            logger.info("metadata of %s: %s", file, read_metadata(file))
        network, weights_sd = module.create_network_from_weights(mul, file, comps.vae, comps.text_encoder,
                                                                 comps.unet, for_inference=True, **kwargs)
        merge = i < n_merge and network.is_mergeable()
        if i < n_merge and not merge:
            logger.warning("%s cannot be merged; it is applied instead", file)
        if merge:
            network.merge_to(comps.text_encoder, comps.unet, weights_sd, dtype, device)
        else:
            network.apply_to(comps.text_encoder, comps.unet)
            network.load_state_dict(weights_sd, strict=False)
            network.to(device, dtype).eval()
            applied.append(network)
            default_muls.append(mul)
        described.append({"file": Path(file).name, "multiplier": mul, "merged": merge})
        logger.info("network %s: %s with multiplier %g", file, "merged" if merge else "applied", mul)
    return applied, default_muls, described


# ---------------------------------------------------------------------------------------------------- jobs

class SeedSource:
    """sd-scripts' seeds: --seed alone fixes the one image; with many images it seeds the seeds."""

    def __init__(self, seed: int | None, total: int, iter_same_seed: bool):
        self.seed, self.iter_same_seed = seed, iter_same_seed
        self.single = seed is not None and total == 1
        self.rng = random.Random(seed) if seed is not None else None
        self.iter_seed = S.random_seed()

    def new_iteration(self) -> None:
        self.iter_seed = S.random_seed()

    def next(self) -> int:
        if self.single:
            return self.seed
        if self.rng is not None:
            return self.rng.randint(0, 0x7FFFFFFF)
        return self.iter_seed if self.iter_same_seed else S.random_seed()


def jobs_for_prompt(spec: S.PromptSpec, defaults: S.JobDefaults, count: int, seeds: SeedSource,
                    variant_rng: random.Random | None = None, init: stages.InitImages | None = None,
                    strength: float = stages.DEFAULT_STRENGTH) -> list[S.ImageJob]:
    """The jobs of one prompt line: `count` images, or one per dynamic variant (`{a|b}`, `{e$$a|b}`).

    `--d a,b,c` gives the seeds in order (the last repeats when short).
    """
    variants = [spec]
    if spec.raw and "{" in spec.raw:
        lines = S.expand_dynamic_prompt(spec.raw, count, variant_rng or random.Random())
        if lines != [spec.raw]:
            variants = [S.parse_prompt_line(line, spec.index) for line in lines]
    if len(variants) == 1:
        variants = variants * count
    jobs = []
    for k, variant in enumerate(variants):
        seed = variant.seeds[min(k, len(variant.seeds) - 1)] if variant.seeds else seeds.next()
        image = None
        if init is not None:
            variant, image = init.next_for(variant)
        job = S.make_job(variant, defaults, seed)
        jobs.append(replace(job, init_image=image, strength=strength if variant.strength is None else variant.strength))
    return jobs


def job_defaults(args: argparse.Namespace, sdxl: bool, network_muls: Sequence[float]) -> S.JobDefaults:
    kw = {}
    if sdxl:
        kw = {name: getattr(args, name) for name in ("original_width", "original_height", "original_width_negative",
                                                     "original_height_negative")}
        kw.update(crop_top=args.crop_top or 0, crop_left=args.crop_left or 0)
    size = 1024 if sdxl else 512
    return S.JobDefaults(width=args.W or size, height=args.H or size, steps=args.steps, scale=args.scale, sampler=args.sampler,
                         negative_scale=args.negative_scale, network_muls=tuple(network_muls) or None, **kw)


def _interactive_prompts() -> Iterator[S.PromptSpec]:
    while True:
        try:
            line = input("prompt> ")
        except EOFError:
            return
        if line.split(" --")[0].strip():
            try:
                yield S.parse_prompt_line(line)
            except ValueError as e:
                logger.error("%s", e)


# ---------------------------------------------------------------------------------------------------- main

def run(args: argparse.Namespace, sdxl: bool, components=None) -> list[str]:
    """Generate every image asked for; returns the written paths. `components` skips loading (tests, API use)."""
    validate_args(args, sdxl)
    specs = [S.parse_prompt_line(args.prompt)] if args.prompt else []
    if args.from_file:
        specs += S.read_prompt_file(args.from_file)
    sources = stages.load_images(stages.image_files(args.image_path)) if args.image_path else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = model_dtype(args)
    comps = (prepare_components(components, args, dtype, device) if components is not None
             else load_components(args, sdxl, dtype, device))
    networks, default_muls, described = load_networks(args, comps, dtype, device)
    if any(s.network_muls for s in specs) and len(networks) < len(described):
        logger.warning("--am sets the multipliers of applied networks only; merged networks keep theirs")
    defaults = job_defaults(args, sdxl, default_muls)
    strength = args.strength if args.strength is not None else stages.DEFAULT_STRENGTH
    writer = ImageWriter(args, described, default_muls, comps.vae, comps.is_sdxl)
    generate_kwargs = dict(clip_skip=args.clip_skip, max_embeddings_multiples=args.max_embeddings_multiples,
                           vae_batch_size=_vae_batch_size(args.vae_batch_size, args.batch_size), networks=networks,
                           network_muls=default_muls, progress=True, text_transform=_textual_inversion(args, comps),
                           autocast_dtype=dtype if device.type == "cuda" and dtype != torch.float32 else None)

    def run_stage(jobs: list[S.ImageJob], decode: bool = True) -> list[Any]:
        return [out for _, out in S.generate(comps, jobs, device, args.batch_size, decode=decode, **generate_kwargs)]

    def produce(jobs: list[S.ImageJob]) -> None:
        stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        if args.highres_fix_scale:
            save_first = functools.partial(writer.save, stamp=stamp, prefix="0") if args.highres_fix_save_1st else None
            jobs = stages.highres_fix(jobs, run_stage, args.highres_fix_scale, args.highres_fix_steps,
                                      args.highres_fix_strength, args.highres_fix_latents_upscaling, save_first)
        for k, (job, image) in enumerate(zip(jobs, run_stage(jobs))):
            writer.save(job, image, stamp=stamp, prefix="1" if args.highres_fix_scale else "", k=k)

    def init_images() -> stages.InitImages | None:
        size_from_image = args.W is None and args.H is None and not args.highres_fix_scale
        return stages.InitImages(sources, size_from_image) if sources else None

    if args.interactive:
        for spec in _interactive_prompts():  # every prompt starts again from --seed
            seeds = SeedSource(args.seed, args.images_per_prompt, args.iter_same_seed)
            produce(jobs_for_prompt(spec, defaults, args.images_per_prompt, seeds, random.Random(args.seed),
                                    init_images(), strength))
        return writer.written
    seeds = SeedSource(args.seed, args.n_iter * len(specs) * args.images_per_prompt, args.iter_same_seed)
    variant_rng = random.Random(args.seed)  # dynamic prompt choices: reproducible with --seed
    for iteration in range(args.n_iter):
        seeds.new_iteration()
        init = init_images()
        jobs = [job for spec in specs for job in
                jobs_for_prompt(spec, defaults, args.images_per_prompt, seeds, variant_rng, init, strength)]
        logger.info("iteration %d/%d: %d images", iteration + 1, args.n_iter, len(jobs))
        produce(jobs)
    return writer.written


def _textual_inversion(args: argparse.Namespace, comps) -> Any:
    """Load --textual_inversion_embeddings; returns the prompt rewriter for multi-vector tokens (or None)."""
    if not args.textual_inversion_embeddings:
        return None
    from library.textual_inversion import add_embeddings, expand_prompt

    tokens = add_embeddings(comps.tokenizers, comps.text_encoders, args.textual_inversion_embeddings)
    return functools.partial(expand_prompt, replacements=tokens)


class ImageWriter:
    """Names (sd-scripts' schemes, never overwriting) and writes the PNGs with their metadata."""

    def __init__(self, args: argparse.Namespace, described: list[dict[str, Any]], default_muls: Sequence[float],
                 vae, sdxl: bool = False):
        self.args, self.described, self.default_muls, self.vae, self.sdxl = args, described, default_muls, vae, sdxl
        self.written: list[str] = []

    def save(self, job: S.ImageJob, image: Any, stamp: str, prefix: str = "", k: int = 0) -> None:
        if isinstance(image, torch.Tensor):  # a highres fix first pass kept as latents
            image = S.decode_latents(self.vae, image[None])[0]
        source = getattr(job.init_image, "filename", None)
        if self.args.use_original_file_name and source:
            name = Path(source).stem + ".png"
        elif self.args.sequential_file_name:
            name = f"im_{prefix}{len(self.written) + 1:06d}.png"
        else:
            name = f"im_{stamp}_{prefix}{k % self.args.batch_size:03d}_{job.seed}.png"
        nets = network_info(self.described, job.network_muls or self.default_muls)
        self.written.append(save_png(image, Path(self.args.outdir) / name, png_metadata(job, nets, self.sdxl)))
        logger.info("saved %s", self.written[-1])


def network_info(described: list[dict[str, Any]], muls: Sequence[float]) -> list[dict[str, Any]]:
    """The networks of one image with the multipliers it used (applied networks take `muls` in order)."""
    out, applied = [], 0
    for d in described:
        if not d["merged"] and muls:
            d = dict(d, multiplier=float(muls[min(applied, len(muls) - 1)]))
            applied += 1
        out.append(d)
    return out


def _vae_batch_size(value: float | None, batch_size: int) -> int | None:
    if value is None:
        return None
    return max(1, int(batch_size * value)) if value < 1 else int(value)


def main(argv: Sequence[str] | None = None, sdxl: bool = False) -> None:
    """Entry point of both scripts; errors become a one-line message and exit status 1."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(sdxl).parse_args(argv)
    try:
        run(args, sdxl)
    except (ValueError, OSError) as e:  # bad input, missing files, unreachable hub: one line, no traceback
        raise SystemExit(f"error: {e}") from None
