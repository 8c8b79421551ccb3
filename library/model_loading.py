"""Load and save Stable Diffusion models (SD 1.x, SD 2.x, SDXL) from / to single files and Diffusers folders.

`load_models(path, ...)` accepts a single-file checkpoint (.safetensors / .ckpt, original layout), a Diffusers
folder, or a Hugging Face model id, and returns `library.sd_configs.ModelComponents`. Single files are read one
tensor at a time into models created without memory (`accelerate.init_empty_weights`) and filled with
`load_state_dict(assign=True)`, so loading never holds two copies of a weight; dtype is cast per tensor.
`save_models(components, path)` writes a single file (by extension) or a Diffusers folder, atomically.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from library import ldm_convert as lc
from library.file_io import CheckpointError, atomic_path, precision_dtype, refuse_overwrite, replace_dir, temp_dir_beside
from library.sd_configs import ModelComponents, build_text_encoder

logger = logging.getLogger(__name__)

SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
TOKENIZER_IDS = {  # hub ids of the tokenizers; the cache folder is the id with "/" replaced by "_"
    "clip": "openai/clip-vit-large-patch14",
    "sd2": "stabilityai/stable-diffusion-2",  # tokenizer in its "tokenizer" subfolder
    "bigg": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
}
FAMILY_TOKENIZERS = {"sd1": ["clip"], "sd2": ["sd2"], "sdxl": ["clip", "bigg"]}
FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_models(path: str | os.PathLike, *, v2: bool = False, sdxl: bool | None = None,
                v_parameterization: bool = False, vae: str | os.PathLike | None = None,
                tokenizer_cache_dir: str | os.PathLike | None = None, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu", with_tokenizers: bool = True,
                defer_unet: bool = False) -> ModelComponents:
    """Load UNet, VAE, text encoder(s) and tokenizer(s) from a single file, a Diffusers folder or a hub id.

    `sdxl=None` accepts SD 1.x / SD 2.x (as `v2` says) and SDXL; `sdxl=False` refuses SDXL files (the SD scripts),
    `sdxl=True` requires one. `v2` must match the file. `dtype` defaults to float32. `vae` replaces the VAE.
    `with_tokenizers=False` skips the tokenizers (`components.tokenizers` is then empty).
    `defer_unet=True` (single files): the U-Net comes back empty (meta tensors) with `components.load_unet` set,
    which reads its weights when called: a trainer caches with the VAE and text encoders and drops them first, so
    the whole model is never in memory at once.
    """
    dtype = dtype or torch.float32
    path_str = os.path.expanduser(str(path))
    p = Path(path_str)
    if vae is not None:
        vae = os.path.expanduser(str(vae))
        if not Path(vae).exists() and _looks_like_path(vae):  # checked before the model loads
            raise FileNotFoundError(f"{vae}: no such VAE file or folder (--vae)")
    args = (v2, sdxl, v_parameterization, tokenizer_cache_dir if with_tokenizers else False, dtype, device, vae is None)
    if p.is_file():
        comps = _load_single_file(p, *args, defer_unet=defer_unet)
    elif p.is_dir():
        comps = _load_diffusers(path_str, *args)
    elif _looks_like_path(path_str):
        raise FileNotFoundError(f"{path_str}: no such file or folder (expected a .safetensors/.ckpt file or a "
                                f"Diffusers folder)")
    else:
        comps = _load_hub(path_str, *args)
    if vae is not None:
        comps.vae = load_vae(vae, dtype, family=comps.arch, device=device)
    comps.sources = [str(Path(x).resolve()) for x in (path_str, vae) if x is not None and Path(x).exists()]
    return comps


def _looks_like_path(text: str) -> bool:
    return (text.lower().endswith(SINGLE_FILE_EXTS) or text.startswith((".", "/", "~")) or "\\" in text
            or text.count("/") != 1 or os.sep in text and os.sep != "/")


def check_family(family: str, source: str, v2: bool, sdxl: bool | None) -> None:
    """Raise a one-line error when the --v2 / SDXL expectation does not match the model's family."""
    name = FAMILY_NAMES[family]
    if sdxl is True and family != "sdxl":
        raise CheckpointError(f"{source}: is an {name} model, but this script needs an SDXL model")
    if sdxl is False and family == "sdxl":
        raise CheckpointError(f"{source}: is an SDXL model; use the sdxl_* scripts for it")
    if family == "sdxl":
        if v2:
            raise CheckpointError(f"{source}: is an SDXL model, but --v2 was given (it is for SD 2.x); drop --v2")
        return
    if v2 and family == "sd1":
        raise CheckpointError(f"{source}: is an SD 1.x model (CLIP ViT-L text encoder), but --v2 was given; drop --v2")
    if not v2 and family == "sd2":
        raise CheckpointError(f"{source}: is an SD 2.x model (OpenCLIP ViT-H text encoder), but --v2 was not given; "
                              f"add --v2 (and --v_parameterization for 768-v models)")


