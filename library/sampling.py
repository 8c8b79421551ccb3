"""Prompt options, samplers and the denoising loop shared by training samples and the generation scripts.

- `parse_prompt_line("a cat --n ugly --w 512 --h 768 --d 1 --l 7.5 --s 28 --am 0.5")` -> `PromptSpec` and
  `read_prompt_file(path)` reads .txt (one prompt a line, `#` comments), .toml (`[prompt]` defaults plus
  `[[prompt.subset]]` entries) and .json (a list of lines or of dicts) prompt files as sd-scripts does.
- `SAMPLERS` / `make_scheduler(name, scheduler_config, v_parameterization)`: sd-scripts' sampler names to diffusers
  schedulers.
- `generate(components, jobs, ...)`: one denoising loop for SD1/SD2/SDXL (classifier-free guidance, sd-scripts'
  `negative_scale`, SDXL size conditioning). Every image draws its noise from its own CPU generator seeded with
  its seed, so an image depends on its seed only: not on the batch it is in, the device or the global RNG.
- `sample_images(...)`: the trainer's sample step; restores every RNG state and module mode it touches.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import random
import secrets
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from library.sample_prompts import (  # re-exported: the sampling API
    PROMPT_OPTIONS, SAMPLERS, PromptSpec, canonical_sampler, expand_dynamic_prompt, parse_prompt_line, prompt_from_dict,
    read_prompt_file)

__all__ = [
    "PROMPT_OPTIONS", "SAMPLERS", "PromptSpec", "canonical_sampler", "expand_dynamic_prompt", "parse_prompt_line",
    "prompt_from_dict", "read_prompt_file", "make_scheduler", "build_pipeline", "ImageJob", "JobDefaults",
    "make_job", "random_seed", "encode_prompts", "initial_noise", "denoise_batch", "encode_init_images",
    "decode_latents", "batches", "set_network_multipliers", "generate", "preserved_rng_state", "eval_mode",
    "on_device", "sample_image_name", "sample_images",
]

logger = logging.getLogger(__name__)

# scheduler class name and the settings that differ from the model's scheduler config
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}
_SCHEDULER_BASE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                   "beta_schedule": "scaled_linear", "steps_offset": 1}


def make_scheduler(name: str, scheduler_config: dict[str, Any] | None = None, v_parameterization: bool = False):
    """A fresh diffusers scheduler for sampler `name`, on the model's beta schedule (`scheduler_config`)."""
    import diffusers

    cls_name, overrides = _SCHEDULERS[canonical_sampler(name)]
    config = {**_SCHEDULER_BASE, **(scheduler_config or {}), **overrides}
    config.pop("_class_name", None)
    config["prediction_type"] = "v_prediction" if v_parameterization else "epsilon"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates algorithm_type="dpmsolver"
        return getattr(diffusers, cls_name).from_config(config)


def build_pipeline(components, sampler: str = "ddim"):
    """A diffusers StableDiffusionPipeline / StableDiffusionXLPipeline over `components` (no safety checker).

    For users who want diffusers' own pipeline API; the scripts here use `generate`, which adds weighted
    and long prompts, `negative_scale` and per-image seeds.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = make_scheduler(sampler, components.scheduler_config, components.v_parameterization)
    if components.is_sdxl:
        te1, te2 = components.text_encoders
        tok1, tok2 = components.tokenizers
        return StableDiffusionXLPipeline(vae=components.vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                         tokenizer_2=tok2, unet=components.unet, scheduler=scheduler)
    return StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoders[0],
                                   tokenizer=components.tokenizers[0], unet=components.unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# ---------------------------------------------------------------------------------------------------- jobs

@dataclass
class ImageJob:
    """Every setting of one image, resolved (no None left except `negative_scale`/`network_muls`)."""

    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    scale: float
    sampler: str
    negative_scale: float | None = None
    network_muls: tuple[float, ...] | None = None
    original_size: tuple[int, int] | None = None  # (height, width) for SDXL conditioning; None: target size
    original_size_negative: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    index: int = 0
    init_image: Any = None  # img2img: a PIL image (resized to width x height) or latents (4, H/8, W/8)
    strength: float = 1.0  # img2img: the part of the schedule that is run (1.0: from pure noise)
    noise_offset: int = 0  # noise comes from seed + noise_offset (highres fix's 2nd stage uses 1)

    def batch_key(self) -> tuple:
        """Images with equal keys can share one batch (same size, steps, guidance, sampler, networks)."""
        key = [getattr(self, f.name) for f in fields(self)
               if f.name not in ("prompt", "negative_prompt", "seed", "index", "init_image")]
        return (*key, self.init_image is None)


@dataclass
class JobDefaults:
    """The caller's defaults for options a prompt does not set."""

    width: int = 512
    height: int = 512
    steps: int = 30
    scale: float = 7.5
    sampler: str = "ddim"
    negative_prompt: str = ""
    negative_scale: float | None = None
    network_muls: tuple[float, ...] | None = None
    original_width: int | None = None
    original_height: int | None = None
    original_width_negative: int | None = None
    original_height_negative: int | None = None
    crop_top: int = 0
    crop_left: int = 0


