"""--masked_loss with mask images in a subset's conditioning_data_dir: masks follow the image through bucketing,
crop and flip, the latent cache stores them, and masked-out pixels do not train."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.train_helpers import base_args, parse, train


def _masked_dataset(root, mask_fn, size=(96, 64), extra=""):
    """One image whose red channel equals its mask (so the processed mask must equal the processed red channel)."""
    img_dir, mask_dir = root / "img", root / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir()
    w, h = size
    mask = mask_fn(np.mgrid[0:h, 0:w])
    rgb = np.dstack([mask, np.full((h, w), 60, np.uint8), np.full((h, w), 90, np.uint8)])
    Image.fromarray(rgb).save(img_dir / "a.png")
    (img_dir / "a.caption").write_text("sks")
    Image.fromarray(mask).save(mask_dir / "a.png")
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".caption"\n[[datasets]]\nresolution = 64\nenable_bucket = true\n'
                    f'min_bucket_reso = 64\nmax_bucket_reso = 128\n{extra}\n[[datasets.subsets]]\n'
                    f'image_dir = "{img_dir.as_posix()}"\nconditioning_data_dir = "{mask_dir.as_posix()}"\n'
                    "flip_aug = true\n")
    return str(toml)


def _ramp(grid):
    y, x = grid
    return ((x * 255) // x.max()).astype(np.uint8)  # left black -> right white


def _batches(args, cache=False):
    from library.datasets import build_dataset_group

    group = build_dataset_group(args, None)
    if cache:
        from library.model_loading import load_models

        group.cache_latents(load_models(args.pretrained_model_name_or_path).vae, progress=False)
    out = {}
    for epoch in range(1, 12):
        group.set_epoch(epoch)
        batch = group[0]
        out[batch["flipped"][0]] = batch
    return out


def test_mask_follows_bucketing_crop_and_flip_and_is_cached(model, tmp_path):
    args = parse(base_args(model, _masked_dataset(tmp_path, _ramp), tmp_path / "out", "--masked_loss"))
    batches = _batches(args)
    assert set(batches) == {False, True}  # both flips seen
    for flipped, batch in batches.items():
        mask = batch["alpha_masks"][0]
        red = (batch["images"][0, 0] + 1) / 2  # image in [-1, 1]
        assert mask.shape == red.shape
        torch.testing.assert_close(mask, red, atol=1 / 255 + 1e-6, rtol=0)
        row = mask[mask.shape[0] // 2]
        assert (row[-1] > row[0]) != flipped  # the ramp rises to the right unless flipped
    cached = _batches(args, cache=True)
    for flipped, batch in cached.items():
        assert "latents" in batch
        torch.testing.assert_close(batch["alpha_masks"][0], batches[flipped]["alpha_masks"][0])


def test_black_mask_trains_nothing_and_half_mask_trains(model, tmp_path):
    black = _masked_dataset(tmp_path / "black", lambda g: np.zeros(g[0].shape, np.uint8))
    opts = ("--masked_loss", "--max_train_steps", "3", "--network_train_unet_only", "--learning_rate", "1e-2")
    trainer = train(base_args(model, black, tmp_path / "o1", *opts))
    assert trainer.step_losses == [0.0, 0.0, 0.0]
    net = trainer.accelerator.unwrap_model(trainer.network)
    assert all(float(m.lora_up.weight.detach().abs().max()) == 0.0 for m in net.unet_loras)  # no gradient ever
    from library.file_io import read_metadata

    assert read_metadata(tmp_path / "o1" / "lora.safetensors")["ss_masked_loss"] == "True"
    half = _masked_dataset(tmp_path / "half", lambda g: np.where(g[1] < g[1].max() / 2, 0, 255).astype(np.uint8))
    trainer = train(base_args(model, half, tmp_path / "o2", *opts))
    assert all(loss > 0 for loss in trainer.step_losses)


def test_errors_name_the_subset_and_what_is_missing(model, tmp_path):
    from library.dataset_config import load_dataset_config

    toml = _masked_dataset(tmp_path, _ramp)
    with pytest.raises(ValueError, match=r"subsets\[0\]: conditioning_data_dir needs --masked_loss"):
        load_dataset_config(parse(base_args(model, toml, tmp_path / "out")))
    (tmp_path / "masks" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no mask image for a\.png"):
        load_dataset_config(parse(base_args(model, toml, tmp_path / "out", "--masked_loss")))
    plain = tmp_path / "plain.toml"
    plain.write_text(open(toml).read().replace("conditioning_data_dir", "# conditioning_data_dir"))
    with pytest.raises(ValueError, match="--masked_loss: no subset has masks"):
        load_dataset_config(parse(base_args(model, str(plain), tmp_path / "out", "--masked_loss")))
