"""Write a deterministic random-weight Stable Diffusion model (SD1, SD2, SD2-v, SDXL) for tests and benchmarks.

`tiny` keeps the real key layout, block structure and module names with small widths (a few MB); `full` has the
real SD1.5 / SD2.1 / SDXL sizes. `--format ldm` writes a single file (.safetensors or .ckpt) plus a tokenizer
folder beside it (pass it with --tokenizer_cache_dir); `--format diffusers` writes a Diffusers folder with
its tokenizer(s).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.sd_configs import ARCHS, SIZES, arch_config, build_models, write_clip_tokenizer_files

logger = logging.getLogger("make_tiny_model")


def tokenizer_cache_dir_for(output: str | os.PathLike) -> Path:
    """The tokenizer folder written beside a single-file model: `<name>_tokenizers/` (no extension)."""
    p = Path(output)
    return p.with_name(p.stem + "_tokenizers")


def write_tokenizers(arch: str, cache_dir: str | os.PathLike) -> Path:
    """Write the small tokenizers of `arch` into `cache_dir` in the --tokenizer_cache_dir layout."""
    from library.model_loading import FAMILY_TOKENIZERS, TOKENIZER_IDS

    cfg = arch_config(arch, "tiny")
    for kind_id, tok_kind in zip(FAMILY_TOKENIZERS[cfg.arch], cfg.tokenizer_kinds):
        write_clip_tokenizer_files(str(Path(cache_dir) / TOKENIZER_IDS[kind_id].replace("/", "_")), tok_kind)
    return Path(cache_dir)


def make_model(arch: str, size: str, fmt: str, output: str | os.PathLike, seed: int = 0) -> Path | None:
    """Build and write the model; returns the tokenizer cache folder for single files, else None."""
    from library.model_loading import save_models

    if fmt not in ("ldm", "diffusers"):
        raise ValueError(f"unknown --format {fmt!r}; expected ldm or diffusers")
    out = Path(output)
    is_file = out.suffix.lower() in (".safetensors", ".ckpt")
    if fmt == "ldm" and not is_file:
        raise ValueError(f"--output {out}: a single-file (ldm) model needs a .safetensors or .ckpt name")
    if fmt == "diffusers" and is_file:
        raise ValueError(f"--output {out}: a Diffusers model is a folder; drop the {out.suffix} extension")
    comps = build_models(arch, size, seed=seed)
    save_models(comps, out)
    if fmt == "diffusers":
        return None
    return write_tokenizers(arch, tokenizer_cache_dir_for(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", required=True, choices=ARCHS, help="architecture: sd1, sd2 (512-base), sd2-v (768-v), sdxl")
    p.add_argument("--size", default="tiny", choices=SIZES, help="tiny (a few MB) or full (real sizes); default tiny")
    p.add_argument("--format", default="ldm", choices=("ldm", "diffusers"),
                   help="ldm: single file in the original layout; diffusers: Diffusers folder; default ldm")
    p.add_argument("--output", required=True, help="output .safetensors/.ckpt file (ldm) or folder (diffusers)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    try:
        cache = make_model(args.arch, args.size, args.format, args.output, args.seed)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    logger.info("wrote %s %s model to %s", args.size, args.arch, args.output)
    if cache is not None:
        logger.info("tokenizers are in %s: pass --tokenizer_cache_dir %s when loading this file", cache, cache)


if __name__ == "__main__":
    main()
