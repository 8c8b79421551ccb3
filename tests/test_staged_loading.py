"""U-Net-only training on cached latents and text-encoder outputs reads the U-Net after the caches are built and the
VAE and text encoders are dropped (peak memory: the larger set, not the sum), with the same result."""
from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.train_helpers import base_args, solid_dataset, train


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory) -> tuple[str, str]:
    from tools.make_tiny_model import make_model

    ckpt = tmp_path_factory.mktemp("m") / "tiny_sdxl.safetensors"
    tokenizers = make_model("sdxl", "tiny", "ldm", ckpt, seed=0)
    return str(ckpt), str(tokenizers)


def _run(sdxl_file, tmp_path: Path, name: str, *extra: str) -> dict:
    ckpt, tokenizers = sdxl_file
    data = solid_dataset(tmp_path / "data", repeats=2)
    out = tmp_path / name
    train(base_args(ckpt, data, out, "--tokenizer_cache_dir", tokenizers, "--max_train_steps", "2",
                    "--network_train_unet_only", *extra), sdxl=True)
    return load_file(str(out / "lora.safetensors"))


def _spy_on_unet_load(monkeypatch) -> tuple[list[dict], list]:
    """What is alive while the U-Net's weights are read: weak references to the VAE and text encoders, taken as
    they load, must be dead by then (nothing may keep them, or the peak is the sum again)."""
    from library import model_loading

    seen: list[dict] = []
    loaded: list[weakref.ref] = []
    original_fill = model_loading._fill

    def fill(model, component, *args):
        if component == "unet":
            gc.collect()
            seen.append({"vae_and_text_encoders_freed": bool(loaded) and all(ref() is None for ref in loaded)})
        else:
            loaded.append(weakref.ref(model))
        return original_fill(model, component, *args)

    monkeypatch.setattr(model_loading, "_fill", fill)
    return seen, loaded


def test_unet_is_read_after_the_caches_with_the_same_result(sdxl_file, tmp_path, monkeypatch):
    seen, loaded = _spy_on_unet_load(monkeypatch)
    staged = _run(sdxl_file, tmp_path, "staged", "--cache_text_encoder_outputs")
    assert seen == [{"vae_and_text_encoders_freed": True}]

    from library.network_trainer import NetworkTrainer

    monkeypatch.setattr(NetworkTrainer, "_unet_can_wait", lambda self: False)
    seen.clear()
    loaded.clear()
    together = _run(sdxl_file, tmp_path, "together", "--cache_text_encoder_outputs")
    assert seen == [{"vae_and_text_encoders_freed": False}]
    assert staged.keys() == together.keys() and any(v.abs().sum() > 0 for k, v in staged.items() if "up" in k)
    for key, value in staged.items():
        assert (value == together[key]).all(), key


def test_unet_is_read_first_when_the_text_encoders_still_work(sdxl_file, tmp_path, monkeypatch):
    seen, loaded = _spy_on_unet_load(monkeypatch)
    # captions change every step (shuffled tags), so the text encoders' outputs cannot be cached: all load at once
    _run(sdxl_file, tmp_path, "te", "--shuffle_caption", "--caption_tag_dropout_rate", "0.5")
    assert seen == [{"vae_and_text_encoders_freed": False}]
