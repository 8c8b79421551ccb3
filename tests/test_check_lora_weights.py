"""check_lora_weights.py: the per-module table, NaN/inf and zero deltas, names and shapes against a model."""
from __future__ import annotations

import pytest
import torch

from networks import check_lora_weights
from networks.lora_math import DOWN, UP
from tests.conftest import tiny_models
from tests.lora_fixtures import random_lora, write_lora
from tests.lora_tool_fixtures import random_network, write_network
from tests.model_fixtures import tiny_model_path

# real-size SD1 layers (names and weight shapes of the full model)
REAL_SD1 = {
    "lora_te_text_model_encoder_layers_11_mlp_fc1": (3072, 768),
    "lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320, 1, 1),
    "lora_unet_up_blocks_3_resnets_2_conv1": (320, 640, 3, 3),
}


def test_table_lists_every_module_with_dims_alpha_and_norms(tmp_path, capsys):
    sd = random_lora(REAL_SD1, rank=4, alpha=2.0, seed=1)
    path = write_lora(tmp_path / "ok.safetensors", sd)
    check_lora_weights.main([path, "--arch", "sd1"])
    lines = capsys.readouterr().out.splitlines()
    for name, shape in REAL_SD1.items():
        row = next(line for line in lines if line.startswith(name + " "))
        fields = row.split()
        in_dim = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        assert fields[2:6] == [str(in_dim), str(shape[0]), "4", "2"]
        assert float(fields[6]) == pytest.approx(float(sd[name + DOWN].norm()), rel=1e-3)
        delta = (sd[name + UP].reshape(shape[0], 4) @ sd[name + DOWN].reshape(4, -1)) * 0.5
        assert float(fields[8]) == pytest.approx(float(delta.norm()), rel=1e-3)
    assert lines[-1] == "3 modules, ranks [4], 0 problem(s)"


def test_flags_nan_inf_zero_and_unknown_names(tmp_path, capsys):
    sd = random_lora(REAL_SD1, rank=2, seed=1)
    names = list(REAL_SD1)
    sd[names[0] + DOWN][0, 0] = float("nan")
    sd[names[1] + UP][0, 0] = float("inf")
    sd[names[2] + UP].zero_()
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.randn(2, 8)
    sd["lora_unet_not_a_layer.lora_up.weight"] = torch.randn(8, 2)
    sd["lora_unet_not_a_layer.alpha"] = torch.tensor(2.0)
    path = write_lora(tmp_path / "bad.safetensors", sd)
    with pytest.raises(SystemExit) as exc:
        check_lora_weights.main([path, "--arch", "sd1", "--problems_only"])
    assert exc.value.code == 1
    out = capsys.readouterr().out
    assert "1 NaN and 0 inf values" in out and "0 NaN and 1 inf values" in out
    assert "delta is zero" in out and "matches no LoRA layer of SD 1.x" in out
    assert out.splitlines()[-1].endswith("4 problem(s)")
    with pytest.raises(SystemExit) as exc:  # an SD1 LoRA checked against SDXL: every name is foreign
        check_lora_weights.main([write_lora(tmp_path / "ok.safetensors", random_lora(REAL_SD1, 2)), "--arch", "sdxl"])
    assert exc.value.code == 1


def test_against_a_model_file(tmp_path, capsys):
    net = random_network(tiny_models("sd1"), dim=2, conv_dim=2)
    path = write_network(net, tmp_path / "tiny.safetensors")
    check_lora_weights.main([path, "--sd_model", str(tiny_model_path("sd1"))])
    full = capsys.readouterr().out.splitlines()
    assert full[-1].endswith("0 problem(s)") and full[-1].startswith(f"{len(full) - 2} modules")
    check_lora_weights.main([path, "--sd_model", str(tiny_model_path("sd1")), "--problems_only"])
    shown = capsys.readouterr().out.splitlines()
    assert shown == [full[0], full[-1]]  # no module rows, but the summary counts every module
    with pytest.raises(SystemExit) as exc:  # a tiny SD1 LoRA does not fit the tiny SD2 model
        check_lora_weights.main([path, "--sd_model", str(tiny_model_path("sd2"))])
    assert exc.value.code == 1
    assert "does not fit the layer's weight" in capsys.readouterr().out


def test_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        check_lora_weights.main([str(tmp_path / "nope.safetensors")])
    path = write_lora(tmp_path / "x.safetensors", {"unet.conv_in.oft_blocks": torch.zeros(2, 2)})
    with pytest.raises(SystemExit, match="LyCORIS OFT tensor, a format these tools do not read"):
        check_lora_weights.main([path])
    with pytest.raises(SystemExit, match="--arch or --sd_model, not both"):
        check_lora_weights.main([path, "--arch", "sd1", "--sd_model", path])


def test_docs_worked_example(tmp_path, monkeypatch, capsys):
    from tests.lora_tool_fixtures import doc_commands, write_checkpoint

    models = tiny_models("sd1")
    write_checkpoint(models, tmp_path / "model.safetensors")
    write_network(random_network(models, dim=2, conv_dim=2), tmp_path / "char.safetensors")
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands("check_lora_weights.md", "check_lora_weights.py"):
        check_lora_weights.main(argv)
    assert capsys.readouterr().out.splitlines()[-1].endswith("ranks [2], 0 problem(s)")
