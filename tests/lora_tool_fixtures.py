"""Tiny single-file checkpoints and trained-looking LoRAs for the LoRA tool tests (merge, extract, check)."""
from __future__ import annotations

from pathlib import Path

import torch

from library import ldm_convert as lc
from library.file_io import load_state_dict
from library.model_loading import save_models
from networks.lora import create_network, create_network_from_weights
from tests.conftest import tiny_models
from tests.lora_helpers import outputs, randomize


def write_checkpoint(models, path: Path) -> str:
    save_models(models, path)
    return str(path)


def random_network(models, dim: int = 4, alpha: float = 2.0, conv_dim: int | None = 2, seed: int = 3,
                   scale: float = 0.2):
    """A LoRA network (C3Lier when `conv_dim`) on `models` with random non-zero weights."""
    kwargs = {"conv_dim": conv_dim, "conv_alpha": 1.0} if conv_dim else {}
    net = create_network(1.0, dim, alpha, None, models.text_encoder, models.unet, **kwargs)
    randomize(net, scale=scale, seed=seed)
    return net


def write_network(net, path: Path, metadata: dict | None = None) -> str:
    net.save_weights(path, torch.float32, metadata)
    return str(path)


def outputs_with_loras(arch: str, files_and_multipliers) -> list[torch.Tensor]:
    """Outputs of fresh tiny `arch` models with each LoRA file applied (apply_to) at its multiplier."""
    models = tiny_models(arch)
    for file, mult in files_and_multipliers:
        net, sd = create_network_from_weights(mult, file, None, models.text_encoder, models.unet)
        net.apply_to(models.text_encoder, models.unet)
        net.load_state_dict(sd)
    return outputs(models)


def load_checkpoint_models(path: str, arch: str):
    """Tiny models of `arch` with weights read from a single-file checkpoint written by a tool."""
    sd = load_state_dict(path)
    converted = lc.ldm_state_dict_to_diffusers(sd, source=path)
    models = tiny_models(arch)
    models.unet.load_state_dict(converted["unet"])
    for te, comp in zip(models.text_encoders, lc.TE_COMPONENTS):
        te.load_state_dict(converted[comp], strict=False)
    return models


def doc_commands(doc: str, script: str) -> list[list[str]]:
    """The argv (without `python networks/<script>`) of each `script` command in the doc's "Worked example"."""
    import re
    import shlex

    text = (Path(__file__).resolve().parent.parent / "docs" / doc).read_text(encoding="utf-8")
    section = text.split("## Worked example", 1)[1]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command)
            if words[:2] == ["python", f"networks/{script}"]:
                commands.append(words[2:])
    assert commands, f"no {script} command in the worked example of docs/{doc}"
    return commands
