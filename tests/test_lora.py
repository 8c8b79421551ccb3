"""LoRA networks on tiny SD1 / SD2 / SDXL models: forward hooks, merge, multiplier, stacking, files, errors."""
from __future__ import annotations

import hashlib
import logging
import struct

import pytest
import torch

from library.file_io import CheckpointError, load_state_dict, read_metadata
from networks import lora
from tests.conftest import tiny_models
from tests.lora_helpers import outputs, randomize, te_outs, unet_out

ARCHS = ["sd1", "sd2", "sdxl"]
KINDS = {"lierla": {}, "c3lier": {"conv_dim": "4", "conv_alpha": "2"}}


def make(arch: str, kind: str = "lierla", dim=4, alpha=1, **kwargs):
    m = tiny_models(arch)
    net = lora.create_network(1.0, dim, alpha, m.vae, m.text_encoder, m.unet, **KINDS[kind], **kwargs)
    return m, net


def close(a: list[torch.Tensor], b: list[torch.Tensor], atol=1e-5) -> bool:
    return all(torch.allclose(x, y, atol=atol, rtol=1e-4) for x, y in zip(a, b))


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", ARCHS)
def test_fresh_network_is_identity_then_merge_equals_apply(arch, kind):
    m, net = make(arch, kind)
    base = outputs(m)
    net.apply_to(m.text_encoder, m.unet)
    assert close(outputs(m), base, atol=0)  # up weights start at zero
    randomize(net)
    applied = outputs(m)
    assert not close(applied, base, atol=1e-3)  # the LoRA really changes every component
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(applied, base))

    m2 = tiny_models(arch)
    net2, sd = lora.create_network_from_weights(1.0, None, None, m2.text_encoder, m2.unet, weights_sd=net.state_dict())
    net2.merge_to(m2.text_encoder, m2.unet, sd)
    assert close(outputs(m2), applied, atol=2e-4)


def _layer_input(layer: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=g)
    return torch.randn(2, 3, layer.in_features, generator=g)


@pytest.mark.parametrize("arch", ARCHS)
def test_multiplier_scales_delta_linearly_and_networks_stack(arch):
    m, net = make(arch, "c3lier")
    net.apply_to(m.text_encoder, m.unet)
    randomize(net, 0.1)
    net2 = lora.create_network(1.0, 2, 2, None, m.text_encoder, m.unet, conv_dim=3)
    net2.apply_to(m.text_encoder, m.unet)
    randomize(net2, 0.1, seed=7)
    first = {}
    for module in net.text_encoder_loras + net.unet_loras:  # one layer of each kind
        first.setdefault(("te" if module.lora_name.startswith("lora_te") else "unet", module.is_conv, module.is_conv3x3), module)
    assert len(first) == 4  # te linear, unet linear, unet conv 1x1 (SD1 proj_in / conv_shortcut), unet conv 3x3
    with torch.no_grad():
        for module in first.values():
            layer = module.org_module
            x = _layer_input(layer)
            original = module.org_forward(x)
            results = {}
            for multiplier in (1.0, 0.5, 0.0, -2.0):
                net.set_multiplier(multiplier)
                results[multiplier] = layer(x) - original
            net.set_multiplier(1.0)
            delta1 = results[1.0] - results[0.0]  # net1's own delta (net2 active in both)
            for multiplier, delta in results.items():
                torch.testing.assert_close(delta, results[0.0] + multiplier * delta1, atol=1e-5, rtol=1e-4)
            assert results[0.0].abs().max() > 1e-4  # net2 alone changes the layer: the two deltas add
    # restoring the top network leaves the first one in place
    full = outputs(m)
    net2.set_multiplier(0.0)
    without2 = outputs(m)
    net2.restore()
    assert close(outputs(m), without2, atol=1e-6) and not close(full, without2, atol=1e-4)


