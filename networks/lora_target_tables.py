"""The LoRA targets of a checkpoint layout as a plain table, cached, so the tools need not import diffusers.

`networks.lora_names` defines the targets on models; building even empty (meta-device) models means importing
diffusers and transformers, several seconds that a merge or extract otherwise does not need. The table
(`[name, component, path, kind, weight shape, c3lier_only]` rows, c3lier_only "extra" for conv_in / conv_out /
embeddings, which only LyCORIS-style files adapt, plus the accepted aliases) is looked up in:

1. the user cache `~/.cache/sd-lora-suite/lora_targets/` (or `$SD_LORA_SUITE_CACHE/lora_targets/`), keyed by
   the configs and the source of `lora_names.py` / `unet_layout.py` (a code change invalidates it);
2. the tables shipped in `networks/lora_target_tables/` for the real SD 1.x, SD 2.x (512 and 768-v) and SDXL
   sizes, keyed by the configs (`tests/test_merge_lora.py` checks they equal a fresh computation; regenerate
   with `python -m networks.lora_target_tables`);
3. otherwise it is computed from meta-device models and stored in the user cache.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from library import ldm_convert as lc
from library.file_io import atomic_path

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "lora_target_tables"
SHIPPED_ARCHS = ("sd1", "sd2", "sd2-v", "sdxl")


def meta_models(layout: lc.LdmLayout):
    """UNet and text encoders of the layout on the meta device (names and shapes only, no memory).

    Like `library.model_loading.empty_models_for_layout` without the VAE, importing only the UNet module of
    diffusers: `from diffusers import ...` loads every model class.
    """
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    from library.sd_configs import build_text_encoder

    with torch.device("meta"):
        unet = UNet2DConditionModel(**layout.unet_config)
        tes = [build_text_encoder(cfg) for cfg in layout.text_encoder_configs]
    return unet, tes


def build_target_table(layout: lc.LdmLayout) -> dict:
    """The table computed from `lora_names` on meta-device models of the layout."""
    from networks.lora_names import LoRANameResolver, lora_targets

    unet, tes = meta_models(layout)
    resolver = LoRANameResolver(tes, unet, sdxl=layout.is_sdxl)
    lierla = lora_targets(tes, unet, sdxl=layout.is_sdxl, include_conv3x3=False)
    c3lier = lora_targets(tes, unet, sdxl=layout.is_sdxl, include_conv3x3=True)
    return {"targets": [[n, t.component, t.path, t.kind, list(t.module.weight.shape),
                         (n not in lierla) if n in c3lier else "extra"]
                        for n, t in resolver.targets.items()],
            "aliases": dict(resolver.aliases)}


def config_key(layout: lc.LdmLayout) -> str:
    blob = json.dumps([layout.unet_config, layout.text_encoder_configs, layout.is_sdxl], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _user_cache_file(layout: lc.LdmLayout) -> Path:
    from library import unet_layout
    from networks import lora_names

    h = hashlib.sha256(config_key(layout).encode())
    for module in (lora_names, unet_layout):
        h.update(Path(module.__file__).read_bytes())
    base = os.environ.get("SD_LORA_SUITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sd-lora-suite")
    return Path(base) / "lora_targets" / f"{h.hexdigest()[:24]}.json"


def target_table(layout: lc.LdmLayout) -> dict:
    """The target table of the layout: user cache, shipped table, or computed (then cached)."""
    cache = _user_cache_file(layout)
    for path in (cache, SHIPPED_DIR / f"{config_key(layout)}.json.gz"):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            return json.loads(raw)
        except (OSError, ValueError):
            continue
    table = build_target_table(layout)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            Path(tmp).write_text(json.dumps(table))
    except OSError as e:
        logger.debug("cannot cache the LoRA target table in %s: %s", cache, e)
    return table


def real_size_layout(arch: str) -> lc.LdmLayout:
    """The layout `infer_layout` gives a real-size checkpoint of `arch` (from meta-device models' shapes)."""
    from library.sd_configs import build_models

    models = build_models(arch, "full", meta=True, tokenizers=False)
    sd = lc.models_to_ldm(models.arch, models.unet, models.vae, models.text_encoders)
    return lc.infer_layout({k: tuple(v.shape) for k, v in sd.items()}, arch,
                           v_parameterization=models.v_parameterization)


def write_shipped_tables() -> list[Path]:
    """(Re)write the shipped tables of the real-size architectures."""
    SHIPPED_DIR.mkdir(exist_ok=True)
    written = []
    for arch in SHIPPED_ARCHS:
        layout = real_size_layout(arch)
        path = SHIPPED_DIR / f"{config_key(layout)}.json.gz"
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(gzip.compress(json.dumps(build_target_table(layout)).encode(), mtime=0))
        written.append(path)
        logger.info("%s: %s", arch, path.name)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_shipped_tables()
