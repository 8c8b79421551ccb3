"""LoRA+ (`--network_args loraplus_lr_ratio=R`): the lora_up weights get R x their group's learning rate."""
from __future__ import annotations

import pytest
import torch

from networks import lora
from networks.loraplus import parse_ratios
from tests.conftest import tiny_models


def network(**kwargs):
    m = tiny_models("sd1")
    return lora.create_network(1.0, 4, 1, None, m.text_encoder, m.unet, **kwargs)


def _ids(params):
    return {id(p) for p in params}


def test_up_weights_get_ratio_times_the_group_lr_and_an_update_r_times_larger():
    net = network(loraplus_lr_ratio="16")
    groups = net.prepare_optimizer_params(5e-5, 1e-4, 1e-3)
    assert net.lr_descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([5e-5, 16 * 5e-5, 1e-4, 16 * 1e-4])
    ups = _ids(m.lora_up.weight for m in net.unet_loras)
    downs = _ids(m.lora_down.weight for m in net.unet_loras)
    assert _ids(groups[3]["params"]) == ups and _ids(groups[2]["params"]) == downs
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))

    # an actual SGD step with gradient 1 everywhere: up moves 16x as far as down
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    up, down = net.unet_loras[0].lora_up.weight, net.unet_loras[0].lora_down.weight
    up0, down0 = up.detach().clone(), down.detach().clone()
    torch.optim.SGD(groups, lr=1.0).step()
    torch.testing.assert_close(up0 - up.detach(), torch.full_like(up, 16 * 1e-4))
    torch.testing.assert_close(down0 - down.detach(), torch.full_like(down, 1e-4))


def test_part_ratios_override_and_default_lr_is_used_without_unet_lr():
    net = network(loraplus_lr_ratio=4, loraplus_unet_lr_ratio="8")
    groups = net.prepare_optimizer_params(None, None, 1e-3)
    lrs = dict(zip(net.lr_descriptions, (g["lr"] for g in groups)))
    assert lrs == pytest.approx({"textencoder": 1e-3, "textencoder plus": 4e-3, "unet": 1e-3, "unet plus": 8e-3})
    only_te = network(loraplus_text_encoder_lr_ratio=2)
    only_te.prepare_optimizer_params(None, None, 1e-3)
    assert only_te.lr_descriptions == ["textencoder", "textencoder plus", "unet"]


def test_combines_with_block_lr_weights():
    net = network(loraplus_lr_ratio=16, mid_lr_weight="2.0")
    groups = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    lrs = dict(zip(net.lr_descriptions, (g["lr"] for g in groups)))
    assert lrs["unet block 12"] == pytest.approx(2e-4) and lrs["unet block 12 plus"] == pytest.approx(32e-4)
    assert lrs["unet block 1"] == pytest.approx(1e-4) and lrs["unet block 1 plus"] == pytest.approx(16e-4)


def test_without_loraplus_groups_are_unchanged():
    net = network()
    groups = net.prepare_optimizer_params(None, 1e-4, 1e-3)
    assert net.lr_descriptions == ["textencoder", "unet"] and "lr" not in groups[0] and groups[1]["lr"] == 1e-4


@pytest.mark.parametrize("value", ["0", "-2", "abc", "nan"])
def test_bad_ratio_is_a_one_line_error_naming_the_argument(value):
    with pytest.raises(ValueError, match=f"network_args loraplus_unet_lr_ratio={value}: expected"):
        parse_ratios({"loraplus_unet_lr_ratio": value})


def test_training_logs_the_plus_groups_and_records_the_ratio(tmp_path):
    from library.file_io import read_metadata
    from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train

    trainer = train(base_args(tiny_model_dir(), solid_dataset(tmp_path / "data"), tmp_path / "out",
                              "--max_train_steps", "1", "--network_train_unet_only", "--unet_lr", "2e-4",
                              "--network_args", "loraplus_lr_ratio=16"))
    logs = trainer.lr_logs()
    assert logs == pytest.approx({"lr/unet": 2e-4, "lr/unet plus": 32e-4})
    assert read_metadata(tmp_path / "out" / "lora.safetensors")["ss_loraplus_lr_ratio"] == "16.0"