def empty_models_for_layout(layout: lc.LdmLayout, with_vae: bool = True) -> dict[str, torch.nn.Module]:
    """Models of `layout` with parameters on the meta device (no memory), keyed by component name."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with init_empty_weights():
        models: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel(**layout.unet_config)}
        if with_vae:
            models["vae"] = AutoencoderKL(**layout.vae_config)
        for name, cfg in zip(lc.TE_COMPONENTS, layout.text_encoder_configs):
            models[name] = build_text_encoder(cfg)
    return models


def _fill(model: torch.nn.Module, component: str, reader, layout: lc.LdmLayout, dtype, device, source: str, bar):
    names = list(model.state_dict().keys())
    sd = {}
    for name, tensor in lc.ldm_to_diffusers(component, names, reader.get, layout, dtype, device, source):
        sd[name] = tensor
        bar.update()
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _fill_all(models: dict[str, torch.nn.Module], reader, layout: lc.LdmLayout, dtype, device, source: str,
              desc: str) -> None:
    with tqdm(total=sum(len(m.state_dict()) for m in models.values()), desc=desc, unit="tensor", disable=None) as bar:
        for component, model in models.items():
            _fill(model, component, reader, layout, dtype, device, source, bar)


def _load_single_file(path: Path, v2: bool, sdxl: bool | None, v_param: bool, tokenizer_cache_dir, dtype, device,
                      want_vae: bool, defer_unet: bool = False) -> ModelComponents:
    from library.tensor_stream import TensorFile

    with TensorFile(path) as reader:
        shapes = {k: reader.shape(k) for k in reader.keys()}
        family = lc.detect_family(shapes, str(path))
        check_family(family, str(path), v2, sdxl)
        layout = lc.infer_layout(shapes, str(path), v_param, family)
        if want_vae and not layout.vae_config:
            raise CheckpointError(f"{path}: holds no VAE ({lc.VAE_PREFIX}*); pass a VAE with --vae")
        tokenizers = _tokenizers(family, None, tokenizer_cache_dir)  # fail fast, before reading weights
        ema = sum(1 for k in shapes if k.startswith("model_ema."))
        if ema:
            logger.info("%s: ignoring %d model_ema.* tensors (the EMA copy); the model weights are used", path, ema)
        models = empty_models_for_layout(layout, with_vae=want_vae)
        _fill_all({name: m for name, m in models.items() if not (defer_unet and name == "unet")}, reader, layout,
                  dtype, device, str(path), "loading")
        _log_unused_keys(path, shapes, models, layout)
        tes = [models[n] for n in lc.TE_COMPONENTS[: len(layout.text_encoder_configs)]]
        for i, te in enumerate(tes):
            extra = lc.extra_ldm_keys(layout, i, list(shapes))
            prefix = layout.te_prefixes[i]
            setattr(te, lc.EXTRA_ATTR, {k[len(prefix):]: reader.get(k) for k in extra})
    logger.info("loaded %s model from %s%s", FAMILY_NAMES[family], path, " (the U-Net later)" if defer_unet else "")
    comps = ModelComponents(family, models["unet"], models.get("vae"), tes, tokenizers,
                            v_parameterization=v_param, scheduler_config=_scheduler_config(v_param))
    if defer_unet:  # the closure holds the empty U-Net only: the VAE and text encoders must be free to go
        unet = models.pop("unet")
        comps.load_unet = lambda: _fill_deferred_unet(path, unet, layout, dtype, device)
    return comps


def _fill_deferred_unet(path: Path, unet: torch.nn.Module, layout: lc.LdmLayout, dtype, device) -> torch.nn.Module:
    from library.tensor_stream import TensorFile

    with TensorFile(path) as reader:
        _fill_all({"unet": unet}, reader, layout, dtype, device, str(path), "loading U-Net")
    logger.info("loaded the U-Net from %s", path)
    return unet


def _tokenizers(family: str, folder, tokenizer_cache_dir, hub_model: str | None = None) -> list:
    if tokenizer_cache_dir is False:  # not wanted
        return []
    return load_tokenizers(family, folder, tokenizer_cache_dir, hub_model)


def detect_model_family(path: str | os.PathLike) -> str:
    """sd1 / sd2 / sdxl of a single file or a local Diffusers folder, reading only names and configs."""
    p = Path(path)
    if p.is_dir():
        return _diffusers_family(str(p), local=True)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    from library.tensor_stream import TensorFile

    with TensorFile(p) as reader:
        return lc.detect_family(reader.keys(), str(p))


# Noise-schedule buffers of the original training code, found in old .ckpt files; not model weights.
_SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}


def _log_unused_keys(path: Path, shapes: Mapping[str, Any], models: Mapping[str, torch.nn.Module],
                     layout: lc.LdmLayout) -> None:
    used = {lc.ldm_param_for(c, n, layout).key for c, m in models.items() for n in m.state_dict()}
    for i in range(len(layout.te_prefixes)):
        used.update(lc.extra_ldm_keys(layout, i, list(shapes)))
    unused = [k for k in shapes if k not in used and k not in _SCHEDULE_BUFFERS and not k.startswith("model_ema.")
              and not k.endswith("position_ids") and not (k.startswith(lc.VAE_PREFIX) and "vae" not in models)]
    if unused:
        logger.warning("%s: %d tensors are not part of the model and were ignored (e.g. %s)", path, len(unused),
                       ", ".join(unused[:3]))


def _scheduler_config(v_param: bool) -> dict[str, Any]:
    from library.sd_configs import _SCHEDULER

    return dict(_SCHEDULER, prediction_type="v_prediction" if v_param else "epsilon")


def _read_json(path_or_id: str, subfolder: str, filename: str, local: bool) -> dict[str, Any] | None:
    if local:
        f = Path(path_or_id, subfolder, filename)
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(path_or_id, filename, subfolder=subfolder or None)).read_text())
    except Exception as e:  # a file missing from the repo is None; offline / unknown repo is an error
        name = type(e).__name__
        if "EntryNotFound" in name and not name.startswith("Local"):
            return None
        raise


def _diffusers_family(path_or_id: str, local: bool) -> str:
    unet_cfg = _read_json(path_or_id, "unet", "config.json", local)
    te_cfg = _read_json(path_or_id, "text_encoder", "config.json", local)
    if unet_cfg is None or te_cfg is None:
        raise CheckpointError(f"{path_or_id}: not a Diffusers Stable Diffusion folder (needs unet/config.json and "
                              f"text_encoder/config.json) and not a single-file checkpoint")
    if unet_cfg.get("addition_embed_type") == "text_time" or _read_json(path_or_id, "text_encoder_2", "config.json", local):
        return "sdxl"
    return "sd2" if te_cfg.get("hidden_act") == "gelu" else "sd1"


def _load_diffusers(path_or_id: str, v2: bool, sdxl: bool | None, v_param: bool, tokenizer_cache_dir, dtype, device,
                    want_vae: bool, local: bool = True) -> ModelComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    family = _diffusers_family(path_or_id, local)
    check_family(family, path_or_id, v2, sdxl)
    tokenizers = _tokenizers(family, path_or_id if local else None, tokenizer_cache_dir,
                             hub_model=None if local else path_or_id)
    sched = _read_json(path_or_id, "scheduler", "scheduler_config.json", local) or {}
    if sched.get("prediction_type") == "v_prediction" and not v_param:
        logger.warning("%s: its scheduler predicts v (v_prediction); loading it as a v-parameterization model "
                       "(pass --v_parameterization to silence this)", path_or_id)
        v_param = True
    try:
        unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path_or_id, subfolder="vae", torch_dtype=dtype) if want_vae else None
        tes = [CLIPTextModel.from_pretrained(path_or_id, subfolder="text_encoder", dtype=dtype)]
        if family == "sdxl":
            tes.append(CLIPTextModelWithProjection.from_pretrained(path_or_id, subfolder="text_encoder_2", dtype=dtype))
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path_or_id}: cannot load the Diffusers model: {str(e).splitlines()[0]}") from None
    models = [m.to(device).eval() for m in [unet, vae, *tes] if m is not None]
    logger.info("loaded %s Diffusers model from %s", FAMILY_NAMES[family], path_or_id)
    cfg = _scheduler_config(v_param)
    cfg.update({k: v for k, v in sched.items() if k in cfg and k != "prediction_type"})
    return ModelComponents(family, models[0], models[1] if vae is not None else None, models[-len(tes):],
                           tokenizers, v_parameterization=v_param, scheduler_config=cfg)


def _load_hub(model_id: str, v2, sdxl, v_param, tokenizer_cache_dir, dtype, device, want_vae) -> ModelComponents:
    try:
        _read_json(model_id, "unet", "config.json", local=False)
    except Exception as e:
        raise CheckpointError(f"{model_id}: not a local file or folder, and loading it as a Hugging Face model id "
                              f"failed ({type(e).__name__}); download the model and pass a local .safetensors/.ckpt "
                              f"file or Diffusers folder instead") from None
    return _load_diffusers(model_id, v2, sdxl, v_param, tokenizer_cache_dir, dtype, device, want_vae, local=False)


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = None, family: str = "sd1",
             device: str | torch.device = "cpu"):
    """Load an AutoencoderKL from a VAE file (original or diffusers layout), a full checkpoint, or a folder.

    `family` sets the latent scaling factor of single files (SDXL 0.13025, others 0.18215).
    """
    from diffusers import AutoencoderKL

    dtype = dtype or torch.float32
    p = Path(path)
    if p.is_dir():
        sub = "vae" if (p / "vae" / "config.json").is_file() else None
        cfg = _read_json(str(p), sub or "", "config.json", local=True) or {}
        if cfg.get("_class_name") != "AutoencoderKL":
            raise CheckpointError(f"{p}: not a Diffusers VAE folder (no config.json or vae/config.json of an "
                                  f"AutoencoderKL)")
        return AutoencoderKL.from_pretrained(str(p), subfolder=sub, torch_dtype=dtype).to(device).eval()
    if not p.exists():
        if _looks_like_path(str(path)):
            raise FileNotFoundError(f"{p}: no such VAE file or folder")
        return _load_hub_vae(str(path), dtype).to(device).eval()
    from library.tensor_stream import TensorFile

    with TensorFile(p) as reader:
        keys = reader.keys()
        shapes = {k: reader.shape(k) for k in keys}
        if any(k.startswith(lc.VAE_PREFIX) for k in keys):
            prefix, get = lc.VAE_PREFIX, reader.get
        elif any(k.startswith("encoder.down.") for k in keys):
            prefix, get = "", reader.get
        elif any(k.startswith("encoder.down_blocks.") for k in keys):  # diffusers layout: view it as the original
            prefix = ""
            shapes, get = _diffusers_vae_as_ldm(reader, shapes)
        else:
            raise CheckpointError(f"{p}: not a VAE: no encoder.down.* / encoder.down_blocks.* / "
                                  f"{lc.VAE_PREFIX}* tensors")
        cfg = lc.vae_config_from_shapes(shapes, family, prefix, source=str(p))
        layout = lc.LdmLayout(family, {}, cfg, [], [], vae_prefix=prefix)
        from accelerate import init_empty_weights

        with init_empty_weights():
            vae = AutoencoderKL(**cfg)
        names = list(vae.state_dict().keys())
        sd = dict(lc.ldm_to_diffusers("vae", names, get, layout, dtype, device, str(p)))
    vae.load_state_dict(sd, strict=True, assign=True)
    logger.info("loaded VAE from %s", p)
    return vae.eval()


def _load_hub_vae(model_id: str, dtype):
    from diffusers import AutoencoderKL

    errors = []
    for sub in (None, "vae"):  # a VAE repository, or a model repository with vae/
        try:
            return AutoencoderKL.from_pretrained(model_id, subfolder=sub, torch_dtype=dtype)
        except Exception as e:  # offline, unknown id, or not at this place
            errors.append(type(e).__name__)
    raise CheckpointError(f"{model_id}: not a local VAE file or folder, and loading it as a Hugging Face model id "
                          f"failed ({', '.join(errors)}); download it and pass a local file or folder to --vae")


_OLD_VAE_ATTN = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.", "proj_attn.": "to_out.0."}


def _diffusers_vae_as_ldm(reader, shapes: Mapping[str, Sequence[int]]):
    """Shapes and a getter in original-VAE names for a VAE file in diffusers layout (also pre-0.14 attention names)."""
    n_levels = len(lc._indices(shapes, "encoder.down_blocks."))
    to_file: dict[str, tuple[str, str]] = {}
    new_shapes = {}
    for key, shape in shapes.items():
        name = key
        for old, new in _OLD_VAE_ATTN.items():
            name = name.replace(".attentions.0." + old, ".attentions.0." + new)
        try:
            ldm, kind = lc._vae_ldm_name(name, n_levels)
        except KeyError:
            continue
        to_file[ldm] = (key, kind)
        new_shapes[ldm] = tuple(shape) + ((1, 1) if kind == "conv1x1" and len(shape) == 2 else ())

    def get(ldm_key: str) -> torch.Tensor:
        key, kind = to_file[ldm_key]
        t = reader.get(key)
        return t[:, :, None, None] if kind == "conv1x1" and t.ndim == 2 else t

    return new_shapes, get


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def load_tokenizers(family: str, folder: str | os.PathLike | None = None,
                    tokenizer_cache_dir: str | os.PathLike | None = None, hub_model: str | None = None) -> list:
    """The tokenizer(s) of `family`: from a Diffusers folder, `tokenizer_cache_dir`, or the hub (then cached)."""
    out = []
    for i, kind in enumerate(FAMILY_TOKENIZERS[family]):
        sub = "tokenizer" if i == 0 else "tokenizer_2"
        tok = None
        if folder is not None and (Path(folder) / sub).is_dir():
            tok = _load_tokenizer_folder(Path(folder) / sub)
        if tok is None and hub_model is not None:
            tok = _try_hub_tokenizer(hub_model, sub)
        cache = Path(tokenizer_cache_dir) / TOKENIZER_IDS[kind].replace("/", "_") if tokenizer_cache_dir else None
        if tok is None and cache is not None and cache.is_dir():
            tok = _load_tokenizer_folder(cache)
        if tok is None:
            tok = _try_hub_tokenizer(TOKENIZER_IDS[kind], "tokenizer" if kind == "sd2" else None)
            if tok is None:
                where = f"{cache}" if cache is not None else "--tokenizer_cache_dir (not given)"
                raise CheckpointError(
                    f"no tokenizer for {FAMILY_NAMES[family]}: not found in {where} and the Hugging Face hub is "
                    f"unreachable for {TOKENIZER_IDS[kind]}; pass --tokenizer_cache_dir DIR holding "
                    f"{TOKENIZER_IDS[kind].replace('/', '_')}/ (saved there after one online run)")
            if cache is not None:
                tok.save_pretrained(str(cache))
        out.append(_normalize_tokenizer(tok, openclip=kind != "clip"))
    return out


def _try_hub_tokenizer(model_id: str, subfolder: str | None):
    from transformers import CLIPTokenizer

    try:
        tok = CLIPTokenizer.from_pretrained(model_id, subfolder=subfolder) if subfolder else \
            CLIPTokenizer.from_pretrained(model_id)
    except Exception as e:  # offline or missing: the caller reports what to do
        logger.debug("tokenizer %s not loaded from the hub: %s", model_id, e)
        return None
    # transformers 5 returns an empty tokenizer (only the special tokens) when the files are unreachable
    return tok if _has_vocabulary(tok) else None


def _has_vocabulary(tok) -> bool:
    return len(tok) > 1000


def _load_tokenizer_folder(folder: Path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder))
    if not _has_vocabulary(tok):
        raise CheckpointError(f"{folder}: not a CLIP tokenizer folder (no vocab.json/merges.txt or tokenizer.json)")
    return tok


def _normalize_tokenizer(tok, openclip: bool):
    if tok.model_max_length > 1000:
        tok.model_max_length = 77
    if openclip and tok.pad_token != "!":
        tok.pad_token = "!"  # OpenCLIP pads with "!" (id 0), as SD2 and SDXL's second encoder were trained
    return tok


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_models(components: ModelComponents, path: str | os.PathLike, save_precision: str | None = None, *,
                metadata: Mapping[str, str] | None = None, epoch: int | None = None,
                global_step: int | None = None) -> None:
    """Save to a single file (.safetensors / .ckpt, original layout) or, for any other path, a Diffusers folder.

    Written atomically; refuses to overwrite the files the components were loaded from. `save_precision`
    is float / fp16 / bf16 (None keeps the models' dtypes). `epoch` / `global_step` go into a .ckpt dict
    (as the original scripts do) and into safetensors metadata.
    """
    dtype = precision_dtype(save_precision)
    refuse_overwrite(path, list(getattr(components, "sources", [])), "output path")
    if str(path).lower().endswith((".safetensors", ".ckpt", ".pt")):
        _save_single_file(components, Path(path), dtype, metadata, epoch, global_step)
    else:
        _save_diffusers(components, Path(path), dtype)
    logger.info("saved model to %s", path)


def _save_single_file(comps: ModelComponents, path: Path, dtype, metadata, epoch, global_step) -> None:
    sd = lc.models_to_ldm(comps.arch, comps.unet, comps.vae, comps.text_encoders)
    info = {k: v for k, v in (("epoch", epoch), ("global_step", global_step)) if v is not None}
    if path.suffix.lower() == ".safetensors":
        write_safetensors(sd, path, {**(metadata or {}), **{k: str(v) for k, v in info.items()}}, dtype)
        return
    cast = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
            for k, v in sd.items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": cast, "epoch": epoch or 0, "global_step": global_step or 0}, tmp)


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write tensors to a safetensors file one at a time (casting floats to `dtype`), atomically."""
    from library.tensor_stream import SafetensorsWriter

    keys = sorted(tensors)
    out_dtype = {k: dtype if dtype is not None and tensors[k].is_floating_point() else tensors[k].dtype for k in keys}
    layout = [(k, out_dtype[k], tuple(tensors[k].shape)) for k in keys]
    with atomic_path(path) as tmp:
        with SafetensorsWriter(tmp, layout, metadata) as w:
            for k in keys:
                w.write(k, tensors[k].detach().to(out_dtype[k]))


def _save_diffusers(comps: ModelComponents, path: Path, dtype) -> None:
    import diffusers

    tmp = temp_dir_beside(path)
    try:
        _write_diffusers_model(comps.unet, tmp / "unet", dtype)
        if comps.vae is not None:
            _write_diffusers_model(comps.vae, tmp / "vae", dtype)
        for name, te in zip(lc.TE_COMPONENTS, comps.text_encoders):
            _write_transformers_model(te, tmp / name, dtype)
        if len(comps.tokenizers) < len(comps.text_encoders):
            logger.warning("%s: no tokenizers to save; the Diffusers folder lacks tokenizer/ (load the model with "
                           "its tokenizers to include them)", path)
        for name, tok in zip(("tokenizer", "tokenizer_2"), comps.tokenizers):
            tok.save_pretrained(str(tmp / name))
        sched_cls = "EulerDiscreteScheduler" if comps.is_sdxl else "DDIMScheduler"
        sched = dict(comps.scheduler_config, _class_name=sched_cls, _diffusers_version=diffusers.__version__,
                     prediction_type="v_prediction" if comps.v_parameterization else "epsilon")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2), encoding="utf-8")
        index: dict[str, Any] = {
            "_class_name": "StableDiffusionXLPipeline" if comps.is_sdxl else "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", sched_cls], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
        }
        if comps.is_sdxl:
            index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                         tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)
        else:
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_diffusers_model(model, folder: Path, dtype) -> None:
    folder.mkdir(parents=True)
    model.save_config(str(folder))
    write_safetensors(model.state_dict(), folder / "diffusion_pytorch_model.safetensors", {"format": "pt"}, dtype)


def _write_transformers_model(model, folder: Path, dtype) -> None:
    import copy

    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(folder))
    # Keys in the hub's form (`text_model.*`), which transformers 4 and 5 both read.
    sd = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
          for k, v in model.state_dict().items()}
    write_safetensors(sd, folder / "model.safetensors", {"format": "pt"}, dtype)
