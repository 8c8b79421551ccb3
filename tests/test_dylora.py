"""DyLoRA: random rank prefix per step, only the newest chunk trained, files that load as plain LoRA, and
extract_lora_from_dylora cutting one LoRA per rank."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from networks import dylora, lora
from networks.extract_lora_from_dylora import extract
from tests.conftest import tiny_models
from tests.lora_helpers import outputs, randomize, unet_inputs


def make(arch="sd1", dim=16, alpha=8, **kwargs):
    m = tiny_models(arch)
    net = dylora.create_network(1.0, dim, alpha, None, m.text_encoder, m.unet, **kwargs)
    return m, net


def test_each_step_trains_only_the_newest_chunk_of_a_random_prefix():
    m, net = make(unit="4", conv_dim="16", conv_alpha="4")
    net.apply_to(m.text_encoder, m.unet)
    randomize(net, 0.05)
    net.prepare_optimizer_params(None, 1e-3, 1e-3)
    net.train()
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        net.on_step_start()
        k = net.rank_state.chunks
        seen.add(k)
        net.zero_grad(set_to_none=True)
        m.unet(**unet_inputs(m.unet)).sample.square().mean().backward()
        for module in net.unet_loras:
            for i in range(module.n_chunks):
                a, b = getattr(module, f"lora_A_{i}"), getattr(module, f"lora_B_{i}")
                if i == k - 1:
                    assert a.grad is not None and b.grad is not None
                else:
                    assert a.grad is None and b.grad is None, (module.lora_name, i, k)
    assert seen == {1, 2, 3, 4}  # ranks 4, 8, 12, 16 all drawn


@pytest.mark.parametrize("conv", [False, True], ids=["lierla", "c3lier"])
def test_training_at_rank_b_computes_the_extracted_rank_b_lora(tmp_path, conv):
    extra = {"conv_dim": 8, "conv_alpha": 2} if conv else {}
    m, net = make(dim=8, alpha=4, unit=2, **extra)
    net.apply_to(m.text_encoder, m.unet)
    randomize(net, 0.05)
    path = tmp_path / "dy.safetensors"
    net.save_weights(str(path), None, {"ss_network_module": "networks.dylora", "ss_network_dim": "8"})
    written = extract(str(path), str(tmp_path / "split.safetensors"), 2)
    assert [p.rsplit("-", 1)[1] for p in written] == ["0002.safetensors", "0004.safetensors", "0006.safetensors",
                                                     "0008.safetensors"]
    full = load_state_dict(path)
    for rank, file in zip((2, 4, 6, 8), written):
        part = load_state_dict(file)
        assert part.keys() == full.keys()
        for key, value in part.items():
            if key.endswith("lora_down.weight"):
                assert torch.equal(value, full[key][:rank])
            elif key.endswith("lora_up.weight"):
                assert torch.equal(value, full[key][:, :rank])
            else:
                assert torch.equal(value, full[key])
        assert read_metadata(file)["ss_network_dim"] == str(rank)

        # the extracted file is a plain LoRA; its outputs equal DyLoRA's training forward at that rank
        plain = tiny_models("sd1")
        pnet, sd = lora.create_network_from_weights(1.0, file, None, plain.text_encoder, plain.unet)
        pnet.apply_to(plain.text_encoder, plain.unet)
        pnet.load_state_dict(sd)
        net.train()
        net.set_rank(rank)
        with torch.no_grad():
            dy = outputs(m)
        net.eval()
        for a, b in zip(outputs(plain), dy):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # the full-rank file is the DyLoRA file itself, and eval mode uses the full rank
    with torch.no_grad():
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outputs(m), dy))


def test_dylora_file_roundtrip_and_continue_training():
    m, net = make(dim=8, unit=4)
    randomize(net)
    sd = net.state_dict()
    assert all(k.rsplit(".", 2)[-2:] in (["lora_down", "weight"], ["lora_up", "weight"]) or k.endswith(".alpha")
               for k in sd)
    m2 = tiny_models("sd1")
    net2, weights = dylora.create_network_from_weights(1.0, None, None, m2.text_encoder, m2.unet, weights_sd=sd, unit=4)
    assert isinstance(net2, dylora.DyLoRANetwork)
    net2.load_state_dict(weights)
    for key, value in net2.state_dict().items():
        assert torch.equal(value, sd[key])


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="conv_dim=4: DyLoRA-C3Lier needs conv_dim equal to network_dim"):
        make(dim=16, unit=4, conv_dim=4)
    with pytest.raises(ValueError, match="unit=3: network_dim 16 must be a multiple"):
        make(dim=16, unit=3)
    with pytest.raises(ValueError, match="block_dims"):
        make(dim=16, block_dims=",".join(["1"] * 25))
    m, net = make(dim=6, unit=2)
    path = tmp_path / "d.safetensors"
    net.save_weights(str(path), None, {})
    with pytest.raises(ValueError, match="--unit 4: rank 6"):
        extract(str(path), str(tmp_path / "o.safetensors"), 4)
    extract(str(path), str(tmp_path / "x.safetensors"), 6)
    assert (tmp_path / "x-0006.safetensors").exists()
    with pytest.raises(ValueError, match="is also an input"):
        extract(str(tmp_path / "x-0006.safetensors"), str(tmp_path / "x.safetensors"), 6)


def test_script_as_documented(tmp_path):
    """The worked example of docs/extract_lora_from_dylora.md, on a tiny dim-16 unit-4 DyLoRA."""
    m, net = make(dim=16, unit=4)
    randomize(net)
    model = tmp_path / "dylora-model.safetensors"
    net.save_weights(str(model), torch.float16, {"ss_network_dim": "16"})
    result = subprocess.run([sys.executable, "networks/extract_lora_from_dylora.py", "--model", str(model),
                             "--save_to", str(tmp_path / "dylora-model-split.safetensors"), "--unit", "4"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in tmp_path.glob("dylora-model-split-*.safetensors"))
    assert names == [f"dylora-model-split-{r:04d}.safetensors" for r in (4, 8, 12, 16)]
    bad = subprocess.run([sys.executable, "networks/extract_lora_from_dylora.py", "--model", str(tmp_path / "none"),
                          "--save_to", str(tmp_path / "y.safetensors"), "--unit", "4"], capture_output=True, text=True)
    assert bad.returncode != 0 and "none: no such file" in bad.stderr and "Traceback" not in bad.stderr
