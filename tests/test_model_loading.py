"""load_models / save_models / load_vae / tokenizers: same outputs from every format, clear errors, safe saving."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library.file_io import CheckpointError
from library.model_loading import load_models, load_tokenizers, load_vae, save_models
from tests.model_fixtures import load_kwargs, load_tiny, tiny_model_path, tiny_tokenizer_cache

FAMILY_ARCHS = ["sd1", "sd2", "sdxl"]


def _unet_inputs(comps, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    cfg = comps.unet.config
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 5, cfg.cross_attention_dim, generator=gen)
    kwargs = {}
    if comps.is_sdxl:
        pooled = torch.randn(2, comps.text_encoders[1].config.projection_dim, generator=gen)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return latents, torch.tensor([10, 500]), context, kwargs


def _outputs(comps) -> list[torch.Tensor]:
    latents, t, context, kwargs = _unet_inputs(comps)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 3])
    with torch.no_grad():
        outs = [comps.unet(latents, t, context, **kwargs).sample,
                comps.vae.encode(image).latent_dist.mean, comps.vae.decode(latents).sample]
        for te in comps.text_encoders:
            out = te(ids, output_hidden_states=True)
            outs += [out.hidden_states[-2], out[0]]
    return outs


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_single_file_and_diffusers_folder_give_the_same_outputs(arch):
    single = load_tiny(arch)
    folder = load_tiny(arch, "diffusers")
    assert (single.arch, folder.arch) == (arch, arch)
    for x, y in zip([single.unet, single.vae, *single.text_encoders], [folder.unet, folder.vae, *folder.text_encoders]):
        sx, sy = x.state_dict(), y.state_dict()
        assert set(sx) == set(sy) and all(torch.equal(sx[k], sy[k]) for k in sx)
    # Equal weights; outputs agree to float32 rounding only, because diffusers leaves some tensors of a
    # memory-mapped file unaligned and CPU kernels then sum in another order.
    for a, b in zip(_outputs(single), _outputs(folder), strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert [t.pad_token for t in single.tokenizers] == [t.pad_token for t in folder.tokenizers]
    assert [t.pad_token for t in single.tokenizers] == {"sd1": ["<|endoftext|>"], "sd2": ["!"],
                                                         "sdxl": ["<|endoftext|>", "!"]}[arch]


def test_ckpt_and_safetensors_load_identically():
    a = load_models(tiny_model_path("sd2", ext=".ckpt"), **load_kwargs("sd2"))
    b = load_tiny("sd2")
    for m, n in [(a.unet, b.unet), (a.vae, b.vae), (a.text_encoder, b.text_encoder)]:
        sa, sb = m.state_dict(), n.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_v_parameterization_and_scheduler_config():
    comps = load_tiny("sd2-v")
    assert comps.v_parameterization and comps.scheduler_config["prediction_type"] == "v_prediction"
    assert comps.unet.config.sample_size == 8
    folder = load_models(tiny_model_path("sd2-v", "diffusers"), v2=True, v_parameterization=False)
    assert folder.v_parameterization  # the folder's scheduler says v_prediction


def test_dtype_and_device_are_applied():
    comps = load_tiny("sd1", dtype=torch.float16)
    assert {p.dtype for m in (comps.unet, comps.vae, comps.text_encoder) for p in m.parameters()} == {torch.float16}
    assert comps.text_encoder.embeddings.position_ids.device.type == "cpu"  # buffers are real, not meta


def _one_line(excinfo, *needles: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_models(tmp_path / "nothing.safetensors")
    _one_line(e, "nothing.safetensors", "no such file")


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.ckpt"])
def test_non_checkpoint_file_is_refused(tmp_path, name):
    path = tmp_path / name
    path.write_text("this is not a model\n" * 10)
    with pytest.raises(CheckpointError) as e:
        load_models(path)
    _one_line(e, str(path))


def test_truncated_safetensors_is_refused(tmp_path):
    data = tiny_model_path("sd1").read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_models(path, **load_kwargs("sd1"))
    _one_line(e, str(path), "truncated")


def test_unknown_architecture_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError) as e:
        load_models(path)
    _one_line(e, str(path), "not a Stable Diffusion checkpoint", "SD 1.x, SD 2.x or SDXL")
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 16)}, str(lora))
    with pytest.raises(CheckpointError) as e:
        load_models(lora)
    _one_line(e, str(lora), "LoRA file")
    no_te = tmp_path / "unet_only.safetensors"
    sd = load_file(str(tiny_model_path("sd1")))
    save_file({k: v for k, v in sd.items() if k.startswith("model.")}, str(no_te))
    with pytest.raises(CheckpointError) as e:
        load_models(no_te)
    _one_line(e, str(no_te), "unknown architecture", "cond_stage_model")


@pytest.mark.parametrize("arch,fmt,kwargs,needles", [
    ("sd1", "ldm", {"v2": True}, ["SD 1.x", "--v2 was given"]),
    ("sd2", "ldm", {"v2": False}, ["SD 2.x", "--v2 was not given"]),
    ("sd2", "diffusers", {"v2": False}, ["SD 2.x", "add --v2"]),
    ("sdxl", "ldm", {"sdxl": False}, ["SDXL", "sdxl_"]),
    ("sd1", "diffusers", {"sdxl": True}, ["SD 1.x", "needs an SDXL model"]),
    ("sdxl", "ldm", {"v2": True}, ["SDXL", "drop --v2"]),
])
def test_family_mismatch_is_one_clear_line(arch, fmt, kwargs, needles):
    path = tiny_model_path(arch, fmt)
    with pytest.raises(CheckpointError) as e:
        load_models(path, tokenizer_cache_dir=str(tiny_tokenizer_cache(arch)), **kwargs)
    _one_line(e, str(path), *needles)


def test_hub_id_offline_says_to_use_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_models("someone/some-model")
    _one_line(e, "someone/some-model", "local .safetensors/.ckpt file or Diffusers folder")


def test_missing_tokenizer_names_the_flag(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as e:
        load_models(tiny_model_path("sdxl"), tokenizer_cache_dir=str(tmp_path))
    _one_line(e, "--tokenizer_cache_dir", "openai_clip-vit-large-patch14", str(tmp_path))
    with pytest.raises(CheckpointError) as e:
        load_tokenizers("sd2")
    _one_line(e, "--tokenizer_cache_dir", "stabilityai_stable-diffusion-2")


def test_tokenizer_cache_layout():
    cache = tiny_tokenizer_cache("sdxl")
    assert sorted(p.name for p in cache.iterdir()) == ["laion_CLIP-ViT-bigG-14-laion2B-39B-b160k",
                                                         "openai_clip-vit-large-patch14"]
    tok1, tok2 = load_tokenizers("sdxl", tokenizer_cache_dir=cache)
    assert tok1("a", padding="max_length", max_length=6).input_ids == [49406, 320, 49407, 49407, 49407, 49407]
    assert tok2("a", padding="max_length", max_length=6).input_ids == [49406, 320, 49407, 0, 0, 0]
    assert tok2.pad_token_id == 0 and tok1.pad_token_id == 49407


def test_separate_vae_in_every_format(tmp_path):
    """--vae: a VAE-only original-layout file, a diffusers-layout file, a folder, or a whole checkpoint."""
    donor = load_models(tiny_model_path("sd1"), **load_kwargs("sd1"))
    with torch.no_grad():
        for p in donor.vae.parameters():
            p.add_(0.5)
    full_ckpt = tmp_path / "donor.safetensors"
    save_models(donor, full_ckpt)
    vae_only = tmp_path / "vae.safetensors"
    save_file({k[len("first_stage_model."):]: v for k, v in load_file(str(full_ckpt)).items()
               if k.startswith("first_stage_model.")}, str(vae_only))
    diffusers_file = tmp_path / "vae_diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in donor.vae.state_dict().items()}, str(diffusers_file))
    folder = tmp_path / "vae_folder"
    donor.vae.save_pretrained(str(folder))
    want = donor.vae.state_dict()
    for source in [vae_only, diffusers_file, folder, full_ckpt]:
        vae = load_vae(source)
        got = vae.state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), source
    with pytest.raises(FileNotFoundError) as e:
        load_models(tiny_model_path("sd1"), vae=tmp_path / "nope.safetensors", **load_kwargs("sd1"))
    _one_line(e, "nope.safetensors", "--vae")
    comps = load_models(tiny_model_path("sd1"), vae=vae_only, **load_kwargs("sd1"))
    assert torch.equal(comps.vae.decoder.conv_out.weight, donor.vae.decoder.conv_out.weight)
    assert load_vae(vae_only, family="sdxl").config.scaling_factor == 0.13025
    with pytest.raises(CheckpointError) as e:
        load_vae(tiny_model_path("sd1", "diffusers") / "unet")
    _one_line(e, "not a Diffusers VAE folder")
    with pytest.raises(CheckpointError) as e:
        load_vae("someone/some-vae")  # HF_HUB_OFFLINE is set by the test runner
    _one_line(e, "someone/some-vae", "--vae")
    with pytest.raises(FileNotFoundError) as e:
        load_vae(tmp_path / "none.safetensors")
    _one_line(e, "none.safetensors")


def test_checkpoint_without_vae_needs_vae_flag(tmp_path):
    sd = load_file(str(tiny_model_path("sd1")))
    path = tmp_path / "novae.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, str(path))
    with pytest.raises(CheckpointError) as e:
        load_models(path, **load_kwargs("sd1"))
    _one_line(e, str(path), "--vae")
    vae_file = tmp_path / "vae.safetensors"
    save_file({k: v for k, v in sd.items() if k.startswith("first_stage_model.")}, str(vae_file))
    assert load_models(path, vae=vae_file, **load_kwargs("sd1")).vae is not None


def test_save_refuses_to_overwrite_its_input_and_leaves_no_temp_files(tmp_path):
    src = tmp_path / "model.safetensors"
    src.write_bytes(tiny_model_path("sd1").read_bytes())
    comps = load_models(src, **load_kwargs("sd1"))
    with pytest.raises(ValueError) as e:
        save_models(comps, src)
    _one_line(e, str(src), "is also an input")
    save_models(comps, tmp_path / "out.ckpt", "fp16", epoch=3, global_step=120)
    obj = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert (obj["epoch"], obj["global_step"]) == (3, 120)
    assert obj["state_dict"]["model.diffusion_model.out.2.weight"].dtype == torch.float16
    save_models(comps, tmp_path / "out.safetensors", "bf16", metadata={"note": "x"}, global_step=7)
    from library.file_io import read_metadata

    assert read_metadata(tmp_path / "out.safetensors") == {"note": "x", "global_step": "7"}
    assert load_file(str(tmp_path / "out.safetensors"))["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16
    save_models(comps, tmp_path / "folder")
    save_models(comps, tmp_path / "folder", "fp16")  # replacing an existing output folder is atomic
    assert json.loads((tmp_path / "folder" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    assert load_file(str(tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors"))[
        "conv_in.weight"].dtype == torch.float16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "model.safetensors", "out.ckpt", "out.safetensors"]


def test_diffusers_folder_is_readable_by_diffusers_itself(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tiny_model_path("sdxl", "diffusers")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder))
    ours = load_tiny("sdxl")
    assert torch.equal(pipe.text_encoder_2.text_projection.weight, ours.text_encoders[1].text_projection.weight)
    assert torch.equal(pipe.unet.conv_in.weight, ours.unet.conv_in.weight)
    assert pipe.tokenizer_2.pad_token == "!"
    assert os.path.isfile(Path(folder) / "scheduler" / "scheduler_config.json")


_MEMORY_PROBE = r"""
import sys, torch
from library.model_loading import load_models, save_models