def random_seed() -> int:
    """A seed from the OS entropy pool (leaves every library's RNG stream alone)."""
    return secrets.randbelow(0x7FFFFFFF)


def _pick(value, default):
    return default if value is None else value


def make_job(spec: PromptSpec, defaults: JobDefaults, seed: int | None = None) -> ImageJob:
    """Resolve `spec` against `defaults`; sizes are rounded down to multiples of 8 (at least 64).

    The seed is `seed`, else the prompt's first `--d`, else a random one.
    """
    width = max(64, _pick(spec.width, defaults.width) // 8 * 8)
    height = max(64, _pick(spec.height, defaults.height) // 8 * 8)
    ow, oh = _pick(spec.original_width, defaults.original_width), _pick(spec.original_height, defaults.original_height)
    nw = _pick(spec.original_width_negative, defaults.original_width_negative)
    nh = _pick(spec.original_height_negative, defaults.original_height_negative)
    original = (oh or height, ow or width)
    muls = spec.network_muls if spec.network_muls is not None else defaults.network_muls
    return ImageJob(
        prompt=spec.prompt,
        negative_prompt=_pick(spec.negative_prompt, defaults.negative_prompt),
        seed=int(seed) if seed is not None else spec.seed if spec.seed is not None else random_seed(),
        width=width, height=height,
        steps=_pick(spec.steps, defaults.steps),
        scale=_pick(spec.scale, defaults.scale),
        sampler=canonical_sampler(_pick(spec.sampler, defaults.sampler)),
        negative_scale=spec.negative_scale if spec.negative_scale is not None else defaults.negative_scale,
        network_muls=tuple(muls) if muls is not None else None,
        original_size=original,
        original_size_negative=(nh or original[0], nw or original[1]),
        crop_top_left=(_pick(spec.crop_top, defaults.crop_top), _pick(spec.crop_left, defaults.crop_left)),
        index=spec.index,
    )


# ---------------------------------------------------------------------------------------------------- generation

def encode_prompts(components, prompts: Sequence[str], device: torch.device, clip_skip: int | None = None,
                   max_embeddings_multiples: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (B, 2+75n or 77, C), pooled (B, C2) for SDXL else None) of A1111-weighted prompts.

    n = `max_embeddings_multiples` chunks of 75 tokens (1..3); longer prompts are cut; `BREAK` starts the next
    chunk. Tokenizing and encoding are library.text_encoding's, shared with training. SDXL ignores clip_skip.
    """
    from library import text_encoding

    pairs = [text_encoding.tokenize_weighted(tok, list(prompts), 75 * max_embeddings_multiples, breaks=True)
             for tok in components.tokenizers]
    ids = [p[0] for p in pairs]
    weights = [p[1] for p in pairs]
    if all(bool((w == 1.0).all()) for w in weights):
        weights = None  # plain prompts: skip the re-weighting (and its mean restoration)
    hidden, pooled = text_encoding.encode_tokens(components.text_encoders, ids, clip_skip, components.is_sdxl,
                                                 weights, tokenizers=components.tokenizers)
    return hidden.to(device), (pooled.to(device) if pooled is not None else None)


def _step_kwargs(scheduler, generators) -> dict[str, Any]:
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generators
    if "eta" in params:
        kwargs["eta"] = 0.0
    return kwargs


def _time_ids(sizes: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]], device, dtype) -> torch.Tensor:
    """SDXL `time_ids` rows: original (h, w), crop (top, left), target (h, w)."""
    return torch.tensor([[*o, *c, *t] for o, c, t in sizes], device=device, dtype=dtype)


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def initial_noise(job: ImageJob, generator: torch.Generator) -> torch.Tensor:
    """The starting latent noise (4, H/8, W/8) of one image, from its own CPU generator."""
    return torch.randn((4, job.height // 8, job.width // 8), generator=generator, dtype=torch.float32)


@torch.no_grad()
def denoise_batch(components, jobs: Sequence[ImageJob], device: torch.device | str,
                  clip_skip: int | None = None, max_embeddings_multiples: int = 1,
                  progress: bool = False, text_transform: Callable[[str], str] | None = None) -> torch.Tensor:
    """Run the sampler for jobs sharing one `batch_key()`; returns the final latents (B, 4, H/8, W/8).

    `text_transform` rewrites prompts just before tokenizing (Textual Inversion token expansion).
    """
    device = torch.device(device)
    first = jobs[0]
    dtype = _module_device_dtype(components.unet)[1]
    generators = [torch.Generator("cpu").manual_seed(j.seed + j.noise_offset) for j in jobs]
    noise = torch.stack([initial_noise(j, g) for j, g in zip(jobs, generators)]).to(device)
    context, added, n_cond = _conditioning(components, jobs, device, dtype, clip_skip, max_embeddings_multiples,
                                           text_transform)
    scheduler = make_scheduler(first.sampler, components.scheduler_config, components.v_parameterization)
    scheduler.set_timesteps(first.steps, device=device)
    latents, timesteps = _start(components, scheduler, jobs, noise, device)
    step_kwargs = _step_kwargs(scheduler, generators)
    if progress:
        from tqdm import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for t in timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * n_cond), t).to(dtype)
        pred = components.unet(model_in, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.float()
        pred = _guide(pred.chunk(n_cond), first.scale, first.negative_scale) if n_cond > 1 else pred
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return latents


def _conditioning(components, jobs: Sequence[ImageJob], device, dtype, clip_skip, max_embeddings_multiples,
                  text_transform) -> tuple[torch.Tensor, dict | None, int]:
    """UNet conditioning for [negatives, prompts(, empty prompts)]: (context, SDXL added_cond_kwargs, count)."""
    first = jobs[0]
    cfg = first.scale > 1.0 or first.negative_scale is not None
    texts = [j.prompt for j in jobs]
    if cfg:
        texts = [j.negative_prompt for j in jobs] + texts
        if first.negative_scale is not None:
            texts += [""] * len(jobs)  # the true unconditional of sd-scripts' negative_scale
    if text_transform is not None:
        texts = [text_transform(t) for t in texts]
    unique = list(dict.fromkeys(texts))  # images of one prompt share their encoding
    context, pooled = encode_prompts(components, unique, device, clip_skip, max_embeddings_multiples)
    which = torch.tensor([unique.index(t) for t in texts], device=context.device)
    context = context[which].to(device, dtype)
    added = None
    if components.is_sdxl:
        target = (first.height, first.width)
        pos = (first.original_size, first.crop_top_left, target)
        neg = (first.original_size_negative, first.crop_top_left, target)
        rows = ([neg] * len(jobs) if cfg else []) + [pos] * len(jobs)
        rows += [pos] * len(jobs) if first.negative_scale is not None else []
        pooled = pooled[which.to(pooled.device)].to(device, dtype)
        added = {"text_embeds": pooled, "time_ids": _time_ids(rows, device, dtype)}
    return context, added, len(texts) // len(jobs)


def _start(components, scheduler, jobs: Sequence[ImageJob], noise: torch.Tensor, device) -> tuple[torch.Tensor, Any]:
    """Starting latents and the timesteps to run: pure noise, or (img2img) the init latents noised to `strength`."""
    first = jobs[0]
    if first.init_image is None:
        return noise * scheduler.init_noise_sigma, scheduler.timesteps
    init = encode_init_images(components.vae, [j.init_image for j in jobs], first.width, first.height).to(device)
    run = min(int(first.steps * first.strength), first.steps)
    begin = (first.steps - run) * scheduler.order
    timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    if len(timesteps) == 0:
        return init, timesteps
    return scheduler.add_noise(init, noise, timesteps[:1].repeat(len(jobs))), timesteps


@torch.no_grad()
def encode_init_images(vae, images: Sequence[Any], width: int, height: int) -> torch.Tensor:
    """img2img sources -> scaled latents (B, 4, H/8, W/8): PIL images are resized (LANCZOS) and encoded
    (the mean of the VAE's distribution); latent tensors are resized (bilinear) if their size differs."""
    from PIL import Image

    device, dtype = _module_device_dtype(vae)
    out = []
    for image in images:
        if isinstance(image, torch.Tensor):
            lat = image.float()[None]
            if lat.shape[-2:] != (height // 8, width // 8):
                lat = torch.nn.functional.interpolate(lat, (height // 8, width // 8), mode="bilinear")
            out.append(lat[0].cpu())
            continue
        image = image.convert("RGB").resize((width, height), Image.LANCZOS)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
        dist = vae.encode(pixels.to(device, dtype)).latent_dist
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        out.append(((dist.mean.float() - shift) * vae.config.scaling_factor)[0].cpu())
    return torch.stack(out)


def _guide(preds: Sequence[torch.Tensor], scale: float, negative_scale: float | None) -> torch.Tensor:
    if negative_scale is None:
        negative, text = preds
        return negative + scale * (text - negative)
    negative, text, uncond = preds  # sd-scripts' formula: guide away from the negative prompt separately
    return uncond + scale * (text - uncond) - negative_scale * (negative - uncond)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, vae_batch_size: int | None = None) -> list:
    """Latents -> PIL images (RGB), decoding `vae_batch_size` at a time."""
    from PIL import Image

    device, dtype = _module_device_dtype(vae)
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    step = max(1, vae_batch_size or len(latents))
    images = []
    for i in range(0, len(latents), step):
        chunk = latents[i:i + step].to(device, dtype) / scaling + shift
        pixels = vae.decode(chunk).sample.float().clamp(-1, 1)
        arr = ((pixels + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(a) for a in arr)
    return images


def batches(jobs: Iterable[ImageJob], batch_size: int) -> Iterator[list[ImageJob]]:
    """Consecutive jobs grouped by `batch_key()`, at most `batch_size` each (order kept)."""
    batch: list[ImageJob] = []
    for job in jobs:
        if batch and (len(batch) >= batch_size or batch[-1].batch_key() != job.batch_key()):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def set_network_multipliers(networks: Sequence[Any], muls: Sequence[float] | None,
                            defaults: Sequence[float]) -> None:
    """Give each applied network its multiplier (`--am` values; a short list repeats its last value)."""
    values = [v for v in (muls or defaults) if v is not None]
    if not networks or not values:
        return
    while len(values) < len(networks):
        values.append(values[-1])
    for net, mul in zip(networks, values):
        net.set_multiplier(float(mul))


def generate(components, jobs: Sequence[ImageJob], device: torch.device | str, batch_size: int = 1,
             clip_skip: int | None = None, max_embeddings_multiples: int = 1, vae_batch_size: int | None = None,
             networks: Sequence[Any] = (), network_muls: Sequence[float] = (),
             autocast_dtype: torch.dtype | None = None, progress: bool = False,
             text_transform: Callable[[str], str] | None = None, decode: bool = True
             ) -> Iterator[tuple[ImageJob, Any]]:
    """Yield (job, PIL image) for every job, batching consecutive compatible jobs (`decode=False`: latents).

    `networks` are applied (not merged) networks whose multipliers follow each job's `network_muls`
    (default `network_muls`). `autocast_dtype` runs the UNet/text encoders under torch.autocast.
    """
    device = torch.device(device)
    for batch in batches(jobs, batch_size):
        set_network_multipliers(networks, batch[0].network_muls, network_muls)
        with _autocast(device, autocast_dtype):
            latents = denoise_batch(components, batch, device, clip_skip, max_embeddings_multiples, progress,
                                    text_transform)
        if decode:
            yield from zip(batch, decode_latents(components.vae, latents, vae_batch_size))
        else:
            yield from zip(batch, latents.float().cpu())


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- training samples

@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Restore torch (CPU and CUDA), python `random` and numpy RNG states on exit."""
    torch_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    py_state = random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        random.setstate(py_state)
        np.random.set_state(np_state)


@contextlib.contextmanager
def eval_mode(*models: Any) -> Iterator[None]:
    """Put models in eval mode (no dropout), then restore every submodule's own training flag."""
    flags = [(m, m.training) for model in models if model is not None for m in model.modules()]
    for model in models:
        if model is not None:
            model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def on_device(models: Sequence[torch.nn.Module], device: torch.device) -> Iterator[None]:
    """Move models to `device` for the block, then back where each was."""
    places = [(m, next(m.parameters()).device) for m in models if m is not None]
    for m, _ in places:
        m.to(device)
    try:
        yield
    finally:
        for m, where in places:
            m.to(where)


def sample_image_name(output_name: str | None, step: int, epoch: int | None, index: int, seed: int,
                      when: datetime.datetime | None = None) -> str:
    """sd-scripts' sample file name: `[name_]{e{epoch:06d}|{step:06d}}_{index:02d}_{YYYYmmddHHMMSS}_{seed}.png`."""
    stamp = (when or datetime.datetime.now()).strftime("%Y%m%d%H%M%S")
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{number}_{index:02d}_{stamp}_{seed}.png"


def sample_images(components, prompts_file: str | os.PathLike | Sequence[PromptSpec], output_dir: str | os.PathLike,
                  step: int, epoch: int | None = None, sampler: str = "ddim", *, output_name: str | None = None,
                  device: torch.device | str | None = None, clip_skip: int | None = None,
                  max_embeddings_multiples: int = 3, autocast_dtype: torch.dtype | None = None,
                  networks: Sequence[Any] = (), network_muls: Sequence[float] = (),
                  prompt_replacement: tuple[str, str] | None = None) -> list[str]:
    """Generate one image per prompt into `<output_dir>/sample/` (sd-scripts' names); return the paths.

    Defaults: 30 steps, scale 7.5, 512x512 (1024x1024 for SDXL), random seed where `--d` is absent. Models are
    put in eval mode and on `device` for the duration; RNG states, modes, devices and network multipliers are
    restored afterwards, so the training run continues exactly as if no samples had been taken.
    """
    from library.image_output import png_metadata, save_png

    try:
        specs = read_prompt_file(prompts_file, skip_invalid=True) if isinstance(prompts_file, (str, os.PathLike)) \
            else list(prompts_file)
    except (FileNotFoundError, ValueError) as e:  # a bad prompt file must not end hours of training (bad lines are
        # skipped one by one; the trainer refuses a bad file before it starts: library.preflight)
        logger.error("no sample images at step %d: %s", step, e)
        return []
    if not specs:
        return []
    device = torch.device(device) if device is not None else _module_device_dtype(components.unet)[0]
    size = 1024 if components.is_sdxl else 512
    defaults = JobDefaults(width=size, height=size, steps=30, scale=7.5, sampler=canonical_sampler(sampler))
    jobs = []
    for spec in specs:
        if prompt_replacement is not None:
            old, new = prompt_replacement
            spec = replace(spec, prompt=spec.prompt.replace(old, new),
                           negative_prompt=spec.negative_prompt.replace(old, new) if spec.negative_prompt else None)
        jobs.append(make_job(spec, defaults))
    save_dir = Path(output_dir) / "sample"
    logger.info("generating %d sample images at step %d into %s", len(jobs), step, save_dir)
    saved_muls = [getattr(n, "multiplier", None) for n in networks]
    models = [components.unet, components.vae, *components.text_encoders]
    paths = []
    try:
        with preserved_rng_state(), eval_mode(*models, *networks), on_device(models, device):
            for job, image in generate(components, jobs, device, 1, clip_skip, max_embeddings_multiples,
                                       networks=networks, network_muls=network_muls or saved_muls,
                                       autocast_dtype=autocast_dtype):
                name = sample_image_name(output_name, step, epoch, job.index, job.seed)
                paths.append(save_png(image, save_dir / name, png_metadata(job, sdxl=components.is_sdxl)))
    finally:
        for net, mul in zip(networks, saved_muls):
            if mul is not None:
                net.set_multiplier(mul)
    return paths
