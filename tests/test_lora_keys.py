"""The exact LoRA module names written for each tiny architecture, as kohya's sd-scripts name them.

Three sources must agree: the committed lists in tests/data/lora_keys_<arch>_<kind>.txt, an independent
derivation from the UNet / CLIP configs written here from kohya's naming rules (diffusers paths for SD1/SD2,
SGM paths for SDXL, `text_model_` in text-encoder names), and what `networks.lora_names` / a saved network give.
Regenerate a list (after checking the change is intended) with `python -m tests.test_lora_keys <arch> <kind>`.
"""
from __future__ import annotations

import os
import re
import sys

import pytest
import torch

from library.sd_configs import arch_config
from networks import lora
from networks.lora_names import LoRANameResolver, lora_targets
from tests.conftest import tiny_models

DATA = os.path.join(os.path.dirname(__file__), "data")
ATTN_LAYERS = ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
RESNET_SGM = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
              "conv_shortcut": "skip_connection"}


def _transformer(prefix: str, depth: int) -> list[str]:
    names = [f"{prefix}.proj_in", f"{prefix}.proj_out"]
    for t in range(depth):
        for attn in ("attn1", "attn2"):
            names += [f"{prefix}.transformer_blocks.{t}.{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")]
        names += [f"{prefix}.transformer_blocks.{t}.ff.net.0.proj", f"{prefix}.transformer_blocks.{t}.ff.net.2"]
    return names


def _resnet(prefix: str, shortcut: bool) -> list[str]:
    return [f"{prefix}.{c}" for c in ("conv1", "time_emb_proj", "conv2")] + ([f"{prefix}.conv_shortcut"] if shortcut else [])


def expected_unet_paths(cfg: dict, c3lier: bool) -> list[tuple[str, str]]:
    """(diffusers path, SGM path) of every target, derived from the config as kohya's module walk finds them."""
    layers = cfg["layers_per_block"]
    down, up, outs = cfg["down_block_types"], cfg["up_block_types"], cfg["block_out_channels"]
    n = len(down)
    tl = cfg.get("transformer_layers_per_block", 1)
    tl = [tl] * n if isinstance(tl, int) else list(tl)
    pairs: list[tuple[str, str]] = []

    def add(diff_prefix: str, sgm_prefix: str, names: list[str]) -> None:
        for name in names:
            rest = name[len(diff_prefix) + 1:]
            sgm_rest = RESNET_SGM.get(rest, rest)
            pairs.append((name, f"{sgm_prefix}.{sgm_rest}"))

    for i, kind in enumerate(down):
        for j in range(layers):
            sgm = f"input_blocks.{1 + i * (layers + 1) + j}"
            if c3lier:
                in_ch = outs[max(i - 1, 0)] if j == 0 else outs[i]
                add(f"down_blocks.{i}.resnets.{j}", f"{sgm}.0", _resnet(f"down_blocks.{i}.resnets.{j}", in_ch != outs[i]))
            if "CrossAttn" in kind:
                add(f"down_blocks.{i}.attentions.{j}", f"{sgm}.1", _transformer(f"down_blocks.{i}.attentions.{j}", tl[i]))
        if c3lier and i < n - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{1 + i * (layers + 1) + layers}.0.op"))
    if c3lier:
        add("mid_block.resnets.0", "middle_block.0", _resnet("mid_block.resnets.0", False))
        add("mid_block.resnets.1", "middle_block.2", _resnet("mid_block.resnets.1", False))
    add("mid_block.attentions.0", "middle_block.1", _transformer("mid_block.attentions.0", tl[-1]))
    for i, kind in enumerate(up):
        level = n - 1 - i
        for j in range(layers + 1):
            sgm = f"output_blocks.{i * (layers + 1) + j}"
            if c3lier:  # skip concatenation: every up resnet changes its channel count
                add(f"up_blocks.{i}.resnets.{j}", f"{sgm}.0", _resnet(f"up_blocks.{i}.resnets.{j}", True))
            if "CrossAttn" in kind:
                add(f"up_blocks.{i}.attentions.{j}", f"{sgm}.1", _transformer(f"up_blocks.{i}.attentions.{j}", tl[level]))
        if c3lier and i < n - 1:
            pos = 2 if "CrossAttn" in kind else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * (layers + 1) + layers}.{pos}.conv"))
    return pairs


def expected_names(arch: str, kind: str, size: str = "tiny") -> list[str]:
    cfg = arch_config(arch, size)
    sdxl = cfg.is_sdxl
    names = []
    prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
    for prefix, te in zip(prefixes, cfg.text_encoders):
        for layer in range(te["num_hidden_layers"]):
            base = f"{prefix}_text_model_encoder_layers_{layer}"
            names += [f"{base}_self_attn_{p}_proj" for p in ("q", "k", "v", "out")]
            names += [f"{base}_mlp_fc1", f"{base}_mlp_fc2"]
    for diff_path, sgm_path in expected_unet_paths(cfg.unet, kind == "c3lier"):
        names.append("lora_unet_" + (sgm_path if sdxl else diff_path).replace(".", "_"))
    return sorted(names)


def data_file(arch: str, kind: str) -> str:
    return os.path.join(DATA, f"lora_keys_{arch}_{kind}.txt")