def hwm():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024, int(status.split("VmRSS:")[1].split()[0]) / 1024

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

path, tiny, cache, out = sys.argv[1:5]
load_models(tiny, tokenizer_cache_dir=cache)  # imports and lazily loaded modules are not the model's memory
reset_peak()
before = hwm()[1]
comps = load_models(path, tokenizer_cache_dir=cache)
load_peak = hwm()[0] - before
reset_peak()
before_save = hwm()[1]
save_models(comps, out, "fp16")
save_peak = hwm()[0] - before_save
print(f"RESULT {load_peak:.1f} {save_peak:.1f}")
"""


def test_loading_and_saving_hold_the_model_once(tmp_path):
    """Peak memory of load_models grows by one model, of save_models (fp16) by far less than a second copy."""
    import subprocess
    import sys

    from diffusers import AutoencoderKL

    comps = load_tiny("sd1")
    comps.vae = AutoencoderKL(**{**comps.vae.config, "block_out_channels": [64, 128, 256, 256], "norm_num_groups": 32})
    path = tmp_path / "medium.safetensors"
    save_models(comps, path)
    model_mib = sum(p.numel() * 4 for m in (comps.unet, comps.vae, comps.text_encoder) for p in m.parameters()) / 2**20
    assert model_mib > 60
    del comps
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(path), str(tiny_model_path("sd1")),
                          str(tiny_tokenizer_cache("sd1")), str(tmp_path / "out.safetensors")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    load_peak, save_peak = map(float, run.stdout.split("RESULT")[1].split())
    print(f"model {model_mib:.0f} MiB, load peak +{load_peak:.0f} MiB, fp16 save peak +{save_peak:.0f} MiB")
    assert load_peak < 1.15 * model_mib + 10, (load_peak, model_mib)
    assert save_peak < 0.25 * model_mib + 10, (save_peak, model_mib)
