"""--fp8_base / --fp8_base_unet: float8 storage with a per-layer upcast trains like the fp8-rounded model."""
from __future__ import annotations

import pytest
import torch

from library import fp8, train_args
from library.file_io import load_state_dict
from library.model_loading import load_models
from tests.train_helpers import base_args, parse, reset_accelerate, solid_dataset, tiny_model_dir, train


def _train_on(components, argv):
    from library.network_trainer import NetworkTrainer

    reset_accelerate()
    args = parse(argv)
    train_args.validate_args(args)
    trainer = NetworkTrainer(args, False)
    trainer.setup(components=components)
    trainer.final_path = trainer.run()
    return trainer, load_state_dict(trainer.final_path)


@pytest.mark.parametrize("flag, precision", [("--fp8_base", "no"), ("--fp8_base_unet", "bf16")])
def test_fp8_storage_trains_like_the_rounded_model(tmp_path, monkeypatch, flag, precision):
    model = tiny_model_dir()
    data = solid_dataset(tmp_path / "d", colours=((200, 0, 0), (0, 0, 200)))
    common = ["--max_train_steps", "3", "--mixed_precision", precision]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # the trainer rounds after placing in it
    rounded = load_models(model, dtype=dtype)
    fp8.round_to_fp8(rounded.unet, fp8.KEEP)
    if flag == "--fp8_base":
        fp8.round_to_fp8(rounded.text_encoder)
    from networks.lora import LoRAModule

    # the upcasting forward is not a plain nn.Linear, so its LoRA takes the unfused path: the reference too
    # (in bf16 the two paths round differently, and AdamW turns that into lr-sized differences)
    monkeypatch.setattr(LoRAModule, "fused_linear", False)
    _, ref = _train_on(rounded, base_args(model, data, tmp_path / "ref", *common))
    trainer, got = _train_on(load_models(model), base_args(model, data, tmp_path / "fp8", *common, flag))
    unet = trainer.components.unet
    stored = {type(m).__name__ for m in unet.modules() if getattr(m, "weight", None) is not None
              and m.weight.dtype == torch.float8_e4m3fn}
    assert stored == {"Linear", "Conv2d"} and unet.conv_in.weight.dtype != torch.float8_e4m3fn
    te_dtypes = {p.dtype for p in trainer.components.text_encoder.parameters()}
    assert (torch.float8_e4m3fn in te_dtypes) == (flag == "--fp8_base")
    assert ref.keys() == got.keys() and any(v.abs().sum() > 0 for k, v in got.items() if "lora_up" in k)
    tol = {"rtol": 1e-4, "atol": 1e-5}
    for k in ref:
        torch.testing.assert_close(got[k].float(), ref[k].float(), **tol)
    plain = load_models(model)  # and the rounding itself changes the result only a little
    _, unrounded = _train_on(plain, base_args(model, data, tmp_path / "plain", *common))
    diff = max((got[k].float() - unrounded[k].float()).abs().max().item() for k in ref)
    assert diff < 0.05 * max(v.float().abs().max().item() for v in unrounded.values())


def test_upcast_layer_equals_the_rounded_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 5).requires_grad_(False)
    reference = torch.nn.Linear(8, 5).requires_grad_(False)
    reference.load_state_dict(layer.state_dict())
    fp8.round_to_fp8(reference)
    assert fp8.store_in_fp8(torch.nn.Sequential(layer)) == 1
    x = torch.randn(3, 8, requires_grad=True)
    out = layer(x)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.element_size() == 1
    assert torch.equal(out, reference(x))
    out.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, reference.weight.sum(0).expand(3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_devices_without_float8_are_refused(tmp_path, monkeypatch):
    assert fp8.fp8_problem(torch.device("cpu")) is None

    def no_fp8(device):
        raise RuntimeError("float8 not supported")
    monkeypatch.setattr(fp8, "_roundtrip", no_fp8)
    data = solid_dataset(tmp_path / "d")
    with pytest.raises(ValueError, match=r"--fp8_base / --fp8_base_unet: this device \(cpu\) cannot store float8"):
        train(base_args(tiny_model_dir(), data, tmp_path / "o", "--fp8_base"))
