"""--save_state / --resume continue exactly: same losses, step counter, learning rate and weights."""
from __future__ import annotations

import json

import pytest
import torch

from library.file_io import load_state_dict
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = solid_dataset(root, colours=((200, 0, 0), (0, 200, 0), (0, 0, 200)), caption=["sks red", "sks green",
                                                                                          "sks blue"])
    return tiny_model_dir(), data, root


_ARGS = ("--max_train_steps", "7", "--save_state", "--lr_scheduler", "cosine_with_restarts",
         "--lr_scheduler_num_cycles", "2", "--lr_warmup_steps", "2", "--network_dropout", "0.1",
         "--noise_offset", "0.05")


def test_resume_from_epoch_and_mid_epoch_states_matches_uninterrupted_run(setup, tmp_path):
    model, data, _ = setup
    full = train(base_args(model, data, tmp_path / "full", *_ARGS, "--save_every_n_epochs", "1",
                           "--save_every_n_steps", "2"))
    assert len(full.step_losses) == 7
    final = load_state_dict(tmp_path / "full" / "lora.safetensors")
    full_lr = full.optimizer.param_groups[0]["lr"]

    for state, done in (("lora-000001-state", 3), ("lora-step00000004-state", 4)):
        progress = json.loads((tmp_path / "full" / state / "progress.json").read_text())
        assert progress["global_step"] == done
        resumed = train(base_args(model, data, tmp_path / f"resumed{done}", *_ARGS,
                                  "--resume", str(tmp_path / "full" / state)))
        assert resumed.progress.global_step == 7
        assert resumed.step_losses == pytest.approx(full.step_losses[done:], rel=1e-6, abs=1e-7)
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(full_lr)
        weights = load_state_dict(tmp_path / f"resumed{done}" / "lora.safetensors")
        for key, value in final.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


def test_resume_rejects_a_different_network(setup, tmp_path):
    model, data, _ = setup
    train(base_args(model, data, tmp_path / "a", "--max_train_steps", "3", "--save_state",
                    "--save_every_n_steps", "1"))
    with pytest.raises(ValueError, match="does not match this network"):
        train(base_args(model, data, tmp_path / "b", "--max_train_steps", "3", "--network_train_unet_only",
                        "--resume", str(tmp_path / "a" / "lora-step00000001-state")))


def test_loader_workers_give_the_same_batches(setup, tmp_path):
    """Worker processes (persistent or not) see the epoch changes: the same losses as loading in-process."""
    model, data, _ = setup
    runs = {}
    for name, extra in (("inline", []), ("workers", ["--max_data_loader_n_workers", "1"]),
                        ("persistent", ["--max_data_loader_n_workers", "1", "--persistent_data_loader_workers"])):
        argv = base_args(model, data, tmp_path / name, "--max_train_steps", "7", *extra)  # later flags win
        runs[name] = train(argv).step_losses
    assert runs["workers"] == runs["inline"] and runs["persistent"] == runs["inline"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs wherever a GPU is present)")
def test_cuda_rng_state_is_saved_and_restored(tmp_path):
    from library import train_state

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.cuda.manual_seed_all(3)
    torch.randn(5, device="cuda")
    train_state.save_state(tmp_path / "s", network=net, optimizer=opt, scheduler=None,
                           progress=train_state.Progress())
    expected = torch.randn(8, device="cuda")
    torch.cuda.manual_seed_all(99)
    train_state.load_state(tmp_path / "s", network=net, optimizer=opt, scheduler=None)
    assert torch.equal(torch.randn(8, device="cuda"), expected)
def test_resume_without_seed_uses_the_seed_the_run_drew(setup, tmp_path):
    """No --seed: the drawn seed is stored in the state and the resumed run continues the same data order,
    noise and augmentations (issue 13.5)."""
    model, data, _ = setup

    def no_seed(out, *extra):
        argv = base_args(model, data, out, "--max_train_steps", "7", "--save_state", "--noise_offset", "0.05", *extra)
        del argv[argv.index("--seed"):argv.index("--seed") + 2]
        return argv

    full = train(no_seed(tmp_path / "full", "--save_every_n_steps", "4"))
    state = tmp_path / "full" / "lora-step00000004-state"
    seed = json.loads((state / "progress.json").read_text())["seed"]
    resumed = train(no_seed(tmp_path / "resumed", "--resume", str(state)))
    assert resumed.seed == seed == full.seed
    assert resumed.step_losses == pytest.approx(full.step_losses[4:], rel=1e-6, abs=1e-7)
    final, weights = (load_state_dict(tmp_path / d / "lora.safetensors") for d in ("full", "resumed"))
    for key, value in final.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)
