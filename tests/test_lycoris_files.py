"""Files written by other tools, read the way ComfyUI applies them: LyCORIS LoCon (with conv_in, conv_out,
time_embedding and a CP `lora_mid`), LoHa (with a Tucker module) and LoKr (full, decomposed and Tucker factors)
in generation, merge_lora, svd_merge_lora, resize_lora, check_lora_weights; diffusers/PEFT and ComfyUI key
layouts converted on load and by networks/convert_lora.py; unreadable formats refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from library.file_io import CheckpointError
from library.unet_layout import diffusers_to_ldm_module
from networks import convert_lora, lora, merge_lora, resize_lora, svd_merge_lora
from networks.lora_names import lora_targets
from tests.conftest import tiny_models
from tests.consumer_formulas import consumer_weight, group
from tests.lora_helpers import outputs
from tests.lora_tool_fixtures import load_checkpoint_models
from tests.model_fixtures import tiny_model_path


def _pick(targets, arch):
    """Module names of the tiny model: the extra layers, a 3x3 ResNet conv, a 1x1 conv / linear, a TE layer."""
    names = list(targets)
    unet = [n for n in names if n.startswith("lora_unet_")]
    convs3 = [n for n in unet if targets[n].kind == "conv3x3" and "resnets_0_conv1" in targets[n].path.replace(".", "_")]
    extra = [n for n in unet if targets[n].path in ("conv_in", "conv_out", "time_embedding.linear_1",
                                                    "time_embedding.linear_2")]
    linear = [n for n in unet if n.endswith("attn1_to_q")][:1] + [n for n in unet if n.endswith("proj_in")][:1]
    te = [n for n in names if n.startswith("lora_te") and n.endswith("q_proj")][:1]
    return extra, convs3[:2], linear, te


def lycoris_file(path, arch: str, algo: str, seed: int = 0) -> str:
    """A file with the keys LyCORIS writes (built here, not by our networks), non-zero everywhere."""
    g = torch.Generator().manual_seed(seed)
    m = tiny_models(arch)
    targets = lora_targets(m.text_encoders, m.unet, include_conv3x3=True, include_extra=True)
    extra, convs3, linear, te = _pick(targets, arch)
    assert len(extra) == 4 and convs3 and linear and te
    r = 2

    def rnd(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    sd = {}
    for i, name in enumerate(extra + convs3 + linear + te):
        w = targets[name].module.weight
        out, inp, *k = w.shape
        flat = inp * (k[0] * k[1] if k else 1)
        tucker = bool(k) and k != [1, 1] and i == len(extra)  # the first ResNet conv: CP / Tucker variants
        if algo == "locon":
            if tucker:
                sd |= {f"{name}.lora_down.weight": rnd(r, inp, 1, 1), f"{name}.lora_mid.weight": rnd(r, r, *k),
                       f"{name}.lora_up.weight": rnd(out, r, 1, 1)}
            else:
                sd |= {f"{name}.lora_down.weight": rnd(r, inp, *k), f"{name}.lora_up.weight": rnd(out, r, *([1, 1] if k else []))}
        elif algo == "loha":
            if tucker:
                sd |= {f"{name}.hada_t1": rnd(r, r, *k), f"{name}.hada_w1_a": rnd(r, out), f"{name}.hada_w1_b": rnd(r, inp),
                       f"{name}.hada_t2": rnd(r, r, *k), f"{name}.hada_w2_a": rnd(r, out), f"{name}.hada_w2_b": rnd(r, inp)}
            else:
                sd |= {f"{name}.hada_w1_a": rnd(out, r), f"{name}.hada_w1_b": rnd(r, flat),
                       f"{name}.hada_w2_a": rnd(out, r), f"{name}.hada_w2_b": rnd(r, flat)}
        else:  # lokr, LyCORIS's split with factor 4
            from networks.adapter_math import factorization

            (a, b), (c, d) = factorization(out, 4), factorization(inp, 4)
            sd[f"{name}.lokr_w1"] = rnd(a, c)
            if tucker:
                sd |= {f"{name}.lokr_t2": rnd(r, r, *k), f"{name}.lokr_w2_a": rnd(r, b), f"{name}.lokr_w2_b": rnd(r, d)}
            elif k and i % 2:
                sd[f"{name}.lokr_w2"] = rnd(b, d, *k)
            else:
                sd |= {f"{name}.lokr_w2_a": rnd(b, r), f"{name}.lokr_w2_b": rnd(r, d * (k[0] * k[1] if k else 1))}
        sd[f"{name}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{algo}"}}'})
    return str(path)


def consumer_models(arch: str, files_and_strengths):
    """Tiny models with every file module applied to its layer's weight by ComfyUI's formula."""
    m = tiny_models(arch)
    targets = lora_targets(m.text_encoders, m.unet, include_conv3x3=True, include_extra=True)
    with torch.no_grad():
        for file, strength in files_and_strengths:
            for name, parts in group(load_file(file)).items():
                w = targets[name].module.weight
                w.copy_(consumer_weight(w, parts, strength).to(w.dtype))
    return m


def close(a, b, atol=3e-4):
    return all(torch.allclose(x, y, atol=atol, rtol=1e-4) for x, y in zip(a, b))


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_applied_and_merged_as_comfyui_does(arch, algo, tmp_path):
    path = lycoris_file(tmp_path / f"{algo}.safetensors", arch, algo)
    expected = outputs(consumer_models(arch, [(path, 0.8)]))
    assert not close(expected, outputs(tiny_models(arch)), atol=1e-3)
    m = tiny_models(arch)  # the default network module, as gen_img uses it
    net, sd = lora.create_network_from_weights(0.8, path, None, m.text_encoder, m.unet)
    assert len(net.unet_loras) == 4 + 2 + 2 and len(net.text_encoder_loras) == 1
    net.apply_to(m.text_encoder, m.unet)
    net.load_state_dict(sd, strict=False)
    assert close(outputs(m), expected)
    m2 = tiny_models(arch)
    net2, sd2 = lora.create_network_from_weights(0.8, path, None, m2.text_encoder, m2.unet)
    net2.merge_to(m2.text_encoder, m2.unet, sd2)
    assert close(outputs(m2), expected)


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_merge_lora_into_checkpoint_as_comfyui_does(algo, tmp_path):
    path = lycoris_file(tmp_path / f"{algo}.safetensors", "sd1", algo)
    out = tmp_path / "merged.safetensors"
    merge_lora.main(["--sd_model", str(tiny_model_path("sd1")), "--save_to", str(out), "--models", path,
                     "--ratios", "0.8"])
    assert close(outputs(load_checkpoint_models(str(out), "sd1")), outputs(consumer_models("sd1", [(path, 0.8)])))


def test_gen_img_applies_a_lycoris_loha_file(tmp_path, caplog):
    from tests.test_gen_img import _pixels, _run

    path = lycoris_file(tmp_path / "loha.safetensors", "sd1", "loha")
    prompt = ["--prompt", "a cat", "--seed", "3"]
    plain = _pixels(_run(tmp_path, prompt, outdir="plain")[0])
    with caplog.at_level("INFO"):
        applied = _pixels(_run(tmp_path, prompt + ["--network_weights", path], outdir="applied")[0])
    assert "1 text encoder modules, 8 U-Net modules" in caplog.text
    expected = _pixels(_run(tmp_path, prompt, comps=consumer_models("sd1", [(path, 1.0)]), outdir="expected")[0])
    merged = _pixels(_run(tmp_path, prompt + ["--network_weights", path, "--network_merge"], outdir="merged")[0])
    assert np.abs(applied - plain).max() > 5  # the LoHa changes the image
    assert np.abs(applied - expected).max() <= 1 and np.abs(merged - expected).max() <= 1


@pytest.mark.parametrize("algo", ["loha", "lokr", "locon"])
def test_svd_merge_and_resize_write_the_lora_of_the_delta(algo, tmp_path):
    path = lycoris_file(tmp_path / f"{algo}.safetensors", "sd1", algo)
    expected = outputs(consumer_models("sd1", [(path, 1.0)]))
    for tool, argv in ((svd_merge_lora, ["--models", path, "--new_rank", "64"]),
                       (resize_lora, ["--model", path, "--new_rank", "64"])):
        out = tmp_path / f"{tool.__name__.rsplit('.', 1)[1]}.safetensors"
        tool.main([*argv, "--save_to", str(out)])
        sd = load_file(str(out))
        assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in sd)  # a plain LoRA
        m = tiny_models("sd1")
        net, weights = lora.create_network_from_weights(1.0, str(out), None, m.text_encoder, m.unet)
        net.apply_to(m.text_encoder, m.unet)
        net.load_state_dict(weights, strict=False)
        assert close(outputs(m), expected), tool.__name__  # rank 64 >= the tiny layers' ranks: exact


def test_check_lora_weights_reports_lycoris_modules(tmp_path, capsys):
    from networks import check_lora_weights

    path = lycoris_file(tmp_path / "lokr.safetensors", "sd1", "lokr")
    check_lora_weights.main([path])
    table = capsys.readouterr().out
    assert "lokr:conv3x3" in table and "lokr:linear" in table and "9 modules" in table and "0 problem(s)" in table


def _layouts(sd: dict, arch: str) -> tuple[dict, dict]:
    """The same LoRA under diffusers/PEFT keys and under ComfyUI-saved keys."""
    m = tiny_models(arch)
    targets = lora_targets(m.text_encoders, m.unet, include_conv3x3=True, include_extra=True)
    peft, comfy = {}, {}
    for key, value in sd.items():
        name, _, part = key.partition(".")
        t = targets[name]
        if t.is_unet:
            p_path, c_path = f"unet.{t.path}", f"diffusion_model.{diffusers_to_ldm_module(t.path, m.unet.config)}"
        else:
            comp = {"te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}[t.component]
            clip = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g"}[t.component]
            p_path, c_path = f"{comp}.{t.path}", f"text_encoders.{clip}.transformer.{t.path}"
        peft_part = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}.get(part, part)
        peft[f"{p_path}.{peft_part}"] = value
        comfy[f"{c_path}.{part}"] = value
    return peft, comfy


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_and_comfyui_layouts_load_merge_and_convert(arch, tmp_path):
    path = lycoris_file(tmp_path / "locon.safetensors", arch, "locon")
    full = load_file(path)
    cp = {k.split(".")[0] for k in full if "lora_mid" in k}
    sd = {k: v for k, v in full.items() if k.split(".")[0] not in cp}  # the plain LoRA modules
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    expected = outputs(consumer_models(arch, [(str(tmp_path / "kohya.safetensors"), 1.0)]))
    for layout, foreign in zip(("peft", "comfy"), _layouts(sd, arch)):
        file = str(tmp_path / f"{layout}.safetensors")
        save_file(foreign, file)
        m = tiny_models(arch)
        net, weights = lora.create_network_from_weights(1.0, file, None, m.text_encoder, m.unet)
        net.apply_to(m.text_encoder, m.unet)
        net.load_state_dict(weights, strict=False)
        assert close(outputs(m), expected), layout
        converted = tmp_path / f"{layout}_kohya.safetensors"
        convert_lora.main(["--model", file, "--save_to", str(converted), *(["--sdxl"] if arch == "sdxl" else [])])
        back = load_file(str(converted))
        m2 = tiny_models(arch)
        net2, weights2 = lora.create_network_from_weights(1.0, None, None, m2.text_encoder, m2.unet, weights_sd=back)
        net2.merge_to(m2.text_encoder, m2.unet, weights2)
        assert close(outputs(m2), expected), layout
        if arch == "sd1":  # a tool reading the file lazily (merge into a checkpoint)
            out = tmp_path / f"{layout}_merged.safetensors"
            merge_lora.main(["--sd_model", str(tiny_model_path("sd1")), "--save_to", str(out), "--models", file])
            assert close(outputs(load_checkpoint_models(str(out), "sd1")), expected), layout


@pytest.mark.parametrize("key, message", [
    ("lora_unet_conv_in.oft_blocks", "LyCORIS OFT tensor, a format these tools do not read"),
    ("unet.conv_in.lora_magnitude_vector", "PEFT DoRA magnitude"),
    ("model.diffusion_model.conv_in.weight", "is not a key of a LoRA / LoHa / LoKr / DoRA file"),
])
def test_unreadable_formats_fail_in_one_line(key, message, tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({key: torch.zeros(2, 2), "unet.conv_in.lora_A.weight": torch.zeros(2, 4)}, str(path))
    m = tiny_models("sd1")
    with pytest.raises(CheckpointError, match=message):
        lora.create_network_from_weights(1.0, str(path), None, m.text_encoder, m.unet)
    with pytest.raises(SystemExit, match=message):
        resize_lora.main(["--model", str(path), "--save_to", str(tmp_path / "y.safetensors")])


def test_loha_through_diffusers_as_the_svd_merged_lora(tmp_path):
    """diffusers has no LoHa conversion for SD pipelines; the documented route: svd_merge_lora.py to a LoRA of the
    delta (exact at a rank as large as the layers'), which pipe.load_lora_weights reads."""
    import peft  # noqa: F401

    from tests.test_lora_diffusers_compat import make_pipeline

    full = load_file(lycoris_file(tmp_path / "loha_full.safetensors", "sd1", "loha"))
    path = str(tmp_path / "loha.safetensors")  # U-Net only: diffusers cannot infer a TE LoRA that is a lone q_proj
    save_file({k: v for k, v in full.items() if k.startswith("lora_unet_")}, path)
    out = tmp_path / "as_lora.safetensors"
    svd_merge_lora.main(["--models", path, "--new_rank", "64", "--save_to", str(out)])
    m = tiny_models("sd1")
    pipe = make_pipeline(m)
    pipe.load_lora_weights(load_file(str(out)))
    assert close(outputs(m), outputs(consumer_models("sd1", [(path, 1.0)])))
