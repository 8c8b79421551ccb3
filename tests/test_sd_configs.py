"""The architecture tables: real sizes at `full`, working tiny models, a tokenizer with CLIP's ids."""
import torch

from library.sd_configs import ARCHS, build_models, make_clip_tokenizer
from library.unet_layout import block_index, diffusers_to_ldm_module
from tests.conftest import tiny_models


def test_full_sizes_match_the_real_models():
    params = {a: sum(p.numel() for p in build_models(a, "full", meta=True, tokenizers=False).unet.parameters())
              for a in ("sd1", "sd2", "sdxl")}
    assert params == {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}


def test_tokenizer_keeps_clip_ids_and_pad_tokens():
    clip, openclip = make_clip_tokenizer("clip"), make_clip_tokenizer("openclip")
    ids = clip("a b").input_ids
    assert ids == [49406, 320, 321, 49407]
    assert clip.pad_token_id == 49407 and openclip.pad_token_id == 0
    assert clip.model_max_length == 77


def test_tiny_models_run_each_architecture():
    for arch in ARCHS:
        m = tiny_models(arch)
        ids = torch.tensor([m.tokenizers[0]("a dog", padding="max_length", max_length=77).input_ids])
        outs = [te(ids, output_hidden_states=True) for te in m.text_encoders]
        ctx = torch.cat([o.hidden_states[-2] for o in outs], -1) if m.is_sdxl else outs[0].last_hidden_state
        kw = {}
        if m.is_sdxl:
            kw["added_cond_kwargs"] = {"text_embeds": outs[1].text_embeds, "time_ids": torch.zeros(1, 6)}
        out = m.unet(torch.randn(1, 4, 8, 8), 10, ctx, **kw).sample
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()


def test_unet_layout_names_are_unique_and_blocks_cover_the_documented_ranges():
    for arch, blocks in (("sd1", set(range(-1, 25))), ("sdxl", set(range(23)))):
        unet = build_models(arch, "full", meta=True, tokenizers=False).unet
        names = [diffusers_to_ldm_module(n, unet.config) for n in unet.state_dict()]
        assert len(set(names)) == len(names)
        assert {block_index(n, arch == "sdxl") for n in names} == blocks
    sdxl = build_models("sdxl", "tiny", meta=True, tokenizers=False).unet.config
    assert diffusers_to_ldm_module("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", sdxl) == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    assert diffusers_to_ldm_module("up_blocks.0.upsamplers.0.conv.weight", sdxl) == "output_blocks.2.2.conv.weight"
    assert diffusers_to_ldm_module("down_blocks.0.resnets.1.time_emb_proj.bias", sdxl) == \
        "input_blocks.2.0.emb_layers.1.bias"


def test_atomic_writes_leave_no_temp_files_and_use_the_umask(tmp_path):
    import os

    import pytest

    from library.file_io import atomic_path, load_state_dict, save_state_dict

    out = tmp_path / "a.safetensors"
    save_state_dict({"w": torch.ones(2)}, out, metadata={"k": "v"})
    assert load_state_dict(out)["w"].tolist() == [1.0, 1.0]
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "b.bin") as tmp:
            open(tmp, "wb").write(b"half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_saved_model_folders_and_states_get_the_umask_mode(tmp_path):
    import os

    from library.file_io import TEMP_PREFIX, temp_dir_beside

    umask = os.umask(0)
    os.umask(umask)
    folder = temp_dir_beside(tmp_path / "model")
    assert (folder.stat().st_mode & 0o777) == 0o777 & ~umask
    assert folder.parent == tmp_path and folder.name.startswith(TEMP_PREFIX) and folder.name.endswith(".model.tmp")
