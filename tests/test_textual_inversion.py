"""Textual Inversion embeddings in generation: file formats, tokens, prompt expansion, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from library import gen_img
from library.file_io import CheckpointError
from library.textual_inversion import add_embeddings, expand_prompt, read_embedding
from tests.conftest import tiny_models

BASE = ["--W", "64", "--H", "64", "--steps", "2", "--sampler", "euler", "--device", "cpu", "--seed", "4"]


def _generate(tmp_path, outdir, extra, arch="sd1"):
    args = gen_img.build_parser(arch == "sdxl").parse_args(
        ["--ckpt", str(tmp_path), "--outdir", str(tmp_path / outdir), *BASE, *extra])
    (path,) = gen_img.run(args, arch == "sdxl", components=tiny_models(arch))
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32), dict(im.text)


def test_expand_prompt():
    tokens = {"mytok": ["mytok", "mytok1", "mytok2"], "one": ["one"]}
    assert expand_prompt("a (MyTok:1.2), mytokens, one cat", tokens) == "a (mytok mytok1 mytok2:1.2), mytokens, one cat"


def test_embedding_formats_give_the_same_image(tmp_path):
    vecs = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 3
    (tmp_path / "st").mkdir()
    (tmp_path / "pt").mkdir()
    save_file({"emb_params": vecs}, str(tmp_path / "st" / "mytok.safetensors"))
    torch.save({"string_to_param": {"*": vecs}, "name": "mytok", "step": 100}, tmp_path / "pt" / "mytok.pt")
    assert torch.equal(read_embedding(tmp_path / "pt" / "mytok.pt", 1)[0], vecs)

    plain, _ = _generate(tmp_path, "plain", ["--prompt", "a mytok cat"])
    st, meta = _generate(tmp_path, "st", ["--prompt", "a mytok cat", "--textual_inversion_embeddings",
                                           str(tmp_path / "st" / "mytok.safetensors")])
    pt, _ = _generate(tmp_path, "pt", ["--prompt", "a mytok cat", "--textual_inversion_embeddings",
                                        str(tmp_path / "pt" / "mytok.pt")])
    assert np.array_equal(st, pt)
    assert np.abs(st - plain).mean() > 1
    assert meta["prompt"] == "a mytok cat"  # the metadata keeps the prompt as written


def test_tokens_reach_the_encoder_table_and_sdxl(tmp_path):
    comps = tiny_models("sdxl")
    l_vecs, g_vecs = torch.randn(3, 32), torch.randn(3, 40)
    save_file({"clip_l": l_vecs, "clip_g": g_vecs}, str(tmp_path / "xlemb.safetensors"))
    tokens = add_embeddings(comps.tokenizers, comps.text_encoders, [tmp_path / "xlemb.safetensors"])
    assert tokens == {"xlemb": ["xlemb", "xlemb1", "xlemb2"]}
    for tok, te, vecs in zip(comps.tokenizers, comps.text_encoders, (l_vecs, g_vecs)):
        ids = tok.convert_tokens_to_ids(tokens["xlemb"])
        assert torch.equal(te.get_input_embeddings().weight[ids], vecs)
        assert tok(expand_prompt("a xlemb", tokens), add_special_tokens=False).input_ids[-3:] == ids

    save_file({"clip_l": l_vecs}, str(tmp_path / "half.safetensors"))
    with pytest.raises(CheckpointError, match="half.safetensors: an SDXL embedding needs 'clip_l' and 'clip_g'"):
        add_embeddings(comps.tokenizers, comps.text_encoders, [tmp_path / "half.safetensors"])
    with pytest.raises(ValueError, match="the token 'xlemb' .* is already known"):
        add_embeddings(comps.tokenizers, comps.text_encoders, [tmp_path / "xlemb.safetensors"])

    sd1 = tiny_models("sd1")
    save_file({"emb_params": torch.randn(1, 768)}, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="wide.safetensors: embedding width 768 does not fit"):
        add_embeddings(sd1.tokenizers, sd1.text_encoders, [tmp_path / "wide.safetensors"])
