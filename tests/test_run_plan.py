"""The run's plan: every length-derived quantity computed once, after epochs are converted to steps."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from library.file_io import read_metadata
from library.run_plan import RunPlan
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


def _args(**kw):
    base = dict(max_train_steps=1600, max_train_epochs=None, gradient_accumulation_steps=1, lr_warmup_steps=0,
                save_every_n_epochs=None, save_n_epoch_ratio=None)
    return SimpleNamespace(**{**base, **kw})


def test_epochs_become_steps_before_anything_derived_from_the_length():
    plan = RunPlan.resolve(_args(max_train_epochs=3, lr_warmup_steps=0.25, save_n_epoch_ratio=2), num_batches=4)
    assert (plan.steps_per_epoch, plan.max_train_steps, plan.num_epochs) == (4, 12, 3)
    assert plan.lr_warmup_steps == 3 and plan.save_every_n_epochs == 1
    assert plan.token_warmup_steps(0.5) == 6 and plan.token_warmup_steps(5) == 5


def test_accumulation_processes_and_step_counts():
    plan = RunPlan.resolve(_args(max_train_steps=10, gradient_accumulation_steps=2, lr_warmup_steps=0.1,
                                 save_every_n_epochs=2), num_batches=5, num_processes=2)
    # 5 global batches (each split across the 2 processes), 2 per optimizer step: 3 steps per epoch
    assert plan.steps_per_epoch == 3 and plan.num_epochs == 4 and plan.num_processes == 2
    assert plan.lr_scheduler_steps == 10 and plan.lr_warmup_steps == 1 and plan.save_every_n_epochs == 2
    assert RunPlan.resolve(_args(lr_warmup_steps=7), 4).lr_warmup_steps == 7


def test_fractional_token_warmup_follows_max_train_epochs(tmp_path):
    """A 12-step run (--max_train_epochs 3, 4 batches) with token_warmup_step 0.5 warms up over 6 steps, not 800."""
    data = solid_dataset(tmp_path / "d", caption="sks, red, big, shiny, round", repeats=4,
                         extra_general="token_warmup_step = 0.5\ntoken_warmup_min = 1")
    out = tmp_path / "out"
    trainer = train(base_args(tiny_model_dir(), data, out, "--max_train_epochs", "3", "--lr_warmup_steps", "0.5",
                              "--lr_scheduler", "constant_with_warmup",
                              "--network_train_unet_only"))
    assert trainer.plan.max_train_steps == 12 and trainer.progress.global_step == 12
    assert trainer.args.max_train_steps == 1600  # the arguments stay as given
    assert read_metadata(out / "lora.safetensors")["ss_max_train_steps"] == "12"
    trainer.dataset.set_epoch(1)
    captions = {}
    for step in (0, 3, 6, 11):
        trainer.dataset.set_current_step(step)
        captions[step] = trainer.dataset[0]["captions"][0]
    assert captions[0] == "sks" and captions[3] == "sks, red, big"
    assert captions[6] == captions[11] == "sks, red, big, shiny, round"
    assert trainer.plan.lr_warmup_steps == 6
    assert trainer.lr_scheduler.scheduler.lr_lambdas[0](3) == pytest.approx(0.5)
