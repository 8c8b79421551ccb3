"""Files saved by this project are what the ecosystem reads: diffusers' own `load_lora_weights` (kohya key
conversion + peft) gives the same UNet and text-encoder outputs as our `apply_to`; and the Diffusers-pipeline
example of the LoRA guide (docs/lora.md) runs as written on a tiny pipeline."""
from __future__ import annotations

import os

import pytest
import torch

from networks import lora
from networks.lora import create_network_from_weights
from tests.conftest import tiny_models
from tests.lora_helpers import outputs, randomize
from tests.train_helpers import tiny_model_dir


def make_pipeline(m):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DDIMScheduler(**m.scheduler_config)
    if m.is_sdxl:
        return StableDiffusionXLPipeline(vae=m.vae, text_encoder=m.text_encoders[0], text_encoder_2=m.text_encoders[1],
                                         tokenizer=m.tokenizers[0], tokenizer_2=m.tokenizers[1], unet=m.unet,
                                         scheduler=scheduler)
    return StableDiffusionPipeline(vae=m.vae, text_encoder=m.text_encoders[0], tokenizer=m.tokenizers[0], unet=m.unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


@pytest.mark.parametrize("conv_dim", [None, 3], ids=["lierla", "c3lier"])
@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_saved_file_loads_in_diffusers_with_same_outputs(arch, conv_dim, tmp_path):
    import peft  # noqa: F401  (diffusers needs it for load_lora_weights; a test dependency, never skipped)
    from safetensors.torch import load_file

    m = tiny_models(arch)
    base = outputs(m)
    extra = {"conv_dim": conv_dim, "conv_alpha": 2} if conv_dim else {}
    net = lora.create_network(1.0, 4, 2, None, m.text_encoder, m.unet, **extra)  # alpha 2 / dim 4: scale 0.5
    net.apply_to(m.text_encoder, m.unet)
    randomize(net, 0.1)
    ours = outputs(m)
    path = tmp_path / "lora.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "networks.lora"})

    m2 = tiny_models(arch)
    pipe = make_pipeline(m2)
    pipe.load_lora_weights(load_file(str(path)))
    theirs = outputs(m2)
    for o, t, b in zip(ours, theirs, base):
        assert (o - b).abs().max() > 1e-2  # the LoRA matters for every component
        torch.testing.assert_close(t, o, atol=2e-5, rtol=1e-4)


def guide_example() -> str:
    """The Python block of docs/lora.md's "Generating with a Diffusers pipeline" section."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "lora.md"), encoding="utf-8") as f:
        text = f.read()
    section = text[text.index("## Generating with a Diffusers pipeline"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_lora_guide_diffusers_pipeline_example(tmp_path, monkeypatch):
    """docs/lora.md's example, run as printed on the CPU (a tiny SD1 model folder, 64 px, 2 steps): three stacked
    networks (0.5 / 0.7 / 0.5), generation, set_multiplier, no deprecation warning; and the merge_to variant gives
    the same model."""
    import warnings

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    model_dir = tiny_model_dir()
    monkeypatch.chdir(tmp_path)
    for i, dim in enumerate((4, 2, 8)):
        m = tiny_models("sd1")
        net = lora.create_network(1.0, dim, dim / 2, None, m.text_encoder, m.unet, conv_dim=2 if i == 2 else None)
        randomize(net, 0.05, seed=i)
        net.save_weights(f"lora{i + 1}.safetensors", torch.float16, {})

    code = guide_example()
    replacements = {
        'r"model_id_on_hugging_face_or_dir"': repr(model_dir),
        "pipe(prompt, ": "pipe(prompt, num_inference_steps=2, height=64, width=64, ",
    }
    for old, new in replacements.items():
        assert old in code, old
        code = code.replace(old, new)
    base = outputs_of(StableDiffusionPipeline.from_pretrained(model_dir))
    namespace: dict = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, "docs/lora.md", "exec"), namespace)  # noqa: S102 - our own documentation
    deprecations = [str(w.message) for w in caught if "deprecat" in str(w.message).lower()
                    or issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations

    networks, pipe = namespace["networks"], namespace["pipe"]
    assert namespace["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [n.multiplier for n in networks] == [0.8, 0.7, 0.5]
    assert (tmp_path / "by_diffusers.png").exists() and (tmp_path / "by_diffusers_2.png").exists()
    assert all(p.dtype == namespace["dtype"] for n in networks for p in n.parameters())
    networks[0].set_multiplier(0.5)
    stacked = outputs_of(pipe)
    assert not torch.allclose(stacked[0], base[0], atol=1e-3)
    for n in networks:
        n.set_multiplier(0.0)
    torch.testing.assert_close(outputs_of(pipe)[0], base[0], atol=1e-6, rtol=0)

    # the merge variant: the same three networks folded into a fresh copy of the weights
    pipe2 = StableDiffusionPipeline.from_pretrained(model_dir)
    for i, multiplier in enumerate((0.5, 0.7, 0.5)):
        sd = load_file(f"lora{i + 1}.safetensors")
        network, sd = create_network_from_weights(multiplier, None, pipe2.vae, pipe2.text_encoder, pipe2.unet, sd)
        network.merge_to(pipe2.text_encoder, pipe2.unet, sd)
    for a, b in zip(outputs_of(pipe2), stacked):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)  # LoRA at inference vs merged weights


def outputs_of(pipe):
    class M:
        unet = pipe.unet
        text_encoders = [pipe.text_encoder]
    return outputs(M)
