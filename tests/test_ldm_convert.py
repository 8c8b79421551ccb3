"""Single-file <-> Diffusers conversion: exact round trips, real key layouts, size inference, key mapping."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from library import ldm_convert as lc
from library.model_loading import load_models, save_models
from library.sd_configs import arch_config, build_models
from tests.model_fixtures import load_kwargs, tiny_model_path

FAMILY_ARCHS = ["sd1", "sd2", "sdxl"]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different[:10]


def _diffusers_files(folder: Path) -> dict[str, dict]:
    return {str(f.relative_to(folder)): load_file(str(f)) for f in sorted(folder.rglob("*.safetensors"))}


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_single_file_to_diffusers_to_single_file_is_exact(arch, tmp_path):
    src = tiny_model_path(arch)
    comps = load_models(src, **load_kwargs(arch))
    save_models(comps, tmp_path / "direct.safetensors")
    save_models(comps, tmp_path / "diffusers")
    again = load_models(tmp_path / "diffusers", v2=arch == "sd2")
    save_models(again, tmp_path / "back.safetensors")
    original = load_file(str(src))
    _assert_same_tensors(original, load_file(str(tmp_path / "direct.safetensors")))
    _assert_same_tensors(original, load_file(str(tmp_path / "back.safetensors")))


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_diffusers_to_single_file_to_diffusers_is_exact(arch, tmp_path):
    src = tiny_model_path(arch, "diffusers")
    comps = load_models(src, **load_kwargs(arch))
    save_models(comps, tmp_path / "single.safetensors")
    again = load_models(tmp_path / "single.safetensors", **load_kwargs(arch))
    save_models(again, tmp_path / "diffusers")
    a, b = _diffusers_files(src), _diffusers_files(tmp_path / "diffusers")
    assert set(a) == set(b) and len(a) == (4 if arch == "sdxl" else 3)
    for name in a:
        _assert_same_tensors(a[name], b[name])


# Tensor counts of the real checkpoints (model weights; SD1.5's original .ckpt also holds 12 noise-schedule
# buffers such as alphas_cumprod, which are not model weights and are not written):
# SD1.5: UNet 686 + VAE 248 + CLIP ViT-L 197 (with position_ids) = 1131
# SD2.1: UNet 686 + VAE 248 + OpenCLIP ViT-H 294 (24 layers, text_projection, logit_scale) = 1228
# SDXL base 1.0: UNet 1680 + VAE 248 + CLIP ViT-L 197 + OpenCLIP bigG 390 = 2515
REAL_COUNTS = {"sd1": (1131, 686, 248), "sd2": (1228, 686, 248), "sdxl": (2515, 1680, 248)}
REAL_SHAPES = {
    "sd1": {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.3.0.skip_connection.weight": (1280, 2560, 1, 1),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    },
    "sd2": {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
        "cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight": (4096, 1024),
        "cond_stage_model.model.positional_embedding": (77, 1024),
        "cond_stage_model.model.token_embedding.weight": (49408, 1024),
        "cond_stage_model.model.text_projection": (1024, 1024),
        "cond_stage_model.model.logit_scale": (),
        "cond_stage_model.model.ln_final.weight": (1024,),
    },
    "sdxl": {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.weight": (1280,),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.logit_scale": (),
    },
}


@pytest.mark.parametrize("arch", FAMILY_ARCHS)
def test_full_configs_have_the_real_checkpoint_layout(arch):
    comps = build_models(arch, "full", meta=True, tokenizers=False)
    sd = lc.models_to_ldm(comps.arch, comps.unet, comps.vae, comps.text_encoders)
    total, n_unet, n_vae = REAL_COUNTS[arch]
    assert len(sd) == total
    assert sum(k.startswith(lc.UNET_PREFIX) for k in sd) == n_unet
    assert sum(k.startswith(lc.VAE_PREFIX) for k in sd) == n_vae
    for key, shape in REAL_SHAPES[arch].items():
        assert tuple(sd[key].shape) == shape, key
    # every key is one of the original names: no diffusers-style names leak into the file
    assert not [k for k in sd if any(s in k for s in ("down_blocks", "up_blocks", "mid_block", "resnets", "to_out.0.w"))
                and not k.startswith(("conditioner.embedders.0", "cond_stage_model.transformer"))
                and ".transformer_blocks." not in k]
    # the layout inferred from those shapes alone rebuilds the same configs (the real sizes are recovered)
    layout = lc.infer_layout({k: tuple(v.shape) for k, v in sd.items()}, "full")
    _assert_config_matches(layout, arch_config(arch, "full"))


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_tiny_sizes_are_inferred_from_shapes(arch):
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tiny_model_path(arch))).items()}
    layout = lc.infer_layout(shapes, "tiny", v_parameterization=arch == "sd2-v")
    _assert_config_matches(layout, arch_config(arch, "tiny"))


def _assert_config_matches(layout: lc.LdmLayout, cfg) -> None:
    assert layout.family == cfg.arch
    for key, value in cfg.unet.items():
        if key == "upcast_attention":  # only numerics in half precision; SD2's real configs set it
            continue
        if key == "sample_size" and cfg.arch == "sd2" and cfg.size == "full":  # 64 for 512-base, 96 for 768-v
            assert layout.unet_config[key] == (96 if cfg.v_parameterization else 64)
            continue
        got = layout.unet_config.get(key, 1 if key == "transformer_layers_per_block" else None)
        assert (list(got) if isinstance(got, (list, tuple)) else got) == value, key
    assert layout.vae_config == cfg.vae
    for got, want in zip(layout.text_encoder_configs, cfg.text_encoders, strict=True):
        for key, value in want.items():
            if key != "projection_dim" or want["class"] == "CLIPTextModelWithProjection":
                assert got[key] == value, key


def test_ldm_param_for_maps_every_kind_of_parameter():
    sd = load_file(str(tiny_model_path("sdxl")))
    layout = lc.infer_layout({k: v.shape for k, v in sd.items()})
    p = lc.ldm_param_for("text_encoder_2", "text_model.encoder.layers.1.self_attn.k_proj.weight", layout)
    assert p.key == "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    assert p.rows == slice(40, 80)
    p = lc.ldm_param_for("text_encoder_2", "text_projection.weight", layout)
    assert (p.key, p.kind) == ("conditioner.embedders.1.model.text_projection", "transpose")
    p = lc.ldm_param_for("text_encoder", "encoder.layers.0.mlp.fc2.weight", layout)
    assert p.key == "conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc2.weight"
    p = lc.ldm_param_for("vae", "decoder.mid_block.attentions.0.to_out.0.weight", layout)
    assert (p.key, p.kind) == ("first_stage_model.decoder.mid.attn_1.proj_out.weight", "conv1x1")
    assert lc.ldm_param_for("vae", "decoder.up_blocks.0.upsamplers.0.conv.bias", layout).key == \
        "first_stage_model.decoder.up.3.upsample.conv.bias"
    p = lc.ldm_param_for("unet", "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_v.weight", layout)
    assert p.key == "model.diffusion_model.input_blocks.8.1.transformer_blocks.1.attn2.to_v.weight"
    with pytest.raises(KeyError):
        lc.ldm_param_for("text_encoder_3", "x", layout)


@pytest.mark.parametrize("component,name", [
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
    ("vae", "encoder.mid_block.attentions.0.to_k.weight"),
    ("text_encoder", "encoder.layers.1.self_attn.v_proj.weight"),
    ("text_encoder_2", "text_model.encoder.layers.2.self_attn.q_proj.weight"),
    ("text_encoder_2", "text_projection.weight"),
])
def test_add_delta_into_single_file_equals_delta_on_the_model(component, name, tmp_path):
    path = tiny_model_path("sdxl")
    sd = load_file(str(path))
    layout = lc.infer_layout({k: v.shape for k, v in sd.items()})
    comps = load_models(path, **load_kwargs("sdxl"))
    model = {"unet": comps.unet, "vae": comps.vae, "text_encoder": comps.text_encoders[0],
             "text_encoder_2": comps.text_encoders[1]}[component]
    before = model.state_dict()[name].clone()
    delta = torch.randn_like(before)
    lc.ldm_param_for(component, name, layout).add_delta(sd, delta)
    save_file(sd, str(tmp_path / "merged.safetensors"))
    merged = load_models(tmp_path / "merged.safetensors", **load_kwargs("sdxl"))
    after = {"unet": merged.unet, "vae": merged.vae, "text_encoder": merged.text_encoders[0],
             "text_encoder_2": merged.text_encoders[1]}[component].state_dict()[name]
    torch.testing.assert_close(after, before + delta)


def test_sd2_file_only_tensors_are_kept_or_made_by_convention(tmp_path):
    sd = load_file(str(tiny_model_path("sd2")))
    prefix = "cond_stage_model.model."
    n = arch_config("sd2").text_encoders[0]["num_hidden_layers"]  # diffusers layers; the file has one more
    # a file made from Diffusers weights follows the convention: last layer = the one before, identity projection
    last, before = f"{prefix}transformer.resblocks.{n}.", f"{prefix}transformer.resblocks.{n - 1}."
    for key in [k for k in sd if k.startswith(last)]:
        assert torch.equal(sd[key], sd[before + key[len(last):]])
    assert torch.equal(sd[prefix + "text_projection"], torch.eye(40))
    assert sd[prefix + "logit_scale"].item() == pytest.approx(math.log(100))
    # tensors of a real file that diffusers has no place for survive load -> save unchanged
    gen = torch.Generator().manual_seed(1)
    for key in [k for k in sd if k.startswith(last)] + [prefix + "text_projection", prefix + "logit_scale"]:
        sd[key] = torch.randn(sd[key].shape, generator=gen)
    save_file(sd, str(tmp_path / "real_like.safetensors"))
    comps = load_models(tmp_path / "real_like.safetensors", **load_kwargs("sd2"))
    assert comps.text_encoder.config.num_hidden_layers == n
    save_models(comps, tmp_path / "again.safetensors")
    _assert_same_tensors(sd, load_file(str(tmp_path / "again.safetensors")))


def test_file_variants_found_in_the_wild_load_the_same_weights(tmp_path, caplog):
    """Old `cond_stage_model.transformer.*` names, no position_ids, fp16, `state_dict` wrapper, EMA copy."""
    sd = load_file(str(tiny_model_path("sd1")))
    reference = load_models(tiny_model_path("sd1"), **load_kwargs("sd1"))
    old = {}
    for k, v in sd.items():
        if k.endswith("position_ids"):
            continue
        old[k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = v.half()
    old["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(16, 4, 3, 3)
    old["model_ema.num_updates"] = torch.tensor(5)
    old["alphas_cumprod"] = torch.linspace(1, 0, 1000)
    old["model.diffusion_model.stray.weight"] = torch.zeros(1)
    torch.save({"state_dict": old, "global_step": 10}, tmp_path / "old.ckpt")
    with caplog.at_level("WARNING"):
        comps = load_models(tmp_path / "old.ckpt", **load_kwargs("sd1"))
    assert "1 tensors are not part of the model and were ignored (e.g. model.diffusion_model.stray.weight)" in caplog.text
    for got, want in [(comps.unet, reference.unet), (comps.text_encoder, reference.text_encoder),
                      (comps.vae, reference.vae)]:
        g, w = got.state_dict(), want.state_dict()
        assert all(g[k].dtype == torch.float32 for k in g)
        for k in g:
            torch.testing.assert_close(g[k], w[k].half().float(), rtol=0, atol=0)


def test_bf16_file_loads_in_the_requested_dtype(tmp_path):
    sd = {k: v.bfloat16() if v.is_floating_point() else v for k, v in load_file(str(tiny_model_path("sdxl"))).items()}
    save_file(sd, str(tmp_path / "bf16.safetensors"))
    comps = load_models(tmp_path / "bf16.safetensors", **load_kwargs("sdxl"), dtype=torch.bfloat16)
    assert {p.dtype for m in [comps.unet, comps.vae, *comps.text_encoders] for p in m.parameters()} == {torch.bfloat16}
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(comps.unet.conv_in.weight, sd[key])


def test_in_memory_state_dict_conversion_matches_the_loader():
    sd = load_file(str(tiny_model_path("sd2")))
    converted = lc.ldm_state_dict_to_diffusers(sd)
    comps = load_models(tiny_model_path("sd2"), **load_kwargs("sd2"))
    for component, model in [("unet", comps.unet), ("vae", comps.vae), ("text_encoder", comps.text_encoder)]:
        _assert_same_tensors(converted[component], dict(model.state_dict()))
