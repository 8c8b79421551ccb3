"""Argument parsing, --config_file / --output_config and validation before any model loads."""
from __future__ import annotations

import argparse

import pytest

from library import train_args


def _parser(sdxl=False):  # the same options for both scripts
    p = argparse.ArgumentParser()
    train_args.add_all_training_arguments(p)
    return p


def _valid(tmp_path, *extra):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"x")
    return ["--pretrained_model_name_or_path", str(model), "--network_module", "networks", *extra]


def test_defaults_match_sd_scripts():
    a = _parser().parse_args([])
    assert (a.learning_rate, a.lr_scheduler, a.max_train_steps, a.network_alpha, a.save_model_as) == \
        (2e-6, "constant", 1600, 1, "safetensors")
    assert a.max_grad_norm == 1.0 and a.multires_noise_discount == 0.3 and a.mixed_precision == "no"


def test_config_file_round_trip_and_command_line_wins(tmp_path):
    p = _parser()
    cfg = tmp_path / "args"
    with pytest.raises(SystemExit) as e:
        train_args.parse_args(p, ["--config_file", str(cfg), "--output_config", "--learning_rate", "3e-4",
                                  "--network_args", "conv_dim=4", "conv_alpha=1", "--optimizer_type", "Lion"])
    assert e.value.code == 0
    text = (tmp_path / "args.toml").read_text()
    assert "learning_rate = 0.0003" in text and "output_config" not in text
    a = train_args.parse_args(p, ["--config_file", str(tmp_path / "args.toml"), "--optimizer_type", "AdamW"])
    assert a.learning_rate == 3e-4 and a.network_args == ["conv_dim=4", "conv_alpha=1"]
    assert a.optimizer_type == "AdamW"  # command line overrides the file


