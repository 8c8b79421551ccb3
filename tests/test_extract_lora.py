"""extract_lora_from_models.py: exact for low-rank differences, truncation-optimal for full-rank ones, UNet-only
when the text encoders are equal, errors."""
from __future__ import annotations

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from networks import extract_lora_from_models as extract
from networks import merge_lora, sdxl_merge_lora
from networks.lora_math import DOWN
from tests.conftest import tiny_models
from tests.lora_fixtures import deltas
from tests.lora_tool_fixtures import outputs_with_loras, random_network, write_checkpoint, write_network
from tests.model_fixtures import tiny_model_path

FLAGS = {"sd1": [], "sd2": ["--v2"], "sdxl": ["--sdxl"]}


def _assert_close(a, b, atol=2e-5):
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_low_rank_difference_is_reproduced_exactly(tmp_path, arch):
    net = random_network(tiny_models(arch), dim=2, alpha=2.0, conv_dim=2, seed=7)
    lora = write_network(net, tmp_path / "lora.safetensors")
    tuned = tmp_path / "tuned.safetensors"
    tool = sdxl_merge_lora if arch == "sdxl" else merge_lora
    tool.main(["--sd_model", str(tiny_model_path(arch)), "--save_to", str(tuned), "--models", lora])
    if arch == "sd1":  # the tuned model as an old-style .ckpt: text encoder keys without `text_model.`
        old_style = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                     for k, v in load_state_dict(tuned).items()}
        tuned = tmp_path / "tuned.ckpt"
        torch.save({"state_dict": old_style}, tuned)
    out = tmp_path / "extracted.safetensors"
    extract.main(["--model_org", str(tiny_model_path(arch)), "--model_tuned", str(tuned), "--save_to", str(out),
                  "--dim", "2", "--conv_dim", "2", "--clamp_quantile", "1"] + FLAGS[arch])
    _assert_close(outputs_with_loras(arch, [(str(out), 1.0)]), outputs_with_loras(arch, [(lora, 1.0)]))
    extracted = load_state_dict(out)
    assert set(extracted) == set(load_state_dict(lora))  # names exactly as lora_names gives them
    md = read_metadata(out)
    assert md["ss_network_dim"] == "2" and md["ss_network_module"] == "networks.lora"
    assert md["ss_base_model_version"] == ("sdxl_base_v1-0" if arch == "sdxl" else "sd_v1")


def _perturbed_unet_checkpoint(tmp_path, arch: str, te_noise: float = 0.0) -> str:
    models = tiny_models(arch)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in models.unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for te in models.text_encoders:
            for p in te.parameters():
                p.add_(torch.randn(p.shape, generator=g) * te_noise)
    return write_checkpoint(models, tmp_path / "tuned.safetensors")


@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_full_rank_difference_within_truncation_error(tmp_path, solver):
    tuned = _perturbed_unet_checkpoint(tmp_path, "sd1")
    out = tmp_path / "extracted.safetensors"
    extract.main(["--model_org", str(tiny_model_path("sd1")), "--model_tuned", tuned, "--save_to", str(out),
                  "--dim", "3", "--clamp_quantile", "1", "--svd_solver", solver])
    extracted = deltas(load_state_dict(out))
    org, new = tiny_models("sd1").unet, tiny_models("sd1").unet
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    weights_org = dict(org.named_parameters())
    checked = 0
    for name, p in new.named_parameters():
        lora_name = "lora_unet_" + name[: -len(".weight")].replace(".", "_")
        if lora_name not in extracted:
            continue
        diff = (p - weights_org[name]).double().reshape(p.shape[0], -1)
        optimal = torch.linalg.norm(torch.linalg.svdvals(diff)[3:])
        err = torch.linalg.norm(diff - extracted[lora_name].reshape(diff.shape))
        # exact SVD: the Eckart-Young optimum; randomized: within a few percent of it
        assert err <= optimal * (1.0001 if solver == "exact" else 1.05) + 1e-6, lora_name
        checked += 1
    assert checked > 100
    assert not any(k.startswith("lora_te") for k in load_state_dict(out))  # equal text encoders: UNet only


