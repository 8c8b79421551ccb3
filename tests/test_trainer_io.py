"""Output names and pruning (--save_last_n_*), state folders replaced without a moment with no state."""
from __future__ import annotations

import os

import pytest
import torch

from library import file_io, train_state
from library.trainer_io import OutputNamer, count_nonfinite


def _touch_steps(namer: OutputNamer, steps) -> None:
    for s in steps:
        open(namer.step(s), "w").close()
        os.makedirs(namer.step_state(s), exist_ok=True)


def test_save_last_n_steps_keeps_the_last_n_steps_both_ends_included(tmp_path):
    """At step 50, every 10, N 30: the files of steps 20, 30, 40, 50 stay (sd-scripts and docs/train_network.md)."""
    namer = OutputNamer(str(tmp_path), "lora")
    for step in range(10, 60, 10):  # the saves of a run, pruned after each as the trainer does
        _touch_steps(namer, [step])
        namer.prune_steps(step, 10, 30, 20)
    names = set(os.listdir(tmp_path))
    assert {n for n in names if not n.endswith("-state")} == {f"lora-step{s:08d}.safetensors" for s in (20, 30, 40, 50)}
    assert {n for n in names if n.endswith("-state")} == {f"lora-step{s:08d}-state" for s in (30, 40, 50)}


def test_save_last_n_epochs_keeps_n_epoch_saves(tmp_path):
    namer = OutputNamer(str(tmp_path), "lora")
    for epoch in range(2, 12, 2):  # every 2 epochs, keep 2 files and 3 states
        open(namer.epoch(epoch), "w").close()
        os.makedirs(namer.epoch_state(epoch))
        namer.prune_epochs(epoch, 2, 2, 3)
    names = set(os.listdir(tmp_path))
    assert {n for n in names if not n.endswith("-state")} == {"lora-000008.safetensors", "lora-000010.safetensors"}
    assert {n for n in names if n.endswith("-state")} == {"lora-000006-state", "lora-000008-state",
                                                          "lora-000010-state"}


def test_pruning_leaves_other_files_alone(tmp_path):
    namer = OutputNamer(str(tmp_path), "lora")
    _touch_steps(namer, [1, 2])
    keep = [namer.before_nonfinite(1), str(tmp_path / "lora2-step00000001.safetensors"), namer.final()]
    for path in keep:
        open(path, "w").close()
    namer.prune_steps(10, 1, 1, 1)
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in keep)


def test_count_nonfinite_sees_nested_values_and_fp16_overflow():
    good = {"a": torch.ones(3), "b": [torch.zeros(2), torch.arange(3)]}
    assert count_nonfinite([good]) == 0
    assert count_nonfinite([{"x": torch.tensor([1.0, float("nan"), float("inf")])}]) == 2
    assert count_nonfinite([torch.tensor([7e4, 1.0])]) == 0
    assert count_nonfinite([torch.tensor([7e4, 1.0])], torch.float16) == 1


def _save(folder, net, step):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return train_state.save_state(folder, network=net, optimizer=opt, scheduler=None,
                                  progress=train_state.Progress(global_step=step))


def test_overwriting_a_state_moves_the_old_one_aside_until_the_new_one_is_in(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    folder = tmp_path / "lora-state"
    _save(folder, net, 1)
    real_replace = os.replace
    seen = []

    def crash_when_moving_the_new_one_in(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst)))
        if os.path.basename(str(dst)) == "lora-state" and ".old" not in str(src):
            # at this moment the old state must still exist (aside), and the target must be free
            aside = [p for p in tmp_path.iterdir() if p.name.endswith(".old")]
            assert len(aside) == 1 and (aside[0] / train_state.STATE_FILE).is_file()
            assert not folder.exists()
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_when_moving_the_new_one_in)
    with pytest.raises(OSError, match="simulated crash"):
        _save(folder, net, 2)
    monkeypatch.undo()
    # the old state is back in place, complete, and nothing else is left
    assert train_state.read_progress(folder)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]
    _save(folder, net, 3)
    assert train_state.read_progress(folder)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-state"]


def test_replace_dir_into_a_new_place(tmp_path):
    new = file_io.temp_dir_beside(tmp_path / "x")
    (new / "f").write_text("1")
    file_io.replace_dir(new, tmp_path / "x")
    assert (tmp_path / "x" / "f").read_text() == "1" and sorted(os.listdir(tmp_path)) == ["x"]
