"""Validation loss: a deterministic held-out split, a loss that depends only on the weights, and a training run
whose stream it does not touch."""
from __future__ import annotations

import json

import pytest
import torch

from tests.train_helpers import base_args, parse, solid_dataset, tiny_model_dir, train

COLOURS = ((220, 30, 30), (30, 220, 30), (30, 30, 220), (220, 220, 30))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("data"), colours=COLOURS)


def _group(args):
    from library.dataset_config import load_dataset_config
    from library.datasets import build_dataset_group
    from library.validation import Validator

    config = load_dataset_config(args)
    return build_dataset_group(args, None, config=config), Validator.build(args, None, False, config)


def test_split_is_seeded_deterministic_and_disjoint(model, dataset, tmp_path):
    args = parse(base_args(model, dataset, tmp_path, "--validation_split", "0.25", "--validation_seed", "3"))
    train_group, validator = _group(args)
    held = {i.path for i in validator.group.images}
    trained = {i.path for i in train_group.images}
    assert len(held) == 1 and len(trained) == 3 and not held & trained
    again_train, again = _group(args)
    assert {i.path for i in again.group.images} == held
    other = {frozenset(i.path for i in _group(parse(base_args(model, dataset, tmp_path, "--validation_split", "0.25",
                                                                "--validation_seed", str(s))))[1].group.images)
             for s in range(8)}
    assert len(other) > 1  # the seed chooses
    assert validator.group.images[0].subset.flip_aug is False and validator.group.images[0].num_repeats == 1


def test_validation_subset_is_held_out_whole(model, tmp_path):
    toml = solid_dataset(tmp_path / "a", colours=COLOURS[:2])
    held = solid_dataset(tmp_path / "b", colours=COLOURS[2:])
    text = open(toml).read() + f'[[datasets.subsets]]\nimage_dir = "{(tmp_path / "b" / "img").as_posix()}"\n' \
                                 "validation = true\n"
    open(toml, "w").write(text)
    args = parse(base_args(model, toml, tmp_path / "out"))
    train_group, validator = _group(args)
    assert sorted(i.path for i in validator.group.images) == sorted(
        str(p) for p in (tmp_path / "b" / "img").glob("*.png"))
    assert all("/a/" in i.path for i in train_group.images) and len(train_group.images) == 2
    assert held


def test_validation_loss_is_deterministic_and_leaves_the_training_stream_alone(model, dataset, tmp_path):
    common = ("--validation_split", "0.25", "--max_train_steps", "4", "--network_train_unet_only")
    every = train(base_args(model, dataset, tmp_path / "a", *common, "--validate_every_n_steps", "1",
                            "--logging_dir", str(tmp_path / "logs")))
    records = every.features.validator.records
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((tmp_path / "logs").rglob("events.out.tfevents*"))
    acc = EventAccumulator(str(events.parent))
    acc.Reload()  # next to the training loss, one point per validation
    assert [(e.step, round(e.value, 5)) for e in acc.Scalars("loss/validation")] == [
        (r["step"], round(r["loss"], 5)) for r in records]
    assert len(acc.Scalars("loss/current")) == 4
    end_only = train(base_args(model, dataset, tmp_path / "b", *common, "--validate_every_n_epochs", "100"))
    assert every.step_losses == end_only.step_losses  # validating every step changed nothing in training
    assert [r["step"] for r in end_only.features.validator.records] == [4]
    assert end_only.features.validator.records[0]["loss"] == pytest.approx(records[-1]["loss"], rel=1e-6)

    # same weights, same number; no RNG stream moves
    trainer = end_only
    torch_state = torch.get_rng_state()  # the training noise is per sample (seeded by step): only torch's stream
    first = trainer.features.validator.loss(trainer)
    second = trainer.features.validator.loss(trainer)
    assert first == second == pytest.approx(records[-1]["loss"], rel=1e-6)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert trainer.accelerator.unwrap_model(trainer.network).training  # back in training mode
    # other weights, another number
    net = trainer.accelerator.unwrap_model(trainer.network)
    net.set_multiplier(0.0)
    assert trainer.features.validator.loss(trainer) != pytest.approx(first, rel=1e-4)
    net.set_multiplier(1.0)

    written = json.loads((tmp_path / "a" / "lora.validation.json").read_text())
    assert [r["step"] for r in written["records"]] == [1, 2, 3, 4]
    report = json.loads((tmp_path / "a" / "lora.report.json").read_text())
    assert report["best"] == "lora.safetensors" and report["saves"][0]["validation_loss"] == pytest.approx(
        records[-1]["loss"])


@pytest.mark.parametrize("flag, value, message", [
    ("--validation_split", "1.0", r"--validation_split 1.0: expected a share in \[0, 1\)"),
    ("--validate_every_n_steps", "0", "--validate_every_n_steps 0: must be at least 1"),
    ("--max_validation_steps", "0", "--max_validation_steps 0: must be at least 1"),
])
def test_bad_options_are_refused_before_loading(model, dataset, tmp_path, flag, value, message):
    from library import train_args

    with pytest.raises(ValueError, match=message):
        train_args.validate_args(parse(base_args(model, dataset, tmp_path, flag, value)))


def test_sdxl_validation_with_cached_text_encoder_outputs_and_no_vae(tmp_path):
    """SDXL: size conditioning in the validation forward, held-out captions cached, the VAE dropped after caching."""
    data = solid_dataset(tmp_path / "data", colours=COLOURS, caption=["a", "b", "c", "d"])
    trainer = train(base_args(tiny_model_dir(arch="sdxl"), data, tmp_path / "out", "--max_train_steps", "2",
                              "--network_train_unet_only", "--cache_text_encoder_outputs", "--validation_split", "0.5",
                              "--validate_every_n_steps", "1"), sdxl=True)
    records = trainer.features.validator.records
    assert [r["step"] for r in records] == [1, 2] and all(r["loss"] > 0 for r in records)
    assert trainer.components.vae is None and trainer.features.validator.te_cache is not None
    held = {i.caption for i in trainer.features.validator.group.images}
    assert len(held) == 2 and not held & {i.caption for i in trainer.dataset.images}
    assert trainer.features.validator.loss(trainer) == pytest.approx(records[-1]["loss"], rel=1e-6)


def test_resumed_run_keeps_the_earlier_records_and_gets_the_same_numbers(model, dataset, tmp_path):
    common = ("--validation_split", "0.25", "--network_train_unet_only", "--validate_every_n_steps", "1")
    straight = train(base_args(model, dataset, tmp_path / "a", "--max_train_steps", "4", *common))
    train(base_args(model, dataset, tmp_path / "b", "--max_train_steps", "2", "--save_state", *common))
    train(base_args(model, dataset, tmp_path / "b", "--max_train_steps", "4", "--resume",
                    str(tmp_path / "b" / "lora-state"), *common))
    written = json.loads((tmp_path / "b" / "lora.validation.json").read_text())["records"]
    assert [r["step"] for r in written] == [1, 2, 3, 4]
    expected = [r["loss"] for r in straight.features.validator.records]
    assert [r["loss"] for r in written] == pytest.approx(expected, rel=1e-5)
