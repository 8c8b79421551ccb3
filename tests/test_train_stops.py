"""A run that stops early keeps its work: NaN/inf losses, non-finite weights, Ctrl-C; every file is finite."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from library.file_io import load_state_dict
from tests.train_helpers import base_args, nan_loss_at_step, reset_accelerate, train


def _finite(path) -> bool:
    return all(torch.isfinite(v.float()).all() for v in load_state_dict(path).values())


def test_nan_loss_before_the_first_save_keeps_the_network_and_state(model, dataset, tmp_path, monkeypatch):
    from library import network_trainer

    nan_loss_at_step(monkeypatch, 3)
    out = tmp_path / "out"
    reset_accelerate()
    with pytest.raises(SystemExit) as e:
        network_trainer.main(base_args(model, dataset, out, "--max_train_steps", "10", "--save_state"))
    message = str(e.value)
    assert message.startswith("error: loss is nan at step 3 (epoch 1): saved the network of step 2 as ")
    assert "lora-step00000002-before-nonfinite.safetensors" in message and "--learning_rate" in message
    assert "lora-step00000002-before-nonfinite-state" in message and "\n" not in message
    saved = out / "lora-step00000002-before-nonfinite.safetensors"
    assert _finite(saved) and any(v.abs().sum() > 0 for k, v in load_state_dict(saved).items() if "up" in k)
    progress = json.loads((out / "lora-step00000002-before-nonfinite-state" / "progress.json").read_text())
    assert progress["global_step"] == 2


def test_diverging_run_never_writes_nonfinite_files(model, dataset, tmp_path):
    """--learning_rate 30 (issue 14's attack): the weights become NaN at a step whose loss was finite."""
    from library.network_trainer import TrainingStopped

    out = tmp_path / "out"
    with pytest.raises(TrainingStopped) as e:
        train(base_args(model, dataset, out, "--max_train_steps", "10", "--learning_rate", "30",
                        "--save_every_n_steps", "1", "--save_state"))
    files = sorted(p for p in out.iterdir() if p.suffix == ".safetensors")
    assert files and all(_finite(p) for p in files)
    for state in (p for p in out.iterdir() if p.name.endswith("-state")):
        payload = torch.load(state / "train_state.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in payload["network"].values())
    named = str(e.value).split("Last good save: ")[-1].split(";")[0] if "Last good save" in str(e.value) else \
        str(e.value).split(" as ")[1].split(" and ")[0]
    assert os.path.isfile(named) and _finite(named), str(e.value)


@pytest.mark.parametrize("how", ["step_save", "ctrl_c"])
def test_nonfinite_weights_are_never_saved_and_the_last_good_save_is_named(model, dataset, tmp_path, monkeypatch,
                                                                           how):
    """The step that makes the weights NaN can have a finite loss: the next save (periodic or Ctrl-C's) refuses."""
    from library import network_trainer

    original = network_trainer.NetworkTrainer.after_step

    def break_weights(self, progress):
        if progress.global_step == 2:  # the weights of step 3 are NaN
            with torch.no_grad():
                next(p for p in self.accelerator.unwrap_model(self.network).parameters()).fill_(float("nan"))
            if how == "ctrl_c":
                os.kill(os.getpid(), signal.SIGINT)
        original(self, progress)

    monkeypatch.setattr(network_trainer.NetworkTrainer, "after_step", break_weights)
    out = tmp_path / "out"
    every = "1" if how == "step_save" else "2"
    with pytest.raises(network_trainer.TrainingStopped, match=r"NaN/inf values after step 3 .*"
                                                                r"lora-step00000003.safetensors not written. "
                                                                r"Last good save: .*lora-step00000002.safetensors"):
        train(base_args(model, dataset, out, "--max_train_steps", "10", "--save_every_n_steps", every))
    assert sorted(os.listdir(out)) == ["lora-step00000001.safetensors", "lora-step00000002.safetensors"][
        int(every) - 1:]
    assert _finite(out / "lora-step00000002.safetensors")


def test_fp16_overflow_is_not_saved_as_inf(model, dataset, tmp_path, monkeypatch):
    """A float32 weight above 65504 is inf in an fp16 file: refused, not written."""
    from library import network_trainer

    original = network_trainer.NetworkTrainer.after_step

    def huge(self, progress):
        if progress.global_step == 1:
            with torch.no_grad():
                next(p for p in self.accelerator.unwrap_model(self.network).parameters()).fill_(1e6)
        original(self, progress)

    monkeypatch.setattr(network_trainer.NetworkTrainer, "after_step", huge)
    with pytest.raises(network_trainer.TrainingStopped, match=r"NaN/inf values in fp16 after step 2"):
        train(base_args(model, dataset, tmp_path / "out", "--max_train_steps", "4", "--save_every_n_steps", "2",
                        "--save_precision", "fp16", "--learning_rate", "0"))
    assert not list((tmp_path / "out").glob("*.safetensors"))