def read_list(arch: str, kind: str) -> list[str]:
    with open(data_file(arch, kind), encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


CASES = [(a, k) for a in ("sd1", "sd2", "sdxl") for k in ("lierla", "c3lier")]


@pytest.mark.parametrize("arch,kind", CASES)
def test_committed_list_equals_kohya_naming_and_saved_keys(arch, kind, tmp_path):
    committed = read_list(arch, kind)
    assert committed == expected_names(arch, kind)
    m = tiny_models(arch)
    targets = lora_targets(m.text_encoder, m.unet, include_conv3x3=kind == "c3lier")
    assert sorted(targets) == committed
    conv = {"conv_dim": 2} if kind == "c3lier" else {}
    net = lora.create_network(1.0, 4, 1, None, m.text_encoder, m.unet, **conv)
    net.apply_to(m.text_encoder, m.unet)
    path = tmp_path / "k.safetensors"
    net.save_weights(str(path), torch.float16, {})
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys == {f"{n}.{s}" for n in committed for s in ("lora_down.weight", "lora_up.weight", "alpha")}


@pytest.mark.parametrize("arch,kind", CASES)
def test_structural_invariants(arch, kind):
    m = tiny_models(arch)
    sdxl = arch == "sdxl"
    targets = lora_targets(m.text_encoder, m.unet, include_conv3x3=kind == "c3lier")
    unet_name = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks)_" if sdxl
                           else r"^lora_unet_(down_blocks|mid_block|up_blocks)_")
    te_name = re.compile(r"^lora_te[12]_text_model_encoder_layers_\d+_(self_attn|mlp)_" if sdxl
                         else r"^lora_te_text_model_encoder_layers_\d+_(self_attn|mlp)_")
    for name, t in targets.items():
        assert (unet_name if t.is_unet else te_name).match(name), name
        assert isinstance(t.module, (torch.nn.Linear, torch.nn.Conv2d))
        if t.is_unet:
            # conv_in (block 0 of SD, 1 of SDXL), SDXL's embeddings (0) and out (22) never get a LoRA
            assert (2 if sdxl else 1) <= t.block <= (21 if sdxl else 24), (name, t.block)
            if kind == "lierla":
                assert ".attentions." in t.path and t.kind != "conv3x3"
        else:
            assert isinstance(t.module, torch.nn.Linear) and "text_projection" not in name
    if kind == "c3lier":
        lierla = lora_targets(m.text_encoder, m.unet)
        extra = set(targets) - set(lierla)
        assert set(lierla) <= set(targets)
        assert all(re.search(r"resnets|samplers", targets[n].path) for n in extra)
        kinds = {targets[n].kind for n in extra}
        assert kinds == {"linear", "conv1x1", "conv3x3"}  # time_emb_proj, conv_shortcut, 3x3 convs
    # every name resolves back to the very module it was made for
    resolver = LoRANameResolver(m.text_encoder, m.unet)
    assert all(resolver.resolve(n).module is t.module for n, t in targets.items())


def test_text_encoder_names_keep_text_model_for_flattened_clip():
    m = tiny_models("sd1")
    assert not hasattr(m.text_encoder, "text_model")  # transformers 5 flattening
    names = lora_targets(m.text_encoder, None)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert names["lora_te_text_model_encoder_layers_0_self_attn_q_proj"].path == "encoder.layers.0.self_attn.q_proj"


def test_block_indices_follow_the_documented_numbering():
    sd1 = lora_targets(None, tiny_models("sd1").unet, include_conv3x3=True)
    assert sd1["lora_unet_down_blocks_0_attentions_0_proj_in"].block == 1
    assert sd1["lora_unet_down_blocks_0_downsamplers_0_conv"].block == 3
    assert sd1["lora_unet_mid_block_attentions_0_proj_in"].block == 12
    assert sd1["lora_unet_up_blocks_0_resnets_0_conv1"].block == 13
    assert sd1["lora_unet_up_blocks_3_attentions_2_proj_out"].block == 24
    xl = lora_targets(None, tiny_models("sdxl").unet, include_conv3x3=True)
    assert xl["lora_unet_input_blocks_1_0_in_layers_2"].block == 2
    assert xl["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].block == 5
    assert xl["lora_unet_middle_block_0_emb_layers_1"].block == 10
    assert xl["lora_unet_middle_block_1_proj_in"].block == 11
    assert xl["lora_unet_middle_block_2_out_layers_3"].block == 12
    assert xl["lora_unet_output_blocks_8_0_skip_connection"].block == 21


if __name__ == "__main__":
    arch, kind = sys.argv[1], sys.argv[2]
    with open(data_file(arch, kind), "w", encoding="utf-8") as f:
        f.write("\n".join(expected_names(arch, kind)) + "\n")


@pytest.mark.parametrize("arch,counts", [("sd1", {"unet": 192, "te": 72}), ("sd2", {"unet": 192, "te": 138}),
                                         ("sdxl", {"unet": 722, "te1": 72, "te2": 192})])
def test_full_size_module_counts_match_kohya_files(arch, counts):
    """Real-size layouts (built on the meta device: no memory): a kohya LierLa LoRA of SD1.5 has 264 modules
    (792 keys), one of SDXL 722 U-Net modules plus 72 + 192 text-encoder modules."""
    from library.sd_configs import build_models

    models = build_models(arch, "full", meta=True, tokenizers=False)
    targets = lora_targets(models.text_encoder, models.unet)
    found = {}
    for t in targets.values():
        found[t.component] = found.get(t.component, 0) + 1
    assert found == counts
    assert expected_names(arch, "lierla", "full") == sorted(targets)

