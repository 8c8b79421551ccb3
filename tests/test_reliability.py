"""Attacks on the trainer with bad inputs and faults (issue 14), one test id per attack.

Up-front attacks must fail with one `error: ...` line naming the flag or file, before any model loads (the
model loader is replaced by one that fails the test). Faults at save time (disk full, no permission) must keep
the trained weights beside the output folder, saying where and why.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from library import file_io, network_trainer, preflight
from library.file_io import TEMP_PREFIX, load_state_dict
from tests.train_helpers import base_args, solid_dataset, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("data"), colours=((200, 0, 0), (0, 0, 200)))


@pytest.fixture(scope="module")
def saved(model, data, tmp_path_factory):
    """A finished 2-step run with its training state: the inputs of the --resume / --network_weights attacks."""
    out = tmp_path_factory.mktemp("saved")
    train(base_args(model, data, out, "--max_train_steps", "2", "--save_state"))
    return out


def _no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded before the bad input was refused")

    monkeypatch.setattr(network_trainer, "load_components", refuse)


def _error_line(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        network_trainer.main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def _copy_state(saved: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    shutil.copytree(saved / "lora-state", state)
    return state


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


# ---------------------------------------------------------------- up front: refused before any model loads

def _output_is_file(tmp, saved):
    (tmp / "taken").write_text("x")
    return ["--output_dir", str(tmp / "taken")], r"--output_dir .*taken: is a file, not a folder"


def _output_below_a_file(tmp, saved):
    (tmp / "taken").write_text("x")
    return ["--output_dir", str(tmp / "taken" / "out")], r"--output_dir .*taken/out: cannot be created"


def _network_module_missing(tmp, saved):
    return ["--network_module", "networks.nonexistent"], r"--network_module networks.nonexistent: cannot be imported"


def _network_module_not_a_network(tmp, saved):
    return ["--network_module", "library.images"], r"--network_module library.images: has no create_network"


def _resume_truncated_state(tmp, saved):
    state = _copy_state(saved, tmp)
    _truncate(state / "train_state.pt")
    return ["--resume", str(state)], r"--resume .*state: train_state.pt is damaged or truncated"


def _resume_without_state_file(tmp, saved):
    state = _copy_state(saved, tmp)
    (state / "train_state.pt").unlink()
    return ["--resume", str(state)], r"--resume .*state: not a training state folder \(no train_state.pt\)"


def _resume_damaged_progress(tmp, saved):
    state = _copy_state(saved, tmp)
    (state / "progress.json").write_text("{\"epoch\": ")
    return ["--resume", str(state)], r"--resume .*state: progress.json is damaged"


def _resume_other_dim(tmp, saved):
    return (["--resume", str(saved / "lora-state"), "--network_dim", "8"],
            r"--resume .*lora-state: lora_\w+.lora_down.weight has rank 4, this run builds rank 8 \(--network_dim 8\)")


def _resume_other_modules(tmp, saved):
    return (["--resume", str(saved / "lora-state"), "--network_train_unet_only"],
            r"--resume .*: the state's network does not match this network: it trains the text encoder and U-Net, "
            r"this run the U-Net only")


def _truncated_lora(flag: str):
    def attack(tmp, saved):
        weights = tmp / "w.safetensors"
        shutil.copy(saved / "lora.safetensors", weights)
        _truncate(weights)
        return [flag, str(weights)], rf"{flag} .*w.safetensors: .*truncated"
    return attack


def _network_weights_other_dim(tmp, saved):
    return (["--network_weights", str(saved / "lora.safetensors"), "--network_dim", "2"],
            r"--network_weights .*lora.safetensors: lora_\w+.lora_down.weight has rank 4, this run builds rank 2")


def _sample_prompt_bad_line(tmp, saved):
    prompts = tmp / "prompts.txt"
    prompts.write_text("# samples\na red square --w 64 --h 64\na blue square --w abc\n")
    return (["--sample_prompts", str(prompts), "--sample_every_n_steps", "1"],
            r"--sample_prompts: prompt file .*prompts.txt, line 3: prompt option --w: bad value 'abc'")


def _network_args(item: str, expected: str):
    def attack(tmp, saved):
        return ["--network_args", item], expected
    return attack


def _number(flag: str, value: str, valid: str):
    def attack(tmp, saved):
        return [f"--{flag}", value], rf"--{flag} {value}: must be {valid}"
    return attack


UP_FRONT = {
    "output_dir_is_a_file": _output_is_file,
    "output_dir_below_a_file": _output_below_a_file,
    "network_module_missing": _network_module_missing,
    "network_module_not_a_network": _network_module_not_a_network,
    "resume_truncated_state": _resume_truncated_state,
    "resume_without_state_file": _resume_without_state_file,
    "resume_damaged_progress": _resume_damaged_progress,
    "resume_other_network_dim": _resume_other_dim,
    "resume_other_trained_modules": _resume_other_modules,
    "network_weights_truncated": _truncated_lora("--network_weights"),
    "network_weights_other_dim": _network_weights_other_dim,
    "base_weights_truncated": _truncated_lora("--base_weights"),
    "sample_prompts_bad_line": _sample_prompt_bad_line,
    "network_args_dropout_2": _network_args("rank_dropout=2", r"network_args rank_dropout=2.0: expected a probability"),
    "network_args_conv_alpha_negative": _network_args("conv_alpha=-1", r"network_args conv_alpha=-1.0: expected a "
                                                                       r"number >= 0"),
    "network_args_conv_dim_nan": _network_args("conv_dim=nan", r"network_args conv_dim='nan': expected a finite"),
    "network_dim_0": _number("network_dim", "0", r"at least 1"),
    "network_alpha_negative": _number("network_alpha", "-1.0", r"at least 0"),
    "learning_rate_negative": _number("learning_rate", "-0.001", r"at least 0"),
    "unet_lr_nan": _number("unet_lr", "nan", r"at least 0"),
    "text_encoder_lr_negative": _number("text_encoder_lr", "-1.0", r"at least 0"),
    "max_train_epochs_0": _number("max_train_epochs", "0", r"at least 1"),
    "lr_warmup_steps_negative": _number("lr_warmup_steps", "-0.5", r"at least 0"),
    "lr_scheduler_num_cycles_0": _number("lr_scheduler_num_cycles", "0", r"at least 1"),
    "save_every_n_steps_negative": _number("save_every_n_steps", "-1", r"at least 0"),
    "noise_offset_inf": _number("noise_offset", "inf", r"at least 0"),
    "multires_noise_discount_2": _number("multires_noise_discount", "2.0", r"in \[0, 1\]"),
    "min_snr_gamma_negative": _number("min_snr_gamma", "-5.0", r"at least 0"),
    "ip_noise_gamma_negative": _number("ip_noise_gamma", "-0.1", r"at least 0"),
    "max_grad_norm_negative": _number("max_grad_norm", "-1.0", r"at least 0"),
    "prior_loss_weight_negative": _number("prior_loss_weight", "-1.0", r"at least 0"),
    "seed_negative": _number("seed", "-1", r"in \[0, 4294967295\]"),
}


@pytest.mark.parametrize("attack", list(UP_FRONT), ids=list(UP_FRONT))
def test_bad_input_is_refused_before_models_load(attack, model, data, saved, tmp_path, monkeypatch):
    extra, expected = UP_FRONT[attack](tmp_path, saved)
    _no_model_load(monkeypatch)
    message = _error_line(base_args(model, data, tmp_path / "out", *extra))
    assert re.search(expected, message), message
    assert not (tmp_path / "out").exists()  # a refused run leaves nothing behind


def test_unwritable_output_dir_is_refused_before_models_load(model, data, tmp_path, monkeypatch):
    """A read-only folder (simulated: the tests may run as root, which ignores permissions)."""
    out = tmp_path / "readonly"
    out.mkdir()
    real = file_io.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's name
        if dir is not None and Path(dir) == out:
            raise PermissionError(errno.EACCES, "Permission denied", str(out))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(preflight.tempfile, "mkstemp", mkstemp)
    _no_model_load(monkeypatch)
    message = _error_line(base_args(model, data, out))
    assert f"--output_dir {out}: cannot write there: Permission denied" in message


# ---------------------------------------------------------------- data: every bad image named

def test_every_unreadable_image_is_listed(model, tmp_path):
    data = solid_dataset(tmp_path, colours=((1, 2, 3), (4, 5, 6), (7, 8, 9), (9, 9, 9)))
    for name in ("1.png", "2.png"):
        (tmp_path / "img" / name).write_bytes(b"not a png")
    (tmp_path / "img" / "3.png").write_bytes(b"")  # zero bytes
    message = _error_line(base_args(model, data, tmp_path / "out", "--max_train_steps", "1"))
    assert "3 of 4 images cannot be read" in message
    for name in ("1.png", "2.png", "3.png"):
        assert str(tmp_path / "img" / name) in message
    assert str(tmp_path / "img" / "0.png") not in message


def test_image_below_one_bucket_step_is_named(model, tmp_path):
    data = solid_dataset(tmp_path, size=64, extra_general="enable_bucket = true\nbucket_no_upscale = true\n"
                                                          "min_bucket_reso = 64\nmax_bucket_reso = 128")
    Image.fromarray(np.zeros((40, 96, 3), np.uint8)).save(tmp_path / "img" / "small.png")
    (tmp_path / "img" / "small.caption").write_text("sks")
    message = _error_line(base_args(model, data, tmp_path / "out", "--max_train_steps", "1"))
    assert f"1 image(s) too small: {tmp_path / 'img' / 'small.png'}: image of 96x40 is smaller than one bucket " \
           "step (64)" in message


# ---------------------------------------------------------------- sample prompts at sample time

def test_a_bad_prompt_line_does_not_drop_the_others(tmp_path, caplog):
    from library.sample_prompts import read_prompt_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("one --w 64\ntwo --w abc\nthree --h 64\n")
    with caplog.at_level(logging.ERROR):
        specs = read_prompt_file(prompts, skip_invalid=True)
    assert [(s.prompt, s.index) for s in specs] == [("one", 0), ("three", 2)]
    assert "p.txt, line 2: prompt option --w: bad value 'abc'" in caplog.text


# ---------------------------------------------------------------- faults at save time: the weights are kept

def _failing_under(folder: Path, real, error: Exception):
    """`real(obj, path, ...)`, except that writing anywhere under `folder` raises `error`."""
    def write(obj, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(folder):
            raise error
        return real(obj, path, *args, **kwargs)
    return write


def test_disk_full_at_the_end_keeps_lora_and_state_beside_the_output(model, data, tmp_path, monkeypatch, caplog):
    import safetensors.torch
    from safetensors import SafetensorError

    out = tmp_path / "out"
    full = SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_under(out, safetensors.torch.save_file, full))
    torch_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 980")
    monkeypatch.setattr(torch, "save", _failing_under(out, torch.save, torch_full))
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 1000)  # and warn up front
    (tmp_path / "lora.safetensors").write_text("a file of the user's")  # never replaced by a fallback
    with caplog.at_level(logging.WARNING):
        trainer = train(base_args(model, data, out, "--max_train_steps", "2", "--save_state"))
    rescued = tmp_path / "lora-2.safetensors"
    assert trainer.final_path == str(rescued)
    assert set(load_state_dict(rescued)) == set(trainer.accelerator.unwrap_model(trainer.network).state_dict())
    assert (tmp_path / "lora.safetensors").read_text() == "a file of the user's"
    assert (tmp_path / "lora-state" / "train_state.pt").is_file()
    assert f"could not write the LoRA {out / 'lora.safetensors'} (no space left on device): saved it as " \
           f"{rescued} instead" in caplog.text
    assert f"could not write the training state {out / 'lora-state'} (write failed ([enforce fail at " \
           "inline_container.cc:672]" in caplog.text
    assert f"{out} has 0.0 MB free but this run writes about" in caplog.text
    assert out.is_dir() and list(out.iterdir()) == []  # no temporary file left in the full folder


def test_no_permission_for_periodic_saves_keeps_them_in_the_working_folder(model, data, tmp_path, monkeypatch,
                                                                           caplog):
    import safetensors.torch

    out = tmp_path / "nested" / "out"
    monkeypatch.chdir(tmp_path)
    denied = PermissionError(errno.EACCES, "Permission denied")
    blocked = tmp_path / "nested"  # the output folder and its parent refuse writes
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_under(blocked, safetensors.torch.save_file, denied))
    with caplog.at_level(logging.WARNING):
        trainer = train(base_args(model, data, out, "--max_train_steps", "2", "--save_every_n_steps", "1"))
    assert trainer.final_path == str(tmp_path / "lora.safetensors")
    assert (tmp_path / "lora-step00000001.safetensors").is_file()
    assert f"could not write the LoRA {out / 'lora-step00000001.safetensors'} (permission denied): saved it as " \
           f"{tmp_path / 'lora-step00000001.safetensors'} instead" in caplog.text


def test_save_that_fits_nowhere_names_every_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(file_io.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))

    def write(path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=r"could not write the LoRA .*a/out/x.safetensors \(no space left on device\), "
                                      r"nor in .*a, .*tmp"):
        file_io.save_with_fallback(tmp_path / "a" / "out" / "x.safetensors", write, "LoRA")


def test_other_write_errors_are_not_redirected(tmp_path):
    def write(path: str) -> None:
        raise ValueError("a bug, not a full disk")

    with pytest.raises(ValueError, match="a bug"):
        file_io.save_with_fallback(tmp_path / "x.safetensors", write)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- stale temporary files after kill -9

_KILLED_WRITER = """
import os, sys
from library.file_io import atomic_path, temp_dir_beside
folder = sys.argv[1]
temp_dir_beside(os.path.join(folder, "lora-state"))
with atomic_path(os.path.join(folder, "lora.safetensors")) as tmp:
    open(tmp, "wb").write(b"half a LoRA")
    os.kill(os.getpid(), 9)
