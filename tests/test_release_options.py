"""Options of sd-scripts' releases that a user's command may carry (issue 19): modelspec metadata, console log,
tracker config, the later schedulers; the ones not implemented stop with one line saying why."""
from __future__ import annotations

import argparse
import logging
import math
import os

import pytest
import torch

from library import lr_schedulers, train_args
from library.file_io import read_metadata
from tests.train_helpers import reset_accelerate, tiny_model_dir


def _parser():
    from library.dataset_config import add_dataset_arguments

    p = argparse.ArgumentParser()
    add_dataset_arguments(p)
    train_args.add_all_training_arguments(p)
    return p


def test_metadata_console_log_and_log_config_in_a_training_run(tmp_path, monkeypatch, capsys):
    from library.network_trainer import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    reset_accelerate()
    log_file = tmp_path / "train.log"
    try:
        main(["--config_file", "examples/tiny_lora/args.toml", "--dataset_config", "examples/tiny_lora/dataset.toml",
              "--pretrained_model_name_or_path", tiny_model_dir(), "--output_dir", str(tmp_path / "out"),
              "--max_train_steps", "2", "--sample_every_n_epochs", "100", "--save_every_n_epochs", "100",
              "--save_state", "false", "--metadata_title", "Red Square", "--metadata_author", "me",
              "--metadata_description", "a test", "--metadata_license", "CC0", "--metadata_tags", "shape,red",
              "--console_log_file", str(log_file), "--console_log_level", "warning", "--log_config",
              "--logging_dir", str(tmp_path / "logs"), "--wandb_api_key", "secret-key",
              "--network_args", "not_an_arg=1"])  # a known warning for the log file
    finally:
        for h in root.handlers:
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        root.setLevel(level)
    meta = read_metadata(tmp_path / "out" / "tiny_lora.safetensors")
    assert (meta["modelspec.title"], meta["modelspec.author"], meta["modelspec.description"],
            meta["modelspec.license"], meta["modelspec.tags"]) == ("Red Square", "me", "a test", "CC0", "shape,red")
    text = log_file.read_text()
    assert "WARNING networks.lora_blocks: network_args not used by networks.lora: not_an_arg" in text
    assert " INFO " not in text  # --console_log_level warning, into the file
    hparams = list((tmp_path / "logs").rglob("hparams.yml"))
    assert len(hparams) == 1
    logged = hparams[0].read_text()
    assert "metadata_title: Red Square" in logged and "secret-key" not in logged and "wandb_api_key: '***'" in logged


def test_default_title_is_the_output_name():
    from library.train_metadata import model_spec, user_model_spec

    args = _parser().parse_args(["--output_name", "x"])
    assert user_model_spec(args) == {} and model_spec("sd1", False, "x", None)["modelspec.title"] == "x"


def test_console_log_simple_prints_the_message_only(capsys):
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    try:
        train_args.parse_args(_parser(), ["--console_log_simple"])
        logging.getLogger("x").warning("hello")
    finally:
        root.removeHandler(handler)
    assert capsys.readouterr().err.splitlines()[-1] == "hello"


def _lrs(name, steps, warmup=0, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = lr_schedulers.build_scheduler(name, opt, steps, warmup, **kw)
    out = []
    for _ in range(steps + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_later_schedulers_give_their_lr_at_each_step():
    wsd = _lrs("warmup_stable_decay", 10, 2, min_lr_ratio=0.1, decay_steps=4)
    assert wsd[:6] == pytest.approx([0.0, 0.5, 1, 1, 1, 1])
    assert wsd[6] == pytest.approx(1.0) and wsd[8] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert wsd[10] == pytest.approx(0.1)
    assert _lrs("warmup_stable_decay", 10, 0, decay_steps=0.5)[5:7] == pytest.approx([1.0, 0.5 + 0.5 * math.cos(
        math.pi / 5)])
    cmin = _lrs("cosine_with_min_lr", 10, min_lr_ratio=0.2)
    assert cmin[0] == 1.0 and cmin[5] == pytest.approx(0.6) and cmin[10] == pytest.approx(0.2)
    isq = _lrs("inverse_sqrt", 10, 4)
    assert isq[4] == pytest.approx(1.0) and isq[8] == pytest.approx(1 / math.sqrt(2))  # timescale = warmup
    assert _lrs("inverse_sqrt", 10, 0, timescale=2)[6] == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="--lr_decay_steps 20: 20 decay steps do not fit"):
        _lrs("warmup_stable_decay", 10, decay_steps=20)


@pytest.mark.parametrize("argv, message", [
    (["--deepspeed"], "--deepspeed: DeepSpeed is not supported; use accelerate's multi-GPU data parallel"),
    (["--zero_stage", "2"], "--zero_stage: DeepSpeed is not supported"),
    (["--highvram"], "--highvram: not needed"),
    (["--dataset_class", "my.Dataset"], "--dataset_class: user dataset classes are not supported; describe the "
                                        "data with --dataset_config"),
    (["--initial_step", "100"], "--initial_step: not supported; --resume <state folder>"),
    (["--skip_until_initial_step"], "--skip_until_initial_step: not supported"),
])
def test_options_not_implemented_are_refused_with_the_reason(tmp_path, argv, message):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"x")
    args = train_args.parse_args(_parser(), ["--pretrained_model_name_or_path", str(model), "--network_module",
                                             "networks.lora", *argv])  # recognised: no "unrecognized arguments"
    with pytest.raises(ValueError) as e:
        train_args.validate_args(args)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("script", ["sdxl_merge_lora", "svd_merge_lora"])
def test_lbws_is_refused_with_one_line(tmp_path, script):
    import importlib

    module = importlib.import_module(f"networks.{script}")
    with pytest.raises(SystemExit) as e:
        module.main(["--models", "a.safetensors", "--save_to", str(tmp_path / "o.safetensors"), "--lbws",
                     "[1,1,1]"])
    assert "--lbws: per-block weights of each merged LoRA (LoRA Block Weight) are not supported" in str(e.value.code)
