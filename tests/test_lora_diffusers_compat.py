"""Files saved by this project are what the ecosystem reads: diffusers' own `load_lora_weights` (kohya key
conversion + peft) gives the same UNet and text-encoder outputs as our `apply_to`; and the Diffusers-pipeline
example of the LoRA guide (docs/lora.md) runs as written on a tiny pipeline."""
from __future__ import annotations

import pytest
import torch

from networks import lora
from networks.lora import LoRAModule, create_network_from_weights  # noqa: F401  (the example's imports)
from tests.conftest import tiny_models
from tests.lora_helpers import outputs, randomize


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
    pytest.importorskip("peft")
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


def test_lora_guide_diffusers_pipeline_example(tmp_path):
    """The guide's example (three stacked networks at 0.5 / 0.7 / 0.5, then set_multiplier, or merge_to)."""
    from safetensors.torch import load_file

    files = []
    for i, dim in enumerate((4, 2, 8)):
        m = tiny_models("sd1")
        net = lora.create_network(1.0, dim, dim / 2, None, m.text_encoder, m.unet, conv_dim=2 if i == 2 else None)
        randomize(net, 0.05, seed=i)
        path = tmp_path / f"lora{i + 1}.safetensors"
        net.save_weights(str(path), torch.float16, {})
        files.append(path)

    device = "cpu"
    pipe = make_pipeline(tiny_models("sd1"))
    pipe = pipe.to(device)
    vae, text_encoder, unet = pipe.vae, pipe.text_encoder, pipe.unet
    base = outputs_of(pipe)

    networks = []
    for path, multiplier in zip(files, (0.5, 0.7, 0.5)):
        sd = load_file(str(path))
        network, sd = create_network_from_weights(multiplier, None, vae, text_encoder, unet, sd)
        network.apply_to(text_encoder, unet)
        network.load_state_dict(sd)
        network.to(device, dtype=torch.float16)
        networks.append(network)
    image = pipe("a cat", num_inference_steps=2, guidance_scale=7.5, negative_prompt="bad", height=64, width=64,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3) and float(abs(image).sum()) > 0
    stacked = outputs_of(pipe)
    assert not torch.allclose(stacked[0], base[0], atol=1e-3)

    networks[0].set_multiplier(0.0)
    networks[1].set_multiplier(0.0)
    networks[2].set_multiplier(0.0)
    torch.testing.assert_close(outputs_of(pipe)[0], base[0], atol=1e-6, rtol=0)

    # the merge variant: the same three networks folded into a fresh copy of the weights
    pipe2 = make_pipeline(tiny_models("sd1"))
    for path, multiplier in zip(files, (0.5, 0.7, 0.5)):
        sd = load_file(str(path))
        network, sd = create_network_from_weights(multiplier, None, pipe2.vae, pipe2.text_encoder, pipe2.unet, sd)
        network.merge_to(pipe2.text_encoder, pipe2.unet, sd)
    for a, b in zip(outputs_of(pipe2), stacked):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-2)  # fp16 LoRA at inference vs fp32 merge


def outputs_of(pipe):
    class M:
        unet = pipe.unet
        text_encoders = [pipe.text_encoder]
    return outputs(M)
