"""train_network.py options on a tiny SD1 model: each runs and changes what it should; saves, samples, logs."""
from __future__ import annotations

import os

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


def test_epoch_saves_pruning_state_samples_and_logs(model, tmp_path):
    data = solid_dataset(tmp_path / "d", colours=((200, 0, 0), (0, 0, 200)), caption="sks")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nsks --w 64 --h 64 --d 3 --s 2\nsks blue --w 64 --h 64 --d 4 --s 2 --l 5\n")
    out = tmp_path / "out"
    trainer = train(base_args(model, data, out, "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                              "--save_last_n_epochs", "1", "--save_state", "--sample_prompts", str(prompts),
                              "--sample_every_n_epochs", "2", "--sample_at_first", "--sample_sampler", "euler",
                              "--logging_dir", str(tmp_path / "logs"), "--log_prefix", "run_",
                              "--optimizer_type", "Prodigy", "--learning_rate", "1.0"))
    names = sorted(os.listdir(out))
    assert "lora.safetensors" in names and "lora-000002.safetensors" in names
    assert "lora-000001.safetensors" not in names  # --save_last_n_epochs 1
    assert {"lora-000001-state", "lora-000002-state", "lora-state"} <= set(names)
    assert not [n for n in names if n.startswith(".")]  # no temporary leftovers
    samples = sorted(os.listdir(out / "sample"))
    assert len(samples) == 4 and sum(n.startswith("lora_000000_") for n in samples) == 2
    assert sum(n.startswith("lora_e000002_") for n in samples) == 2
    assert read_metadata(out / "lora-000002.safetensors")["ss_epoch"] == "2"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dirs = [d for d in (tmp_path / "logs").iterdir() if d.name.startswith("run_")]
    events = [str(p) for p in run_dirs[0].rglob("events.out.tfevents*")]
    assert {os.path.dirname(e) for e in events} == {str(run_dirs[0] / "network_train")}  # as docs/train_network.md
    acc = EventAccumulator(os.path.dirname(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/current", "loss/average", "lr/textencoder", "lr/unet", "lr/d*lr/unet"} <= tags
    assert len(acc.Scalars("loss/current")) == 6


@pytest.mark.parametrize("extra, check", [
    (["--network_train_text_encoder_only"], "te_only"),
    (["--clip_skip", "2", "--max_token_length", "225"], "clip"),
    (["--gradient_checkpointing", "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16",
      "--save_precision", "fp16", "--no_metadata"], "ckpt"),
    (["--mixed_precision", "fp16", "--network_train_unet_only"], "fp16"),
    (["--network_module", "networks.dylora", "--network_args", "unit=2", "--network_train_unet_only"], "dylora"),
    (["--scale_weight_norms", "0.05", "--learning_rate", "0.1", "--network_train_unet_only"], "max_norm"),
    (["--mixed_precision", "bf16", "--full_bf16", "--network_train_unet_only"], "full_bf16"),
    (["--mixed_precision", "fp16", "--full_fp16", "--network_train_unet_only", "--optimizer_type", "SGDNesterov",
      "--learning_rate", "0.1"], "full_fp16"),  # AdamW's eps 1e-8 is 0 in fp16: NaN (the run stops, saying so)
    (["--weighted_captions"], "weighted"),
])
def test_options_run_and_change_only_what_they_should(model, dataset, tmp_path, extra, check):
    out = tmp_path / "out"
    steps = ["--max_train_steps", "2"]
    trainer = train(base_args(model, dataset, out, *steps, *extra))
    assert len(trainer.step_losses) == 2 and all(torch.isfinite(torch.tensor(trainer.step_losses)))
    sd = load_state_dict(out / "lora.safetensors")
    meta = read_metadata(out / "lora.safetensors")
    ups = {k: v for k, v in sd.items() if k.endswith("lora_up.weight")}
    if check == "te_only":
        assert sd and all(k.startswith("lora_te_") for k in sd)
        assert any(v.abs().sum() > 0 for v in ups.values())  # trained from the zero init
    elif check == "clip":  # three chunks, and the penultimate layer through the final layer norm
        from library.text_encoding import encode_tokens

        trainer.dataset.set_epoch(1)
        batch = trainer.dataset[0]
        with torch.no_grad():
            hidden, _ = trainer.conditioning(batch)
            c = trainer.components
            skip2, _ = encode_tokens(c.text_encoders, batch["input_ids"], 2, False, tokenizers=c.tokenizers)
            last, _ = encode_tokens(c.text_encoders, batch["input_ids"], 1, False, tokenizers=c.tokenizers)
        assert hidden.shape[1] == 227 and torch.equal(hidden, skip2) and not torch.allclose(hidden, last)
    elif check == "weighted":  # A1111 weights reach the batches and the loss stays finite
        trainer.dataset.set_epoch(1)
        assert "input_weights" in trainer.dataset[0]
    elif check == "max_norm":  # every module's delta weight (up @ down * alpha / dim) is scaled to norm <= 0.05
        for key in [k for k in sd if k.endswith("lora_down.weight")]:
            name = key[: -len(".lora_down.weight")]
            down, up = sd[key].flatten(1), sd[f"{name}.lora_up.weight"].flatten(1)
            scale = sd[f"{name}.alpha"].item() / down.shape[0]
            assert (up @ down * scale).norm().item() <= 0.05 * 1.001
    elif check == "dylora":  # DyLoRA files are LoRA files (rank 4 = network_dim)
        assert meta["ss_network_module"] == "networks.dylora" and '"unit": "2"' in meta["ss_network_args"]
        assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {4}
    elif check == "fp16":  # fp16 autocast and the grad scaler, on CPU as on CUDA; the network stays fp32
        assert trainer.components.unet.dtype == torch.float16 and trainer.precision.scaler is not None
        assert trainer.precision.scaler.get_scale() == 65536.0 and trainer.skipped_steps == 0  # both steps applied
        assert next(iter(sd.values())).dtype == torch.float32 and any(v.abs().sum() > 0 for v in ups.values())
    elif check in ("full_bf16", "full_fp16"):  # the network itself in half precision, and it trains
        dtype = torch.bfloat16 if check == "full_bf16" else torch.float16
        assert trainer.components.unet.dtype == dtype and next(iter(sd.values())).dtype == dtype
        assert any(v.abs().sum() > 0 for v in ups.values())  # full_fp16: the scaler unscaled fp16 gradients
    else:
        assert len(trainer.step_losses) == 2 and trainer.progress.global_step == 2
        assert trainer.plan.steps_per_epoch == 2 and trainer.progress.epoch == 1  # 4 batches, 2 per optimizer step
        ss = {k for k in meta if k.startswith("ss_")}  # --no_metadata keeps what rebuilds the network
        assert ss == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha"}
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
        assert next(iter(sd.values())).dtype == torch.float16




def test_network_weights_and_base_weights(model, dataset, tmp_path):
    first = train(base_args(model, dataset, tmp_path / "a", "--max_train_steps", "3", "--learning_rate", "1e-2",
                            "--network_train_unet_only"))
    lora_a = tmp_path / "a" / "lora.safetensors"
    a = load_state_dict(lora_a)
    # --network_weights: training starts from the file (lr 0 keeps it unchanged)
    train(base_args(model, dataset, tmp_path / "b", "--max_train_steps", "1", "--learning_rate", "0",
                    "--network_train_unet_only", "--network_weights", str(lora_a)))
    b = load_state_dict(tmp_path / "b" / "lora.safetensors")
    assert b.keys() == a.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --dim_from_weights: the rank comes from the file (here 4, although --network_dim says 8)
    argv = base_args(model, dataset, tmp_path / "d", "--max_train_steps", "1", "--learning_rate", "0",
                     "--network_train_unet_only", "--network_weights", str(lora_a), "--dim_from_weights")
    argv[argv.index("--network_dim") + 1] = "8"
    train(argv)
    d = load_state_dict(tmp_path / "d" / "lora.safetensors")
    assert d.keys() == a.keys() and all(torch.equal(a[k], d[k]) for k in a)
    # --base_weights: the file is merged into the model; the new network starts at zero on top of it
    merged = train(base_args(model, dataset, tmp_path / "c", "--max_train_steps", "1", "--learning_rate", "0",
                             "--network_train_unet_only", "--base_weights", str(lora_a),
                             "--base_weights_multiplier", "1.0"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_a = first.components.unet(x, torch.tensor([300]), cond).sample
        got = merged.components.unet(x, torch.tensor([300]), cond).sample
    torch.testing.assert_close(got, with_a, rtol=1e-4, atol=1e-5)


def test_alpha_mask_ignores_transparent_pixels(model, tmp_path):
    import numpy as np
    from PIL import Image

    img_dir = tmp_path / "img"
    img_dir.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    Image.fromarray(rgba, "RGBA").save(img_dir / "clear.png")
    (img_dir / "clear.caption").write_text("sks")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\ncaption_extension = ".caption"\n[[datasets]]\nresolution = 64\n'
                    f'[[datasets.subsets]]\nimage_dir = "{img_dir.as_posix()}"\nalpha_mask = true\n')
    masked = train(base_args(model, str(toml), tmp_path / "a", "--max_train_steps", "2"))
    assert masked.step_losses == [0.0, 0.0]  # every pixel is transparent: nothing to learn
    toml.write_text(toml.read_text().replace("alpha_mask = true", "alpha_mask = false"))
    plain = train(base_args(model, str(toml), tmp_path / "b", "--max_train_steps", "2"))
    assert all(loss > 0.1 for loss in plain.step_losses)


def test_sd2_768_v_model_trains_with_v_parameterization(tmp_path):
    model = tiny_model_dir(arch="sd2-v")
    data = solid_dataset(tmp_path)
    trainer = train(base_args(model, data, tmp_path / "out", "--max_train_steps", "2", "--v2",
                              "--v_parameterization"))
    meta = read_metadata(tmp_path / "out" / "lora.safetensors")
    assert meta["ss_base_model_version"] == "sd_v2_768_v" and meta["ss_v2"] == "True"
    assert trainer.noise_scheduler.config.prediction_type == "v_prediction"
    sd = load_state_dict(tmp_path / "out" / "lora.safetensors")
    assert any(k.startswith("lora_te_") for k in sd) and any(k.startswith("lora_unet_") for k in sd)


def test_step_samples_are_written_and_do_not_change_training(model, dataset, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("sks --w 64 --h 64 --s 2\n")  # no --d: a random seed, drawn without touching training
    plain = train(base_args(model, dataset, tmp_path / "a", "--max_train_steps", "4", "--network_dropout", "0.2"))
    sampled = train(base_args(model, dataset, tmp_path / "b", "--max_train_steps", "4", "--network_dropout", "0.2",
                              "--sample_prompts", str(prompts), "--sample_every_n_steps", "2",
                              "--sample_sampler", "k_euler_a"))
    names = sorted(os.listdir(tmp_path / "b" / "sample"))
    assert len(names) == 2 and names[0].startswith("lora_000002_00_") and names[1].startswith("lora_000004_00_")
    assert sampled.step_losses == plain.step_losses
    a, b = load_state_dict(tmp_path / "a" / "lora.safetensors"), load_state_dict(tmp_path / "b" / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_grad_scaler_skips_overflowing_steps_without_stopping(model, dataset, tmp_path, monkeypatch, caplog):
    """An overflow in the fp16 backward is not a failure: the update is skipped, the scale halved, the lr held."""
    from library import network_trainer

    original_loss = network_trainer.NetworkTrainer.loss

    def overflow_first(self, batch):
        loss = original_loss(self, batch)
        return loss * 1e30 if self.progress.global_step == 0 else loss  # finite, but fp16 gradients overflow

    monkeypatch.setattr(network_trainer.NetworkTrainer, "loss", overflow_first)
    caplog.set_level("INFO", logger="library.network_trainer")
    trainer = train(base_args(model, dataset, tmp_path / "out", "--max_train_steps", "3", "--mixed_precision", "fp16",
                              "--network_train_unet_only", "--lr_scheduler", "linear"))
    assert trainer.skipped_steps == 1 and trainer.precision.scaler.get_scale() == 32768.0
    assert "skipped the update" in caplog.text
    assert trainer.progress.global_step == 3 and trainer.lr_scheduler.scheduler.last_epoch == 2  # held once
    sd = load_state_dict(tmp_path / "out" / "lora.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))