def test_linear_layer_delta_is_exactly_scale_up_down():
    m, net = make("sd1", dim=3, alpha=6)
    net.apply_to(m.text_encoder, m.unet)
    randomize(net)
    module = net.unet_loras[0]
    layer = module.org_module
    x = torch.randn(2, 4, layer.in_features if hasattr(layer, "in_features") else layer.in_channels, 1, 1)
    if isinstance(layer, torch.nn.Conv2d):
        x = torch.randn(2, layer.in_channels, 3, 3)
        expected = torch.nn.functional.conv2d(x, layer.weight, layer.bias) + 2.0 * torch.nn.functional.conv2d(
            torch.nn.functional.conv2d(x, module.lora_down.weight), module.lora_up.weight)
    else:
        x = torch.randn(2, 4, layer.in_features)
        expected = x @ layer.weight.T + layer.bias + 2.0 * (x @ module.lora_down.weight.T @ module.lora_up.weight.T)
    assert module.scale == 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision,dtype", [("float", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_save_load_roundtrip_with_metadata_and_hashes(tmp_path, precision, dtype):
    m, net = make("sd1", "c3lier", dim=4, alpha=2)
    net.apply_to(m.text_encoder, m.unet)
    randomize(net)
    path = tmp_path / "x.safetensors"
    net.save_weights(str(path), dtype, {"ss_network_dim": "4", "ss_network_alpha": "2.0", "other": "kept"})
    sd = load_state_dict(path)
    assert all(v.dtype == dtype for v in sd.values())
    meta = read_metadata(path)
    assert meta["ss_network_dim"] == "4" and meta["other"] == "kept"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest()
    assert len(meta["sshs_legacy_hash"]) == 8

    m2 = tiny_models("sd1")
    net2, weights = lora.create_network_from_weights(1.0, str(path), None, m2.text_encoder, m2.unet)
    net2.apply_to(m2.text_encoder, m2.unet)
    net2.load_state_dict(weights)
    net.to(dtype=dtype)
    net.to(dtype=torch.float32)  # same rounding as the file
    assert close(outputs(m2), outputs(m), atol=1e-4)
    assert {l.lora_name for l in net2.unet_loras} == {l.lora_name for l in net.unet_loras}
    assert all(l.scale == 0.5 for l in net2.unet_loras if not l.is_conv3x3)
    assert all(l.scale == 0.5 for l in net2.unet_loras if l.is_conv3x3)  # conv_alpha 2 / conv_dim 4


def test_ckpt_format_and_load_weights(tmp_path):
    m, net = make("sd2")
    net.apply_to(m.text_encoder, m.unet)
    randomize(net)
    path = tmp_path / "x.pt"
    net.save_weights(str(path), None, {"ss_x": "1"})
    m2, net2 = make("sd2")
    net2.apply_to(m2.text_encoder, m2.unet)
    net2.load_weights(str(path))
    assert close(outputs(m2), outputs(m), atol=1e-6)


def test_missing_alpha_means_scale_one_and_linear_shaped_conv_accepted():
    m, net = make("sd1")
    randomize(net)
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("alpha")}
    key = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"  # SD1 proj_in is a 1x1 conv
    assert sd[key].dim() == 4
    sd[key] = sd[key].flatten(1)  # as some trainers store it
    m2 = tiny_models("sd1")
    net2, weights = lora.create_network_from_weights(1.0, None, None, m2.text_encoder, m2.unet, weights_sd=sd)
    net2.apply_to(m2.text_encoder, m2.unet)
    net2.load_state_dict(weights)
    assert all(l.scale == 1.0 for l in net2.text_encoder_loras + net2.unet_loras)
    assert weights[key].dim() == 4


def test_wrong_architecture_is_refused_with_clear_error():
    m, net = make("sd1")
    sdxl = tiny_models("sdxl")
    with pytest.raises(CheckpointError, match="SD1/SD2.*SDXL|SDXL"):
        lora.create_network_from_weights(1.0, None, None, sdxl.text_encoder, sdxl.unet, weights_sd=net.state_dict())
    sd2 = tiny_models("sd2")
    with pytest.raises(CheckpointError, match=r"has shape .* needs"):
        lora.create_network_from_weights(1.0, None, None, sd2.text_encoder, sd2.unet, weights_sd=net.state_dict())
    m3, net3 = make("sdxl")
    with pytest.raises(CheckpointError, match="lora_te1_"):
        lora.create_network_from_weights(1.0, None, None, m.text_encoder, m.unet, weights_sd=net3.state_dict())
    with pytest.raises(CheckpointError, match="no key matches"):
        lora.create_network_from_weights(1.0, None, None, m.text_encoder, m.unet,
                                         weights_sd={"foo.lora_down.weight": torch.zeros(2, 2)})


