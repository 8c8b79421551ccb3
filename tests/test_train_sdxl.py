"""sdxl_train_network.py on a tiny SDXL model: learning, cached text-encoder outputs, size conditioning,
diffusers compatibility of the saved LoRA, refused combinations."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from library.file_io import load_state_dict, read_metadata
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


@pytest.fixture(scope="module")
def model():
    return tiny_model_dir(arch="sdxl")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("data"), repeats=2)


def fixed_loss(trainer, multiplier: float, seed: int = 7) -> float:
    """The training loss of the first batch at a fixed noise draw, with the network at `multiplier`."""
    trainer.dataset.set_epoch(1)
    net = trainer.accelerator.unwrap_model(trainer.network)
    net.set_multiplier(multiplier)
    batch = trainer.dataset[0]
    batch["noise_seeds"] = torch.full_like(batch["noise_seeds"], seed)  # each sample's noise and timestep
    with torch.no_grad():
        loss = trainer.loss(batch).item()
    net.set_multiplier(1.0)
    return loss


def test_sdxl_loss_falls_and_lora_matches_diffusers_pipeline(model, dataset, tmp_path):
    out = tmp_path / "out"
    trainer = train(base_args(model, dataset, out, "--max_train_steps", "40", "--learning_rate", "3e-2",
                              "--min_timestep", "500", "--max_timestep", "501", "--network_train_unet_only",
                              "--cache_text_encoder_outputs", "--gradient_checkpointing",
                              "--bucket_reso_steps", "32"), sdxl=True)
    assert trainer.components.text_encoders == [None, None]  # freed once their outputs were cached
    assert trainer.components.vae is None  # latents cached, no sampling: the VAE left memory too
    before = fixed_loss(trainer, 0.0) + fixed_loss(trainer, 0.0, seed=8)
    after = fixed_loss(trainer, 1.0) + fixed_loss(trainer, 1.0, seed=8)
    assert after < 0.93 * before, (before, after)
    path = out / "lora.safetensors"
    meta = read_metadata(path)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    sd = load_state_dict(path)
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sd)  # SGM-style names as kohya writes

    from diffusers import StableDiffusionXLPipeline

    from library.model_loading import load_models

    fresh = load_models(model, sdxl=True)
    pipe = StableDiffusionXLPipeline(vae=fresh.vae, text_encoder=fresh.text_encoders[0],
                                     text_encoder_2=fresh.text_encoders[1], tokenizer=fresh.tokenizers[0],
                                     tokenizer_2=fresh.tokenizers[1], unet=fresh.unet,
                                     scheduler=__import__("diffusers").EulerDiscreteScheduler())
    pipe.load_lora_weights(dict(sd))
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 72, generator=g)
    added = {"text_embeds": torch.randn(1, 24, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        expected = trainer.components.unet(x, torch.tensor([400]), cond, added_cond_kwargs=added).sample
        got = pipe.unet(x, torch.tensor([400]), cond, added_cond_kwargs=added).sample
        pipe.unet.disable_lora()
        untouched = pipe.unet(x, torch.tensor([400]), cond, added_cond_kwargs=added).sample
        pipe.unet.enable_lora()
    assert (untouched - expected).abs().max() > 1e-3  # the LoRA changes the output measurably
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_cached_and_uncached_text_encoder_outputs_give_the_same_losses(model, dataset, tmp_path):
    # SGD: Adam's first step (about lr * sign(grad)) would turn float rounding in near-zero gradients into
    # visible weight differences; the claim here is about the conditioning, which must be the same.
    common = ("--max_train_steps", "3", "--network_train_unet_only", "--optimizer_type", "SGDNesterov",
              "--learning_rate", "0.05")
    # without cached latents (U-Net-only training on cached latents caches the outputs automatically)
    def argv(out, *extra):
        return [a for a in base_args(model, dataset, tmp_path / out, *common, *extra) if a != "--cache_latents"]

    cached = train(argv("a", "--cache_text_encoder_outputs"), sdxl=True)
    plain = train(argv("b"), sdxl=True)
    assert cached.te_cache is not None and plain.te_cache is None
    plain.dataset.set_epoch(1)
    batch = plain.dataset[0]
    hidden, pooled = plain.conditioning(batch)
    c_hidden, c_pooled = cached.conditioning(batch)
    torch.testing.assert_close(c_hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(c_pooled, pooled, rtol=0, atol=1e-6)
    assert cached.step_losses == pytest.approx(plain.step_losses, rel=1e-5)


def test_size_conditioning_matches_the_bucket_crop(model, tmp_path, monkeypatch):
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    Image.fromarray(np.full((64, 100, 3), 120, np.uint8)).save(img_dir / "wide.png")  # 100 wide, 64 high
    (img_dir / "wide.caption").write_text("sks wide")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\ncaption_extension = ".caption"\n[[datasets]]\nresolution = 96\nenable_bucket = true\n'
                    f'min_bucket_reso = 32\nmax_bucket_reso = 160\nbucket_reso_steps = 32\n'
                    f'[[datasets.subsets]]\nimage_dir = "{img_dir.as_posix()}"\n')
    seen = []
    from diffusers import UNet2DConditionModel

    original = UNet2DConditionModel.forward

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        seen.append((tuple(sample.shape), kwargs["added_cond_kwargs"]["time_ids"].clone()))
        return original(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    trainer = train(base_args(model, str(toml), tmp_path / "out", "--max_train_steps", "1",
                              "--network_train_unet_only"), sdxl=True)
    info = trainer.dataset.images[0]
    bucket_w, bucket_h = info.bucket_reso
    resized_w, resized_h = info.resized_size
    assert (bucket_w, bucket_h) != (64, 64) and bucket_w > bucket_h  # a wide bucket was chosen
    top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    shape, time_ids = seen[0]
    assert shape == (1, 4, bucket_h // 8, bucket_w // 8)
    assert time_ids.tolist() == [[64.0, 100.0, float(top), float(left), float(bucket_h), float(bucket_w)]]


@pytest.mark.parametrize("extra, general, message", [
    (["--cache_text_encoder_outputs"], "", "needs --network_train_unet_only"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only"], "shuffle_caption = true",
     "shuffle_caption cannot be used with --cache_text_encoder_outputs"),
    (["--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--caption_dropout_rate", "0.1"], "",
     "--cache_text_encoder_outputs cannot be used with --caption_dropout_rate"),
    (["--weighted_captions"], "", "--weighted_captions is not supported for SDXL"),
])
def test_refused_combinations_fail_before_any_model_loads(model, tmp_path, monkeypatch, extra, general, message):
    from library import network_trainer

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(network_trainer, "load_components", refuse)
    data = solid_dataset(tmp_path, extra_general=general)
    with pytest.raises(SystemExit) as e:
        network_trainer.main(base_args(model, data, tmp_path / "out", *extra), sdxl=True)
    assert message in str(e.value)


def test_docs_worked_example(model, tmp_path, monkeypatch, capsys):
    """The worked example of docs/sdxl_train_network.md, with the tiny model of the test cache."""
    import re
    import shlex
    from pathlib import Path

    from library.network_trainer import main
    from tests.train_helpers import reset_accelerate

    root = Path(__file__).resolve().parent.parent
    doc = (root / "docs" / "sdxl_train_network.md").read_text()
    command = re.search(r"python sdxl_train_network.py (.*?)\n```", doc, re.S).group(1)
    argv = shlex.split(command.replace("\\\n", " "))
    argv[argv.index("--pretrained_model_name_or_path") + 1] = model
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    monkeypatch.chdir(root)
    reset_accelerate()
    main(argv, sdxl=True)
    assert f"LoRA saved: {tmp_path / 'out' / 'lora.safetensors'}" in capsys.readouterr().out
    assert read_metadata(tmp_path / "out" / "lora.safetensors")["ss_steps"] == "8"


def test_sdxl_block_dims_and_block_lr_weights(model, dataset, tmp_path):
    dims = [2] * 10 + [4] * 3 + [8] * 10  # 23 values: in 0..9 (time embed + 9 input), 3 mid, 9 output + out
    weights = ",".join(["0"] * 3 + ["1"] * 6)  # 9 down blocks: the first three not trained
    trainer = train(base_args(model, dataset, tmp_path / "out", "--max_train_steps", "1", "--network_train_unet_only",
                              "--network_args", f"block_dims={','.join(map(str, dims))}",
                              f"block_alphas={','.join(map(str, dims))}", f"down_lr_weight={weights}",
                              "mid_lr_weight=1,1,1", "up_lr_weight=" + ",".join(["1"] * 9)), sdxl=True)
    sd = load_state_dict(tmp_path / "out" / "lora.safetensors")
    ranks = {k.split(".")[0]: v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")}
    mids = [r for k, r in ranks.items() if k.startswith("lora_unet_middle_block")]
    outs = [r for k, r in ranks.items() if k.startswith("lora_unet_output_blocks")]
    ins = [r for k, r in ranks.items() if k.startswith("lora_unet_input_blocks")]
    assert mids and set(mids) == {4} and outs and set(outs) == {8} and ins and set(ins) == {2}
    names = [n for n in trainer.lr_logs() if not n.startswith("lr/d*lr")]
    assert len(names) > 2  # one parameter group per block with block learning rates
    meta = read_metadata(tmp_path / "out" / "lora.safetensors")
    assert "block_dims" in meta["ss_network_args"]
