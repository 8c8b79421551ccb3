"""docs/lycoris.md's worked example, run as printed on a tiny SD 1.x model: train a LoHa, check it, merge it into
the model, SVD-merge it into a LoRA; the merged model and the LoRA give what the LoHa gives."""
from __future__ import annotations

import importlib
import re
import shlex
import shutil
from pathlib import Path

import torch

from networks import lora
from tests.conftest import tiny_models
from tests.lora_helpers import outputs
from tests.lora_tool_fixtures import load_checkpoint_models
from tests.model_fixtures import tiny_model_path
from tests.train_helpers import solid_dataset, tiny_model_dir, train


def worked_example() -> list[list[str]]:
    text = (Path(__file__).resolve().parent.parent / "docs" / "lycoris.md").read_text(encoding="utf-8")
    block = re.findall(r"```bash\n(.*?)```", text.split("## Worked example", 1)[1], re.S)[0]
    return [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def applied(files_and_muls) -> list[torch.Tensor]:
    m = tiny_models("sd1")
    for file, mul in files_and_muls:
        net, sd = lora.create_network_from_weights(mul, file, None, m.text_encoder, m.unet)
        net.apply_to(m.text_encoder, m.unet)
        net.load_state_dict(sd, strict=False)
    return outputs(m)


def test_worked_example(tmp_path, monkeypatch, capsys):
    shutil.copy(tiny_model_path("sd1"), tmp_path / "model.safetensors")
    shutil.copytree(tiny_model_dir("sd1"), tmp_path / "model")
    solid_dataset(tmp_path, colours=((200, 40, 40),), caption="sks")
    monkeypatch.chdir(tmp_path)
    commands = worked_example()
    launch = ["accelerate", "launch", "-q", "--config_file", "examples/accelerate/single_process.yaml",
              "train_network.py"]
    assert commands[0][:6] == launch
    for words in commands:
        if words[0] == "accelerate":
            train(words[6:])
        else:
            assert words[0] == "python" and words[1].startswith("networks/")
            importlib.import_module(words[1][:-3].replace("/", ".")).main(words[2:])
    assert "loha:conv3x3" in capsys.readouterr().out
    loha = str(tmp_path / "out" / "loha.safetensors")
    close = lambda a, b: all(torch.allclose(x, y, atol=3e-4, rtol=1e-4) for x, y in zip(a, b))  # noqa: E731
    assert not close(applied([(loha, 1.0)]), outputs(tiny_models("sd1")))  # training changed the model
    assert close(outputs(load_checkpoint_models("merged.safetensors", "sd1")), applied([(loha, 0.8)]))
    assert close(applied([("loha_as_lora.safetensors", 1.0)]), applied([(loha, 1.0)]))
