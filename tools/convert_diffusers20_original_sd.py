"""Convert a Stable Diffusion model between a single-file checkpoint and a Diffusers folder (SD 1.x, 2.x, SDXL).

The direction follows the output path: a name ending in .safetensors / .ckpt is written as a single file in the
original (CompVis / Stability) layout, anything else as a Diffusers folder. The input may be either as well, or a
single file may be re-saved as a single file (e.g. to change precision). The family (SD 1.x / 2.x / SDXL) is
read from the model itself; --v1 / --v2 / --sdxl, when given, are checked against it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

logger = logging.getLogger("convert_diffusers20_original_sd")
SINGLE_FILE = (".safetensors", ".ckpt")
FLAG_FAMILY = {"--v1": "sd1", "--v2": "sd2", "--sdxl": "sdxl"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_to_load", help="model to convert: .safetensors/.ckpt file or Diffusers folder (or hub id)")
    p.add_argument("model_to_save", help="output: .safetensors/.ckpt for a single file, any other path for a "
                                         "Diffusers folder")
    fam = p.add_argument_group("model family (optional: read from the model; when given, it must match)")
    fam.add_argument("--v1", action="store_true", help="the model is SD 1.x")
    fam.add_argument("--v2", action="store_true", help="the model is SD 2.x")
    fam.add_argument("--sdxl", action="store_true", help="the model is SDXL")
    fam.add_argument("--v_parameterization", action="store_true",
                     help="SD 2.x 768-v model: the Diffusers output's scheduler predicts v (read from a Diffusers "
                          "input's scheduler otherwise)")
    prec = p.add_argument_group("precision")
    prec.add_argument("--fp16", action="store_true", help="load in fp16 and save as fp16")
    prec.add_argument("--bf16", action="store_true", help="save as bf16")
    prec.add_argument("--float", action="store_true", help="save as float32")
    prec.add_argument("--save_precision_as", choices=("fp16", "bf16", "float"), default=None,
                      help="precision of the saved model (overrides --fp16/--bf16/--float); default: as loaded "
                           "(float32)")
    out = p.add_argument_group("output")
    out.add_argument("--epoch", type=int, default=0, help="epoch written into the checkpoint (default 0)")
    out.add_argument("--global_step", type=int, default=0, help="global_step written into the checkpoint (default 0)")
    out.add_argument("--use_safetensors", action="store_true",
                     help="accepted for compatibility: Diffusers folders are always written as safetensors; a single "
                          "file's format follows its extension")
    out.add_argument("--unet_use_linear_projection", action="store_true",
                     help="accepted for compatibility: the projection type is read from the checkpoint")
    src = p.add_argument_group("other inputs")
    src.add_argument("--reference_model", default=None,
                     help="optional Diffusers folder (or hub id) whose tokenizers are written into a Diffusers output; "
                          "built-in configs are used for everything else")
    src.add_argument("--tokenizer_cache_dir", default=None,
                     help="folder with cached tokenizers (DIR/openai_clip-vit-large-patch14/, ...) for a single-file "
                          "input converted to Diffusers")
    src.add_argument("--vae", default=None, help="replace the VAE by this one (single file or Diffusers folder)")
    return p


def _save_precision(args: argparse.Namespace) -> str | None:
    if args.save_precision_as:
        return args.save_precision_as
    chosen = [name for name, on in (("fp16", args.fp16), ("bf16", args.bf16), ("float", args.float)) if on]
    if len(chosen) > 1:
        raise ValueError(f"--{' and --'.join(chosen)} conflict; give one of --fp16, --bf16, --float")
    return chosen[0] if chosen else None


def convert(args: argparse.Namespace) -> None:
    import torch

    from library.file_io import refuse_overwrite
    from library.model_loading import FAMILY_NAMES, detect_model_family, load_models, load_tokenizers, save_models

    flags = [name for name, on in (("--v1", args.v1), ("--v2", args.v2), ("--sdxl", args.sdxl)) if on]
    if len(flags) > 1:
        raise ValueError(f"{' and '.join(flags)} conflict; give at most one of --v1, --v2, --sdxl")
    precision = _save_precision(args)
    refuse_overwrite(args.model_to_save, [args.model_to_load, args.vae], "model_to_save")
    to_diffusers = not args.model_to_save.lower().endswith(SINGLE_FILE)
    local = Path(args.model_to_load).exists()
    family = detect_model_family(args.model_to_load) if local else None
    if family is not None:
        if flags and FLAG_FAMILY[flags[0]] != family:
            right = next(f for f, fam in FLAG_FAMILY.items() if fam == family)
            raise ValueError(f"{args.model_to_load}: is an {FAMILY_NAMES[family]} model, but {flags[0]} was given; "
                             f"use {right} or leave the flag out")
        v2, sdxl = family == "sd2", family == "sdxl"
    else:
        v2, sdxl = args.v2, (True if args.sdxl else False if flags else None)
    use_reference = to_diffusers and args.reference_model is not None
    comps = load_models(args.model_to_load, v2=v2, sdxl=sdxl, v_parameterization=args.v_parameterization,
                        vae=args.vae, tokenizer_cache_dir=args.tokenizer_cache_dir,
                        dtype=torch.float16 if args.fp16 else None, with_tokenizers=to_diffusers and not use_reference)
    if use_reference:
        ref = args.reference_model
        comps.tokenizers = load_tokenizers(comps.arch, ref if Path(ref).is_dir() else None, args.tokenizer_cache_dir,
                                           hub_model=None if Path(ref).is_dir() else ref)
    save_models(comps, args.model_to_save, precision, epoch=args.epoch, global_step=args.global_step)
    logger.info("converted %s -> %s (%s, %s)", args.model_to_load, args.model_to_save, comps.arch,
                "Diffusers folder" if to_diffusers else "single file")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        convert(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
