"""--torch_compile: the U-Net's blocks compiled (LoRA hooks, gradient checkpointing, SDPA) train to the same weights."""
from __future__ import annotations

import shutil

import pytest
import torch

from library.compile import compile_problem
from library.file_io import load_state_dict
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


def test_compiled_unet_trains_to_the_plain_weights(tmp_path):
    """backend eager: dynamo traces every block (graph capture, guards, LoRA forward inside); inductor is measured
    by bench/bench_compile.py (compiling kernels takes minutes on these CPUs)."""
    model = tiny_model_dir()
    data = solid_dataset(tmp_path / "d", colours=((200, 0, 0), (0, 0, 200)))
    common = ["--max_train_steps", "2", "--gradient_checkpointing", "--network_train_unet_only"]
    plain = train(base_args(model, data, tmp_path / "plain", *common))
    torch._dynamo.reset()
    compiled = train(base_args(model, data, tmp_path / "compiled", *common, "--torch_compile",
                               "--dynamo_backend", "EAGER"))  # accelerate spells them in capitals too
    compiled_blocks = [m for m in compiled.components.unet.modules() if getattr(m, "_compiled_call_impl", None)]
    assert len(compiled_blocks) > 4
    assert compiled.step_losses == pytest.approx(plain.step_losses, rel=1e-6)
    a = load_state_dict(tmp_path / "plain" / "lora.safetensors")
    b = load_state_dict(tmp_path / "compiled" / "lora.safetensors")
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in b.items() if "lora_up" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_backend_problems_are_one_line(monkeypatch):
    assert compile_problem("eager", torch.device("cpu")) is None
    assert "needs a CUDA GPU" in compile_problem("cudagraphs", torch.device("cpu"))
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "needs a C compiler" in compile_problem("inductor", torch.device("cpu"))


def test_unknown_backend_is_refused_by_the_parser(tmp_path, capsys):
    from tests.train_helpers import parse

    with pytest.raises(SystemExit):
        parse(["--dynamo_backend", "fastest"])
    assert "--dynamo_backend: invalid choice: 'fastest'" in capsys.readouterr().err
