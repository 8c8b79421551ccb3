"""Every --optimizer_type name takes a step; --optimizer_args parsing; every --lr_scheduler."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from library import lr_schedulers, optimizers


def _params(lr=1e-3):
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    return layer, [{"params": list(layer.parameters()), "lr": lr}]


_PACKAGES = {"adamw8bit": "bitsandbytes", "pagedadamw8bit": "bitsandbytes", "lion8bit": "bitsandbytes",
             "pagedlion8bit": "bitsandbytes", "sgdnesterov8bit": "bitsandbytes", "lion": "lion_pytorch",
             "prodigy": "prodigyopt", "adafactor": "transformers"}


@pytest.mark.parametrize("name", optimizers.OPTIMIZER_NAMES + ("RMSprop", "torch.optim.Adagrad"))
def test_each_optimizer_steps(name):
    package = _PACKAGES.get(name.lower(), "dadaptation" if name.lower().startswith("dadapt") else "torch")
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"optional package {package} is not installed")
    lr = 1.0 if optimizers.is_adaptive(name) else 1e-2
    layer, groups = _params(lr)
    before = [p.detach().clone() for p in layer.parameters()]
    result = optimizers.build_optimizer(name, groups, lr)
    for _ in range(2):
        loss = layer(torch.randn(16, 8)).pow(2).mean()
        loss.backward()
        result.optimizer.step()
        result.optimizer.zero_grad(set_to_none=True)
    changed = [not torch.equal(a, b) for a, b in zip(before, layer.parameters())]
    assert any(changed), f"{name} did not change the weights"


def test_documented_defaults():
    layer, groups = _params()
    sgd = optimizers.build_optimizer("SGDNesterov", groups, 0.1).optimizer
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    layer, groups = _params()
    ada = optimizers.build_optimizer("AdaFactor", groups, 1e-3)
    assert ada.optimizer.defaults["relative_step"] is True and ada.optimizer.defaults["lr"] is None
    assert ada.scheduler_override == "adafactor" and ada.initial_lr == 1e-3
    assert "lr" not in ada.optimizer.param_groups[0] or ada.optimizer.param_groups[0]["lr"] is None
    layer, groups = _params()
    fixed = optimizers.build_optimizer("adafactor", groups, 1e-3, ["relative_step=False", "scale_parameter=False"])
    assert fixed.scheduler_override is None and fixed.optimizer.param_groups[0]["lr"] == 1e-3


def test_optimizer_args_parsing():
    kw = optimizers.parse_kwargs(["weight_decay=0.01", "betas=.9,.999", "relative_step=False", "name=abc",
                                  "eps=1e-8", "ids=[1, 2]"])
    assert kw == {"weight_decay": 0.01, "betas": (0.9, 0.999), "relative_step": False, "name": "abc",
                  "eps": 1e-8, "ids": [1, 2]}
    layer, groups = _params()
    adamw = optimizers.build_optimizer("AdamW", groups, 1e-3, ["weight_decay=0.05", "betas=0.8,0.99"]).optimizer
    assert adamw.defaults["weight_decay"] == 0.05 and adamw.defaults["betas"] == (0.8, 0.99)
    with pytest.raises(ValueError, match="expected key=value"):
        optimizers.parse_kwargs(["weight_decay"])
    with pytest.raises(ValueError, match="--optimizer_args for AdamW"):
        optimizers.build_optimizer("AdamW", _params()[1], 1e-3, ["no_such_arg=1"])


def test_unknown_and_missing_package_errors():
    with pytest.raises(ValueError, match="unknown optimizer; expected one of AdamW"):
        optimizers.check_optimizer_available("AdamWW")
    with pytest.raises(ValueError, match="needs the pip package 'nonexistent_pkg_xyz'"):
        optimizers.check_optimizer_available("nonexistent_pkg_xyz.Opt")
    optimizers._NAMED["fakeopt"] = ("fake-opt-package", "fake_opt_module.FakeOpt", {})
    try:
        with pytest.raises(ValueError, match=r"pip install fake-opt-package"):
            optimizers.check_optimizer_available("FakeOpt")
    finally:
        del optimizers._NAMED["fakeopt"]


def test_effective_lr_of_adaptive_optimizer():
    layer, groups = _params(0.5)
    opt = optimizers.build_optimizer("Prodigy", groups, 1.0).optimizer
    layer(torch.randn(4, 8)).sum().backward()
    opt.step()
    d = opt.param_groups[0]["d"]
    assert optimizers.effective_lrs(opt) == [pytest.approx(d * 0.5)]


def _lrs(name, steps=10, **kw):
    layer, groups = _params()
    opt = torch.optim.SGD(groups, lr=1e-3)
    sched = lr_schedulers.build_scheduler(name, opt, steps, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedulers_shapes():
    assert _lrs("constant") == [1e-3] * 10
    warm = _lrs("constant_with_warmup", num_warmup_steps=4)
    assert warm[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]) and warm[-1] == 1e-3
    lin = _lrs("linear")
    assert lin[0] == pytest.approx(1e-3) and lin[5] == pytest.approx(5e-4) and lin[-1] == pytest.approx(1e-4)
    cos = _lrs("cosine")
    assert cos[0] == pytest.approx(1e-3) and cos[5] == pytest.approx(5e-4)
    restarts = _lrs("cosine_with_restarts", num_cycles=2)
    assert restarts[0] == pytest.approx(1e-3) and restarts[5] == pytest.approx(1e-3) and restarts[4] < 2e-4
    poly = _lrs("polynomial", power=2.0)
    assert poly[5] == pytest.approx((1e-3 - 1e-7) * 0.25 + 1e-7)
    ratio = _lrs("linear", num_warmup_steps=0.2)
    assert ratio[:3] == pytest.approx([0, 5e-4, 1e-3])


def test_custom_and_adafactor_schedulers_and_errors():
    steplr = _lrs("torch.optim.lr_scheduler.StepLR", scheduler_args=["step_size=3", "gamma=0.5"])
    assert steplr[:7] == pytest.approx([1e-3] * 3 + [5e-4] * 3 + [2.5e-4])
    layer, groups = _params()
    ada = optimizers.build_optimizer("AdaFactor", groups, 1e-3)
    sched = lr_schedulers.build_scheduler("adafactor", ada.optimizer, 10, initial_lr=ada.initial_lr)
    assert sched.get_lr()[0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_schedulers.check_scheduler_name("cosinus")


def test_scheduler_state_restores():
    layer, groups = _params()
    opt = torch.optim.SGD(groups, lr=1e-3)
    sched = lr_schedulers.build_scheduler("cosine", opt, 10, num_warmup_steps=2)
    for _ in range(4):
        opt.step()
        sched.step()
    state = sched.state_dict()
    layer2, groups2 = _params()
    opt2 = torch.optim.SGD(groups2, lr=1e-3)
    opt2.load_state_dict(opt.state_dict())
    sched2 = lr_schedulers.build_scheduler("cosine", opt2, 10, num_warmup_steps=2)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr()
