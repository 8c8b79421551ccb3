"""train_network.py end to end on a tiny SD1 model: learning, saved files, metadata, options, errors."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from tests.train_helpers import base_args, nan_loss_at_step, train


def _fixed_loss(trainer, multiplier: float) -> float:
    """Loss at a fixed noise and timestep with the network at `multiplier` (0 = the base model)."""
    from library import noise

    trainer.dataset.set_epoch(1)
    batch = trainer.dataset[0]
    net = trainer.accelerator.unwrap_model(trainer.network)
    net.set_multiplier(multiplier)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = trainer.latents(batch)
        hidden, _ = trainer.conditioning(batch)
        eps = torch.randn(latents.shape, generator=g)
        t = torch.tensor([500])
        noisy = trainer.noise_scheduler.add_noise(latents, eps, t)
        pred = trainer.components.unet(noisy, t, hidden).sample
    net.set_multiplier(1.0)
    return torch.nn.functional.mse_loss(pred, noise.training_target(latents, eps, t, trainer.noise_scheduler,
                                                                       False)).item()


def test_loss_falls_and_saved_lora_reproduces_outputs(model, dataset, tmp_path):
    out = tmp_path / "out"
    trainer = train(base_args(model, dataset, out, "--max_train_steps", "40", "--learning_rate", "1e-2",
                              "--min_timestep", "500", "--max_timestep", "501", "--network_train_unet_only",
                              "--training_comment", "unit test"))
    losses = trainer.step_losses
    # U-Net only on cached latents, fixed captions: text-encoder outputs cached automatically, encoder freed
    assert trainer.te_cache is not None and trainer.components.text_encoders == [None]
    assert len(losses) == 40 and sum(losses[-10:]) < 0.9 * sum(losses[:10])
    before, after = _fixed_loss(trainer, 0.0), _fixed_loss(trainer, 1.0)
    assert after < 0.9 * before, (before, after)

    path = out / "lora.safetensors"
    assert trainer.final_path == str(path) and path.exists()
    meta = read_metadata(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "4.0" and meta["ss_steps"] == "40" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_training_comment"] == "unit test" and meta["ss_num_train_images"] == "4"  # images x repeats
    assert '"sks": 1' in meta["ss_tag_frequency"] and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_sd_model_name"] == os.path.basename(model) and "sshs_model_hash" in meta
    assert all(k.startswith("lora_unet_") for k in load_state_dict(path))

    # a fresh model + the saved file gives the trained outputs
    import networks.lora as lora
    from library.model_loading import load_models

    fresh = load_models(model)
    net, sd = lora.create_network_from_weights(1.0, str(path), fresh.vae, fresh.text_encoder, fresh.unet)
    net.apply_to(fresh.text_encoder, fresh.unet, False, True)
    net.load_state_dict(sd, strict=False)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = trainer.components.unet(x, torch.tensor([300]), cond).sample
        got = fresh.unet(x, torch.tensor([300]), cond).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["--optimizer_type", "AdamWX"], "unknown optimizer"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
    (["--pretrained_model_name_or_path", "/no/such/model.safetensors"], "no such file"),
    (["--xformers"], "--xformers"),
])
def test_bad_arguments_fail_before_any_model_loads(model, dataset, tmp_path, monkeypatch, capsys, extra, message):
    from library import network_trainer

    def refuse(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(network_trainer, "load_components", refuse)
    with pytest.raises(SystemExit) as e:
        network_trainer.main(base_args(model, dataset, tmp_path / "out", *extra))
    assert message in str(e.value) and str(e.value).startswith("error: ")


def test_ctrl_c_saves_and_nan_stops_keeping_last_save(model, dataset, tmp_path, monkeypatch):
    from library import network_trainer

    original = network_trainer.NetworkTrainer.after_step

    def interrupting(self, progress):
        original(self, progress)
        if progress.global_step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(network_trainer.NetworkTrainer, "after_step", interrupting)
    out = tmp_path / "out"
    trainer = train(base_args(model, dataset, out, "--max_train_steps", "10", "--save_state"))
    assert trainer.interrupted and trainer.progress.global_step == 3
    assert (out / "lora-step00000003.safetensors").exists() and (out / "lora-step00000003-state").is_dir()
    assert not (out / "lora.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    monkeypatch.undo()

    nan_loss_at_step(monkeypatch, 4)
    out2 = tmp_path / "out2"
    with pytest.raises(network_trainer.TrainingStopped, match=r"loss is nan at step 4.*lora-step00000003-before"):
        train(base_args(model, dataset, out2, "--max_train_steps", "10", "--save_every_n_steps", "2"))
    assert sorted(os.listdir(out2)) == ["lora-step00000002.safetensors",
                                        "lora-step00000003-before-nonfinite.safetensors"]
