"""tools/convert_diffusers20_original_sd.py and tools/make_tiny_model.py as users run them."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from library.file_io import read_metadata
from tests.model_fixtures import tiny_model_path, tiny_tokenizer_cache
from tools import convert_diffusers20_original_sd as convert
from tools import make_tiny_model

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _doc_commands(page: str) -> list[list[str]]:
    """The `python tools/...` lines of the worked example of a docs page."""
    text = (DOCS / page).read_text(encoding="utf-8")
    block = text.split("## Worked example", 1)[1].split("```")[1]
    return [shlex.split(line) for line in block.strip().splitlines() if line.startswith("python ")]


def _run(argv: list[str]) -> None:
    script = argv[1]
    main = {"tools/make_tiny_model.py": make_tiny_model.main,
            "tools/convert_diffusers20_original_sd.py": convert.main}[script]
    main(argv[2:])


def test_worked_example_of_the_docs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = _doc_commands("convert_diffusers20_original_sd.md")
    assert len(commands) == 3
    for argv in commands:
        _run(argv)
    original = load_file("tiny/sd2.safetensors")
    back = load_file("tiny/sd2_fp16.safetensors")
    assert set(original) == set(back)
    for k, v in original.items():
        assert back[k].dtype == (torch.float16 if v.is_floating_point() else v.dtype)
        assert torch.equal(back[k], v.half() if v.is_floating_point() else v), k
    assert read_metadata("tiny/sd2_fp16.safetensors")["global_step"] == "100"
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tmp_path / "tiny/sd2_diffusers/tokenizer"))
    assert tok("a b", padding="max_length", max_length=6).input_ids == [49406, 320, 321, 49407, 0, 0]


def test_make_tiny_model_doc_example(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    commands = _doc_commands("make_tiny_model.md")
    with caplog.at_level("INFO"):
        for argv in commands:
            _run(argv)
    assert "--tokenizer_cache_dir tiny/sdxl_tokenizers" in caplog.text
    assert (tmp_path / "tiny/sdxl_tokenizers/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k/vocab.json").is_file()
    assert (tmp_path / "tiny/sd1_diffusers/model_index.json").is_file()
    # deterministic for a seed
    a = load_file("tiny/sdxl.safetensors")
    b = load_file(str(tiny_model_path("sdxl")))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_round_trip_through_the_script(arch, tmp_path):
    src = tiny_model_path(arch)
    cache = str(tiny_tokenizer_cache(arch))
    convert.main([str(src), str(tmp_path / "d"), "--tokenizer_cache_dir", cache])
    convert.main([str(tmp_path / "d"), str(tmp_path / "back.ckpt"), "--epoch", "2", "--global_step", "30"])
    obj = torch.load(tmp_path / "back.ckpt", weights_only=True)
    assert (obj["epoch"], obj["global_step"]) == (2, 30)
    original = load_file(str(src))
    assert set(obj["state_dict"]) == set(original)
    assert all(torch.equal(obj["state_dict"][k], original[k]) for k in original)


def test_precision_flags(tmp_path):
    src = str(tiny_model_path("sd1"))
    convert.main([src, str(tmp_path / "bf16.safetensors"), "--bf16"])
    assert load_file(str(tmp_path / "bf16.safetensors"))["model.diffusion_model.out.2.weight"].dtype == torch.bfloat16
    convert.main([src, str(tmp_path / "fp16.safetensors"), "--fp16", "--v1"])
    assert load_file(str(tmp_path / "fp16.safetensors"))["model.diffusion_model.out.2.weight"].dtype == torch.float16
    with pytest.raises(SystemExit, match="--fp16 and --bf16 conflict"):
        convert.main([src, str(tmp_path / "x.safetensors"), "--fp16", "--bf16"])


def test_reference_model_supplies_tokenizers(tmp_path):
    ref = tiny_model_path("sd1", "diffusers")
    convert.main([str(tiny_model_path("sd1")), str(tmp_path / "d"), "--reference_model", str(ref)])
    assert (tmp_path / "d/tokenizer/tokenizer.json").read_text() == (ref / "tokenizer/tokenizer.json").read_text()


@pytest.mark.parametrize("args,pattern", [
    (["--v2"], r"sd1\.safetensors: is an SD 1\.x model, but --v2 was given; use --v1"),
    (["--sdxl"], r"sd1\.safetensors: is an SD 1\.x model, but --sdxl was given"),
    (["--v1", "--v2"], r"--v1 and --v2 conflict"),
])
def test_wrong_family_flags_stop_with_one_line(args, pattern, tmp_path):
    with pytest.raises(SystemExit) as e:
        convert.main([str(tiny_model_path("sd1")), str(tmp_path / "out.safetensors"), *args])
    assert re.search(pattern, str(e.value)) and "\n" not in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_bad_inputs_and_overwrite(tmp_path):
    with pytest.raises(SystemExit, match=r"missing\.ckpt: no such file"):
        convert.main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out")])
    src = tmp_path / "m.safetensors"
    src.write_bytes(tiny_model_path("sd1").read_bytes())
    with pytest.raises(SystemExit, match="is also an input"):
        convert.main([str(src), str(src), "--fp16"])
    with pytest.raises(SystemExit, match=r"--tokenizer_cache_dir"):
        convert.main([str(src), str(tmp_path / "diffusers_out"), "--tokenizer_cache_dir", str(tmp_path / "empty")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_make_tiny_model_full_size_writes_the_real_layout(tmp_path, monkeypatch):
    """--size full, checked on the meta device: the save receives the real SDXL models (2515 tensors)."""
    import library.model_loading as ml
    from library import ldm_convert as lc
    from library.sd_configs import build_models

    seen = {}

    def fake_save(comps, path, *args, **kwargs):
        seen["sd"] = lc.models_to_ldm(comps.arch, comps.unet, comps.vae, comps.text_encoders)
        seen["path"] = Path(path)

    monkeypatch.setattr(make_tiny_model, "build_models",
                        lambda arch, size, seed=0: build_models(arch, size, seed=seed, meta=True))
    monkeypatch.setattr(ml, "save_models", fake_save)
    make_tiny_model.main(["--arch", "sdxl", "--size", "full", "--output", str(tmp_path / "xl.safetensors")])
    assert seen["path"] == tmp_path / "xl.safetensors" and len(seen["sd"]) == 2515
    assert tuple(seen["sd"]["model.diffusion_model.label_emb.0.0.weight"].shape) == (1280, 2816)
    assert (tmp_path / "xl_tokenizers" / "openai_clip-vit-large-patch14").is_dir()
    with pytest.raises(SystemExit, match="needs a .safetensors or .ckpt name"):
        make_tiny_model.main(["--arch", "sd1", "--output", str(tmp_path / "folder")])
