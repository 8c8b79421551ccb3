"""tools/cache_latents.py and tools/cache_text_encoder_outputs.py fill disk caches that training reuses."""
from __future__ import annotations

import os

import pytest

from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


def test_cache_tools_fill_caches_that_training_uses_without_recomputing(tmp_path, monkeypatch, capsys):
    from library.cache_tools import main

    model = tiny_model_dir(arch="sdxl")
    data = solid_dataset(tmp_path, colours=((200, 0, 0), (0, 0, 200)), caption=["sks red", "sks blue"])
    common = ["--sdxl", "--pretrained_model_name_or_path", model, "--dataset_config", data, "--seed", "1"]
    main("latents", common)
    main("text_encoder_outputs", common)
    printed = capsys.readouterr().out
    assert "cached latents: 2 computed" in printed and "cached text encoder outputs: 2 computed" in printed
    files = sorted(os.listdir(tmp_path / "img"))
    assert {"0.npz", "1.npz", "0_te_outputs.npz", "1_te_outputs.npz"} <= set(files)
    stamps = {f: os.path.getmtime(tmp_path / "img" / f) for f in files if f.endswith(".npz")}

    main("latents", common)  # a second run finds everything valid
    main("text_encoder_outputs", common)
    assert "latents: 0 computed" in capsys.readouterr().out

    from diffusers import AutoencoderKL

    def no_encode(*a, **k):
        raise AssertionError("the VAE encoded an image although the disk cache was valid")

    monkeypatch.setattr(AutoencoderKL, "encode", no_encode)
    trainer = train(base_args(model, data, tmp_path / "out", "--max_train_steps", "2", "--network_train_unet_only",
                              "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk"), sdxl=True)
    assert trainer.te_cache.computed == 0 and trainer.te_cache.from_disk == 2
    assert len(trainer.step_losses) == 2
    assert stamps == {f: os.path.getmtime(tmp_path / "img" / f) for f in stamps}  # nothing rewritten


def test_text_encoder_cache_is_invalidated_when_options_change(tmp_path):
    from library.cache_tools import main

    model = tiny_model_dir(arch="sdxl")
    data = solid_dataset(tmp_path)
    common = ["--sdxl", "--pretrained_model_name_or_path", model, "--dataset_config", data]
    main("text_encoder_outputs", common)
    trainer = train(base_args(model, data, tmp_path / "out", "--max_train_steps", "1", "--network_train_unet_only",
                              "--cache_text_encoder_outputs_to_disk", "--max_token_length", "150"), sdxl=True)
    assert trainer.te_cache.computed == 1 and trainer.te_cache.from_disk == 0  # longer ids: recomputed


def test_cache_tool_refuses_changing_captions(tmp_path):
    from library.cache_tools import main

    data = solid_dataset(tmp_path, extra_general="caption_tag_dropout_rate = 0.1")
    with pytest.raises(SystemExit, match="caption_tag_dropout_rate cannot be used"):
        main("text_encoder_outputs", ["--sdxl", "--pretrained_model_name_or_path", tiny_model_dir(arch="sdxl"),
                                      "--dataset_config", data])


def test_sd1_text_encoder_outputs_from_the_tool_are_used_by_train_network(tmp_path):
    from library.cache_tools import main

    model = tiny_model_dir()
    data = solid_dataset(tmp_path, colours=((200, 0, 0), (0, 0, 200)), caption=["sks red", "sks blue"])
    main("text_encoder_outputs", ["--pretrained_model_name_or_path", model, "--dataset_config", data,
                                  "--clip_skip", "2"])
    trainer = train(base_args(model, data, tmp_path / "out", "--max_train_steps", "1", "--network_train_unet_only",
                              "--cache_text_encoder_outputs_to_disk", "--clip_skip", "2"))
    assert trainer.te_cache.computed == 0 and trainer.te_cache.from_disk == 2
    assert trainer.components.text_encoders == [None]


def test_help_shows_the_options_caching_uses_and_training_options_still_parse():
    from library.cache_tools import build_parser

    parser = build_parser("latents")
    text = parser.format_help()
    for used in ("--dataset_config", "--pretrained_model_name_or_path", "--mixed_precision", "--vae_batch_size"):
        assert used in text
    for unused in ("--learning_rate", "--sample_prompts", "--save_every_n_epochs", "--network_dim", "--logging_dir"):
        assert unused not in text
    args = parser.parse_args(["--learning_rate", "1e-4", "--network_dim", "8", "--sample_every_n_epochs", "1"])
    assert args.learning_rate == 1e-4 and args.network_dim == 8
    assert len(text.splitlines()) < 250
