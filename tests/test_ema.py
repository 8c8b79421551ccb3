"""EMA of the LoRA weights: the hand-computed average, saving (EMA / raw), state and exact resume."""
from __future__ import annotations

import pytest
import torch

from library.ema import LoRAEMA
from library.file_io import load_state_dict, read_metadata
from tests.train_helpers import base_args, solid_dataset, train


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return solid_dataset(tmp_path_factory.mktemp("data"), colours=((200, 40, 40), (40, 40, 200)))


def test_average_equals_the_hand_computed_one_with_warmup():
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = LoRAEMA([("w", p)], decay=0.9, warmup_steps=2)
    expected = torch.tensor([0.0, 10.0])
    for n, value in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            p.fill_(value)
        ema.update()
        d = 0.9 * min(1.0, n / 2)  # 0.45, 0.9, 0.9
        expected = d * expected + (1 - d) * value
    torch.testing.assert_close(ema.shadow[0], expected)
    with ema.applied():
        torch.testing.assert_close(p.detach(), expected)
    assert p.detach().tolist() == [4.0, 4.0]  # own weights back


def test_saved_file_holds_the_ema_weights_and_resume_continues_exactly(model, dataset, tmp_path):
    opts = ("--network_train_unet_only", "--ema_decay", "0.5", "--ema_on_cpu", "--save_ema_and_raw",
            "--learning_rate", "1e-2")
    full = train(base_args(model, dataset, tmp_path / "full", "--max_train_steps", "4", *opts))
    net = full.accelerator.unwrap_model(full.network)
    saved = load_state_dict(tmp_path / "full" / "lora.safetensors")
    raw = load_state_dict(tmp_path / "full" / "lora-raw.safetensors")
    names = full.features.ema.names
    assert full.features.ema.num_updates == 4 and full.features.ema.shadow[0].device.type == "cpu"
    for name, shadow in zip(names, full.features.ema.shadow):
        torch.testing.assert_close(saved[name], shadow)
        torch.testing.assert_close(raw[name], net.state_dict()[name])
    assert any(not torch.equal(saved[n], raw[n]) for n in names)
    assert read_metadata(tmp_path / "full" / "lora.safetensors")["ss_ema_decay"] == "0.5"

    half = train(base_args(model, dataset, tmp_path / "half", "--max_train_steps", "2", "--save_state", *opts))
    state = tmp_path / "half" / "lora-state"
    assert (state / "ema.safetensors").is_file() and half.features.ema.num_updates == 2
    resumed = train(base_args(model, dataset, tmp_path / "resumed", "--max_train_steps", "4", "--resume", str(state),
                              *opts))
    assert resumed.features.ema.num_updates == 4
    final = load_state_dict(tmp_path / "resumed" / "lora.safetensors")
    for name in names:
        torch.testing.assert_close(final[name], saved[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("extra, message", [
    (("--ema_decay", "1.5"), "--ema_decay 1.5: expected a number between 0 and 1"),
    (("--ema_on_cpu",), "--ema_on_cpu needs --ema_decay"),
    (("--ema_decay", "0.9", "--save_ema_only", "--save_ema_and_raw"), "exclude each other"),
])
def test_bad_options_are_refused_before_loading(model, dataset, tmp_path, extra, message):
    from library import train_args
    from tests.train_helpers import parse

    with pytest.raises(ValueError, match=message):
        train_args.validate_args(parse(base_args(model, dataset, tmp_path, *extra)))