def test_unknown_keys_are_reported_not_silently_dropped(caplog):
    m, net = make("sd1")
    sd = dict(net.state_dict())
    sd["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(4, 4)
    m2, net2 = make("sd1")
    with caplog.at_level(logging.WARNING):
        net2.load_weights("memory", weights_sd=sd)
    assert "lora_unet_not_a_layer.lora_down.weight" in caplog.text
    with caplog.at_level(logging.WARNING):
        lora.create_network_from_weights(1.0, None, None, m2.text_encoder, m2.unet, weights_sd=sd)
    assert caplog.text.count("lora_unet_not_a_layer") == 2


def test_sdxl_diffusers_style_names_are_accepted_as_aliases():
    m, net = make("sdxl")
    randomize(net)
    from networks.lora_names import lora_targets
    targets = lora_targets(m.text_encoder, m.unet)
    renamed = {}
    for key, value in net.state_dict().items():
        name, _, rest = key.partition(".")
        t = targets[name]
        alias = "lora_unet_" + t.path.replace(".", "_") if t.is_unet else name
        renamed[f"{alias}.{rest}"] = value
    assert renamed.keys() != net.state_dict().keys()
    m2 = tiny_models("sdxl")
    net2, weights = lora.create_network_from_weights(1.0, None, None, m2.text_encoder, m2.unet, weights_sd=renamed)
    assert set(weights) == set(net.state_dict())
    net2.merge_to(m2.text_encoder, m2.unet, renamed)  # merge_to reads the aliases too
    net.apply_to(m.text_encoder, m.unet)
    assert close(outputs(m2), outputs(m), atol=2e-4)


def test_dropouts_only_in_training_and_max_norm():
    m, net = make("sd1", neuron_dropout=0.5, rank_dropout="0.5", module_dropout=0.5)
    net.apply_to(m.text_encoder, m.unet)
    randomize(net)
    net.eval()
    a, b = unet_out(m.unet), unet_out(m.unet)
    assert torch.equal(a, b)
    net.train()
    torch.manual_seed(0)
    c = unet_out(m.unet)
    assert not torch.allclose(a, c)

    keys_scaled, mean_norm, max_norm = net.apply_max_norm_regularization(0.05, "cpu")
    assert keys_scaled > 0 and max_norm == pytest.approx(0.05, rel=1e-4)
    for module in net.unet_loras:
        delta = module.delta_weight()
        assert float(delta.detach().norm()) <= 0.05 * (1 + 1e-4)


def test_apply_to_without_text_encoder_saves_unet_only(tmp_path):
    m, net = make("sdxl")
    net.apply_to(m.text_encoder, m.unet, apply_text_encoder=False)
    assert not net.text_encoder_loras and all(k.startswith("lora_unet_") for k in net.state_dict())
    base = te_outs(m.text_encoders)
    randomize(net)
    assert close(te_outs(m.text_encoders), base, atol=0)


def test_bad_network_args_name_the_argument():
    m = tiny_models("sd1")
    with pytest.raises(ValueError, match="conv_dim"):
        lora.create_network(1.0, 4, 1, None, m.text_encoder, m.unet, conv_dim="four")
    with pytest.raises(ValueError, match="rank_dropout"):
        lora.create_network(1.0, 4, 1, None, m.text_encoder, m.unet, rank_dropout="1.5")
    with pytest.raises(ValueError, match="network_dim"):
        lora.create_network(1.0, "x", 1, None, m.text_encoder, m.unet)


@pytest.mark.parametrize("layer_kind", ["linear3d", "linear2d", "conv1x1", "conv3x3"])
def test_fused_forward_matches_reference_values_and_gradients(layer_kind):
    torch.manual_seed(0)
    layer = {"linear3d": torch.nn.Linear(12, 10), "linear2d": torch.nn.Linear(12, 10),
             "conv1x1": torch.nn.Conv2d(6, 5, 1), "conv3x3": torch.nn.Conv2d(6, 5, 3, stride=2, padding=1)}[layer_kind]
    layer.requires_grad_(False)
    x = {"linear3d": torch.randn(2, 7, 12), "linear2d": torch.randn(3, 12)}.get(layer_kind, torch.randn(2, 6, 9, 9))
    module = lora.LoRAModule("t", layer, multiplier=0.7, lora_dim=3, alpha=1.5)
    torch.nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = layer(x1)
    up = module.lora_up(module.lora_down(x2))
    reference = module.org_forward(x2) + 0.7 * 0.5 * up
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, [x1, module.lora_down.weight, module.lora_up.weight], g)
    grads_ref = torch.autograd.grad(reference, [x2, module.lora_down.weight, module.lora_up.weight], g)
    for a, b in zip(grads_fused, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision training path
        out = layer(x1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert module.lora_up.weight.grad is not None and module.lora_up.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("case", ["fp32", "noncontiguous", "input_without_grad", "bf16_model_fp32_lora",
                                  "full_bf16", "no_bias"])
def test_fused_linear_node_matches_unfused_ops(case):
    """A frozen nn.Linear + LoRA runs as one autograd node (networks.lora_fused); same values and gradients."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 24, bias=case != "no_bias").requires_grad_(False)
    model_dtype = torch.bfloat16 if case in ("bf16_model_fp32_lora", "full_bf16") else torch.float32
    layer.to(model_dtype)
    module = lora.LoRAModule("t", layer, multiplier=0.6, lora_dim=4, alpha=2)
    torch.nn.init.normal_(module.lora_up.weight)
    if case == "full_bf16":
        module.to(torch.bfloat16)
    module.apply_to()
    x = torch.randn(2, 16, 5).transpose(1, 2) if case == "noncontiguous" else torch.randn(2, 5, 16)
    x = x.to(model_dtype)
    x1, x2 = x.clone().requires_grad_(case != "input_without_grad"), x.clone().requires_grad_(True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=model_dtype == torch.bfloat16)
    with autocast:
        fused = layer(x1)
    assert fused.grad_fn.name() == "FusedLoRALinearBackward"
    down, up = module.lora_down.weight, module.lora_up.weight
    with autocast:  # the same with separate ops (what a plain hook computes), in the compute dtype
        reference = module.org_forward(x2) + (0.6 * 0.5 * torch.nn.functional.linear(
            torch.nn.functional.linear(x2, down.to(model_dtype)), up.to(model_dtype)))
    tol = dict(atol=2e-2, rtol=2e-2) if model_dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, reference, **tol)
    g = torch.randn_like(fused)
    inputs = [down, up] + ([x1] if x1.requires_grad else [])
    grads_fused = torch.autograd.grad(fused, inputs, g)
    grads_ref = torch.autograd.grad(reference, [down, up, x2][:len(inputs)], g)
    for a, b in zip(grads_fused, grads_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        scale = b.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= (2e-2 if model_dtype == torch.bfloat16 else 1e-5) * scale


def test_fused_linear_steps_aside_for_dropout_stacking_and_trainable_base():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8).requires_grad_(False)
    first = lora.LoRAModule("a", layer, lora_dim=2)
    first.apply_to()
    x = torch.randn(3, 8)
    assert layer(x).grad_fn.name() == "FusedLoRALinearBackward"
    second = lora.LoRAModule("b", layer, lora_dim=2)  # stacked: the first hook is no plain Linear any more
    second.apply_to()
    assert layer(x).grad_fn.name() != "FusedLoRALinearBackward"
    second.restore()
    first.dropout = 0.1  # training-time dropout on the hidden: the general path
    assert layer(x).grad_fn.name() != "FusedLoRALinearBackward"
    first.eval()
    assert layer(x).grad_fn.name() == "FusedLoRALinearBackward"
    layer.weight.requires_grad_(True)  # a trained base weight would get no gradient from the fused node
    assert layer(x).grad_fn.name() != "FusedLoRALinearBackward"


def test_merge_keeps_weight_dtype_and_device_and_is_in_place():
    m, net = make("sd1")
    randomize(net)
    m.unet.to(torch.bfloat16)
    target = net.unet_loras[0].org_module
    before = target.weight.detach().float().clone()
    ptr = target.weight.data_ptr()
    net.merge_to(m.text_encoder, m.unet, net.state_dict(), torch.float16, "cpu")
    assert target.weight.dtype == torch.bfloat16 and target.weight.data_ptr() == ptr
    expected = (before + net.unet_loras[0].delta_weight().detach()).to(torch.bfloat16)
    assert torch.equal(target.weight, expected)


def test_incomplete_lycoris_module_is_named_in_the_error():
    """Complete LoHa / LoKr files load (tests/test_lycoris_*.py); an incomplete module names what it lacks."""
    m = tiny_models("sd1")
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(16, 4),
          "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b": torch.zeros(4, 16)}
    with pytest.raises(CheckpointError, match="proj_in: a loha module without hada_w2_a, hada_w2_b"):
        lora.create_network_from_weights(1.0, None, None, m.text_encoder, m.unet, weights_sd=sd)