def test_config_sections_flattened_and_unknown_key(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nv2 = true\n[optimizer]\nlearning_rate = 1e-4\nlr_scheduler = "cosine"\n')
    a = train_args.parse_args(_parser(), ["--config_file", str(cfg)])
    assert a.v2 is True and a.learning_rate == 1e-4 and a.lr_scheduler == "cosine"
    cfg.write_text('[training]\nlerning_rate = 1e-4\n')
    with pytest.raises(ValueError, match="unknown option.*lerning_rate"):
        train_args.parse_args(_parser(), ["--config_file", str(cfg)])


@pytest.mark.parametrize("extra, message", [
    (["--optimizer_type", "Adamm"], "unknown optimizer"),
    (["--network_train_unet_only", "--network_train_text_encoder_only"], "exclude each other"),
    (["--xformers"], "--xformers"),
    (["--full_fp16"], "--full_fp16 needs --mixed_precision fp16"),
    (["--lr_scheduler", "cosinus"], "unknown scheduler"),
    (["--min_timestep", "500", "--max_timestep", "100"], "need 0 <= min < max"),
    (["--adaptive_noise_scale", "0.1"], "needs --noise_offset"),
    (["--resume", "/no/such/state"], "--resume"),
    (["--network_weights", "/no/such.safetensors"], "--network_weights /no/such.safetensors"),
    (["--huggingface_repo_id", "me/x"], "--huggingface_repo_id: uploading"),
    (["--optimizer_type", "DAdaptation", "--learning_rate", "1", "--text_encoder_lr", "0.5", "--unet_lr", "1"],
     "--optimizer_type DAdaptation: --text_encoder_lr 0.5, --unet_lr 1 differ, but DAdaptation takes one learning "
     "rate for every parameter group"),
    (["--optimizer_type", "Prodigy", "--learning_rate", "1", "--text_encoder_lr", "0.5"], "--unet_lr 1 differ"),
])
def test_bad_arguments_fail_with_clear_message(tmp_path, extra, message):
    a = _parser().parse_args(_valid(tmp_path, *extra))
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(")):
        train_args.validate_args(a)


def test_missing_model_path(tmp_path):
    a = _parser().parse_args(["--network_module", "networks"])
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path is required"):
        train_args.validate_args(a)
    a = _parser().parse_args(["--network_module", "networks", "--pretrained_model_name_or_path", "/x/y.ckpt"])
    with pytest.raises(FileNotFoundError, match="/x/y.ckpt: no such file"):
        train_args.validate_args(a)


def test_valid_arguments_pass_and_legacy_optimizer_flags(tmp_path):
    a = _parser().parse_args(_valid(tmp_path, "--use_8bit_adam"))
    train_args.validate_args(a)
    assert train_args.optimizer_name(a) == "AdamW8bit"


def test_sdxl_refusals(tmp_path):
    a = _parser(True).parse_args(_valid(tmp_path, "--cache_text_encoder_outputs"))
    with pytest.raises(ValueError, match="needs --network_train_unet_only"):
        train_args.validate_args(a, sdxl=True)
    a = _parser(True).parse_args(_valid(tmp_path, "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only"))
    a.shuffle_caption = True
    with pytest.raises(ValueError, match="cannot be used with --shuffle_caption"):
        train_args.validate_args(a, sdxl=True)
    a = _parser(True).parse_args(_valid(tmp_path, "--weighted_captions"))
    with pytest.raises(ValueError, match="--weighted_captions is not supported for SDXL"):
        train_args.validate_args(a, sdxl=True)


def test_every_training_option_is_documented():
    from pathlib import Path

    from library.dataset_config import add_dataset_arguments

    root = Path(__file__).resolve().parent.parent
    docs = (root / "docs" / "train_network.md").read_text() + (root / "docs" / "dataset_config.md").read_text() + \
        (root / "docs" / "sdxl_train_network.md").read_text()
    p = argparse.ArgumentParser()
    add_dataset_arguments(p)
    train_args.add_all_training_arguments(p)
    missing = [a.option_strings[0] for a in p._actions if a.option_strings and a.option_strings[0] != "-h"
               and a.help != argparse.SUPPRESS and f"`{a.option_strings[0]}`" not in docs
               and f"`{a.dest}`" not in docs and f"`{a.dest} " not in docs]  # dataset options: TOML key names
    assert not missing, missing


def test_cache_latents_to_disk_turns_on_latent_caching(tmp_path):
    from library.dataset_config import add_dataset_arguments

    p = _parser()
    add_dataset_arguments(p)
    a = p.parse_args(_valid(tmp_path, "--cache_latents_to_disk"))
    assert not a.cache_latents
    train_args.validate_args(a)
    assert a.cache_latents and a.cache_latents_to_disk


def test_adaptive_optimizers_accept_one_lr_or_a_frozen_part(tmp_path):
    for extra in (["--text_encoder_lr", "0.5", "--network_train_unet_only"], ["--text_encoder_lr", "0"],
                  ["--text_encoder_lr", "1", "--unet_lr", "1"]):
        a = _parser().parse_args(_valid(tmp_path, "--optimizer_type", "DAdaptAdam", "--learning_rate", "1", *extra))
        train_args.validate_args(a)  # no error


def test_adaptive_optimizer_refuses_different_group_lrs_before_its_first_step():
    """Block lr weights give groups of different lrs: one line at construction, not a RuntimeError at step 1."""
    import torch

    from library import optimizers

    groups = [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1.0},
              {"params": [torch.nn.Parameter(torch.ones(2))], "lr": 0.5}]
    with pytest.raises(ValueError, match="group 0 lr 1, group 1 lr 0.5 differ"):
        optimizers.build_optimizer("DAdaptAdam", groups, 1.0)


def test_a_flag_set_in_the_config_file_can_be_turned_off_on_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "args.toml"
    cfg.write_text("[saving]\nsave_state = true\n[training]\ngradient_checkpointing = true\n")
    p = _parser()
    base = ["--config_file", str(cfg)]
    assert train_args.parse_args(p, base).save_state is True
    assert train_args.parse_args(p, base + ["--save_state", "false"]).save_state is False
    assert train_args.parse_args(p, base + ["--no-save_state"]).save_state is False
    off = train_args.parse_args(p, base + ["--save_state", "no", "--gradient_checkpointing", "off"])
    assert (off.save_state, off.gradient_checkpointing) == (False, False)
    assert train_args.parse_args(p, ["--save_state"]).save_state is True
    assert train_args.parse_args(p, ["--gradient_checkpointing", "true"]).gradient_checkpointing is True
    assert train_args.parse_args(p, []).save_state is False
    with pytest.raises(SystemExit):
        train_args.parse_args(p, ["--save_state", "maybe"])
    assert "--save_state: expected true or false, got 'maybe'" in capsys.readouterr().err
