"""--fused_backward_pass: per-tensor updates inside backward give the plain step's weights; refusals are one line."""
from __future__ import annotations

import pytest
import torch

from library.file_io import load_state_dict
from library.fused_backward import FusedBackward
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))


def _run(fused: bool, optimizer_cls, steps: int = 5, accumulation: int = 1, **kwargs):
    model = _model()
    params = list(model.parameters())
    groups = [{"params": params[:2], "lr": 0.01}, {"params": params[2:], "lr": 0.03}]
    opt = optimizer_cls(groups, **kwargs)
    most_grads_alive = 0
    if fused:  # how many gradients exist when each update starts (hooks run in the order registered)
        def count(_p):
            nonlocal most_grads_alive
            most_grads_alive = max(most_grads_alive, sum(p.grad is not None for p in params))
        for p in params:
            p.register_post_accumulate_grad_hook(count)
    hooks = FusedBackward(opt) if fused else None
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for i in range(accumulation):
            sync = i == accumulation - 1
            if hooks:
                hooks.sync = sync
            x = torch.randn(4, 6, generator=gen)
            (model(x).square().mean() / accumulation).backward()
        if not hooks:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in params], opt, most_grads_alive


@pytest.mark.parametrize("cls, kwargs", [(torch.optim.AdamW, {"weight_decay": 0.1}),
                                         (torch.optim.SGD, {"momentum": 0.9, "nesterov": True})])
@pytest.mark.parametrize("accumulation", [1, 3])
def test_fused_updates_equal_the_plain_step(cls, kwargs, accumulation):
    plain, plain_opt, _ = _run(False, cls, accumulation=accumulation, **kwargs)
    fused, fused_opt, alive = _run(True, cls, accumulation=accumulation, **kwargs)
    for a, b in zip(plain, fused):
        assert not torch.equal(a, _model_param_like(a))  # the weights moved
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert alive == (1 if accumulation == 1 else 4)  # without accumulation one gradient at a time
    assert all(p.grad is None for g in fused_opt.param_groups for p in g["params"])
    assert len(fused_opt.param_groups) == 2 and [len(g["params"]) for g in fused_opt.param_groups] == [2, 2]


def _model_param_like(t: torch.Tensor) -> torch.Tensor:
    for p in _model().parameters():
        if p.shape == t.shape:
            return p.detach()
    raise AssertionError


def test_fused_training_equals_plain_training(tmp_path):
    model = tiny_model_dir()
    data = solid_dataset(tmp_path / "d", colours=((200, 0, 0), (0, 0, 200), (0, 200, 0)), caption="sks")
    common = ["--max_train_steps", "3", "--max_grad_norm", "0", "--gradient_accumulation_steps", "2",
              "--optimizer_args", "weight_decay=0.05", "--lr_scheduler", "linear"]
    plain = train(base_args(model, data, tmp_path / "plain", *common))
    fused = train(base_args(model, data, tmp_path / "fused", *common, "--fused_backward_pass"))
    assert fused.fused_backward.updates == 3 * len(fused.trainable)
    assert plain.step_losses == pytest.approx(fused.step_losses, rel=1e-5)
    a, b = load_state_dict(tmp_path / "plain" / "lora.safetensors"), load_state_dict(tmp_path / "fused" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_up" in k)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ([], "add --max_grad_norm 0"),
    (["--max_grad_norm", "0", "--optimizer_type", "Prodigy"], "cannot be used with --optimizer_type Prodigy"),
    (["--max_grad_norm", "0", "--mixed_precision", "fp16"], "use --mixed_precision bf16"),
])
def test_refused_combinations(tmp_path, extra, message):
    model = tiny_model_dir()
    data = solid_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match=message):
        train(base_args(model, data, tmp_path / "o", "--fused_backward_pass", *extra))
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