"""


def test_temporaries_of_a_killed_run_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], env=env)
    assert proc.returncode == -9
    stale = sorted(p.name for p in out.iterdir())
    assert len(stale) == 2 and all(n.startswith(TEMP_PREFIX) for n in stale), stale
    assert any(n.endswith(".lora-state.tmp") for n in stale) and any(n.endswith(".lora.safetensors") for n in stale)
    others = [".lora.safetensors.abc123.tmp", "notes.txt", f"{TEMP_PREFIX}1-1@elsewhere.x.lora.safetensors"]
    for name in others:
        (out / name).write_text("not ours to remove")
    live = file_io.temp_file_beside(out / "running.safetensors")  # a live process's (ours) temporary
    old_foreign = out / f"{TEMP_PREFIX}1-1@container2.y.lora.safetensors"  # another host's, two days old
    old_foreign.write_text("x")
    os.utime(old_foreign, (old_foreign.stat().st_atime, old_foreign.stat().st_mtime - 2 * 86400))
    file_io._CLEANED.discard(os.path.abspath(out))

    preflight.check_output_dir(str(out))
    assert sorted(p.name for p in out.iterdir()) == sorted(others + [live.name])


# ---------------------------------------------------------------- disk-space estimate

def test_planned_saves_count_pruning():
    from argparse import Namespace

    args = Namespace(save_every_n_steps=10, save_last_n_epochs=None,
                     save_last_n_steps=20, save_state=True, save_last_n_epochs_state=None,
                     save_last_n_steps_state=None, save_state_on_train_end=False)
    # 9 step saves, at most 3 kept at once (20 steps = 2 files, plus the one just written), plus the final file
    plan = Namespace(num_epochs=1, max_train_steps=100, save_every_n_epochs=None)
    assert preflight.planned_saves(args, plan) == (4, 10)
    args.save_every_n_steps, args.save_state = None, False
    assert preflight.planned_saves(args, Namespace(num_epochs=10, max_train_steps=100, save_every_n_epochs=2)) == (5, 0)