def test_changed_text_encoder_is_extracted_and_min_diff_decides(tmp_path):
    tuned = _perturbed_unet_checkpoint(tmp_path, "sd1", te_noise=0.05)
    out = tmp_path / "extracted.safetensors"
    base = ["--model_org", str(tiny_model_path("sd1")), "--model_tuned", tuned, "--dim", "2"]
    extract.main(base + ["--save_to", str(out)])
    assert any(k.startswith("lora_te_") for k in load_state_dict(out))
    out2 = tmp_path / "unet_only.safetensors"
    extract.main(base + ["--save_to", str(out2), "--min_diff", "10"])
    assert not any(k.startswith("lora_te") for k in load_state_dict(out2))


def test_default_clamp_clips_the_factors_at_the_quantile(tmp_path):
    tuned = _perturbed_unet_checkpoint(tmp_path, "sd1")
    base = ["--model_org", str(tiny_model_path("sd1")), "--model_tuned", tuned, "--dim", "2"]
    extract.main(base + ["--save_to", str(tmp_path / "raw.safetensors"), "--clamp_quantile", "1"])
    extract.main(base + ["--save_to", str(tmp_path / "clamped.safetensors")])  # default 0.99
    raw, clamped = load_state_dict(tmp_path / "raw.safetensors"), load_state_dict(tmp_path / "clamped.safetensors")
    clipped_any = False
    for key in raw:
        if not key.endswith(DOWN):
            continue
        name = key[: -len(DOWN)]
        up, down = raw[name + ".lora_up.weight"], raw[key]
        hi = torch.quantile(torch.cat([up.flatten(), down.flatten()]).abs(), 0.99)
        assert torch.allclose(clamped[key], down.clamp(-hi, hi), atol=1e-6)
        assert torch.allclose(clamped[name + ".lora_up.weight"], up.clamp(-hi, hi), atol=1e-6)
        clipped_any |= bool((up.abs() > hi).any() or (down.abs() > hi).any())
    assert clipped_any
    extract.main(base + ["--save_to", str(tmp_path / "half.safetensors"), "--save_precision", "fp16"])
    assert load_state_dict(tmp_path / "half.safetensors")[key].dtype == torch.float16


def test_errors(tmp_path):
    org = str(tiny_model_path("sd1"))
    out = str(tmp_path / "x.safetensors")
    with pytest.raises(SystemExit, match="SD 1.x model.*--v2 was given"):
        extract.main(["--model_org", org, "--model_tuned", org, "--save_to", out, "--v2"])
    with pytest.raises(SystemExit, match="needs an SDXL model"):
        extract.main(["--model_org", org, "--model_tuned", org, "--save_to", out, "--sdxl"])
    with pytest.raises(SystemExit, match="SD 2.x model"):
        extract.main(["--model_org", org, "--model_tuned", str(tiny_model_path("sd2")), "--save_to", out])
    with pytest.raises(SystemExit, match="--save_to .* is also an input"):
        extract.main(["--model_org", org, "--model_tuned", org, "--save_to", org])
    with pytest.raises(SystemExit, match="--clamp_quantile 1.5"):
        extract.main(["--model_org", org, "--model_tuned", org, "--save_to", out, "--clamp_quantile", "1.5"])
    with pytest.raises(SystemExit, match="--model_tuned is required"):
        extract.main(["--model_org", org, "--save_to", out])
    assert not (tmp_path / "x.safetensors").exists()


def test_docs_worked_example(tmp_path, monkeypatch):
    from tests.lora_tool_fixtures import doc_commands

    models = tiny_models("sd1")
    write_checkpoint(models, tmp_path / "base.safetensors")
    lora = write_network(random_network(models, dim=2, conv_dim=2, seed=8), tmp_path / "lora.safetensors")
    merge_lora.main(["--sd_model", str(tmp_path / "base.safetensors"), "--save_to", str(tmp_path / "tuned.safetensors"),
                     "--models", lora])
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands("extract_lora_from_models.md", "extract_lora_from_models.py"):
        extract.main(argv)
    _assert_close(outputs_with_loras("sd1", [(str(tmp_path / "extracted.safetensors"), 1.0)]),
                  outputs_with_loras("sd1", [(lora, 1.0)]))
