"""svd_merge_lora.py: exact at full rank, Eckart-Young optimal below it, conv ranks, errors."""
from __future__ import annotations

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from networks import svd_merge_lora
from networks.lora_math import DOWN
from tests.lora_fixtures import SDXL_SHAPES, SMALL_SHAPES, deltas, random_lora, write_lora


def _inputs(tmp_path, shapes=SMALL_SHAPES):
    a = random_lora(shapes, rank=4, alpha=2.0, seed=1)
    b = random_lora(shapes, rank=3, alpha=6.0, seed=2)
    return a, b, write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)


def test_full_rank_is_exact(tmp_path):
    a, b, pa, pb = _inputs(tmp_path)
    out = tmp_path / "m.safetensors"
    svd_merge_lora.main(["--models", pa, pb, "--ratios", "0.6", "-0.4", "--new_rank", "7", "--save_to", str(out)])
    got, da, db = deltas(load_state_dict(out)), deltas(a), deltas(b)
    for name in da:
        assert torch.allclose(got[name], 0.6 * da[name] - 0.4 * db[name], atol=1e-5)


def test_lower_rank_has_the_optimal_error(tmp_path):
    a, b, pa, pb = _inputs(tmp_path)
    out = tmp_path / "m.safetensors"
    svd_merge_lora.main(["--models", pa, pb, "--ratios", "1", "1", "--new_rank", "3", "--new_conv_rank", "2",
                         "--save_to", str(out)])
    sd = load_state_dict(out)
    got, da, db = deltas(sd), deltas(a), deltas(b)
    for name in da:
        target = (da[name] + db[name]).reshape(da[name].shape[0], -1)
        s = torch.linalg.svdvals(target)
        rank = 2 if name.endswith("conv1") else 3  # the 3x3 conv gets --new_conv_rank
        assert sd[name + DOWN].shape[0] == rank
        err = torch.linalg.norm(target - got[name].reshape(target.shape))
        assert torch.isclose(err, torch.linalg.norm(s[rank:]), rtol=1e-4)  # Eckart-Young: the best rank-k error
    md = read_metadata(out)
    assert md["ss_network_dim"] == "Dynamic"  # 3 for linear, 2 for the conv


def test_sdxl_loras_and_metadata(tmp_path):
    a, b, pa, pb = _inputs(tmp_path, SDXL_SHAPES)
    out = tmp_path / "m.safetensors"
    svd_merge_lora.main(["--models", pa, pb, "--new_rank", "2", "--save_to", str(out), "--sdxl",
                         "--save_precision", "fp16"])
    md = read_metadata(out)
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_network_dim"] == "2"
    assert load_state_dict(out)[next(iter(SDXL_SHAPES)) + DOWN].dtype == torch.float16


def test_errors(tmp_path):
    a, b, pa, pb = _inputs(tmp_path)
    xl = write_lora(tmp_path / "xl.safetensors", random_lora(SDXL_SHAPES, 2, seed=3))
    out = str(tmp_path / "m.safetensors")
    with pytest.raises(SystemExit, match="different model versions"):
        svd_merge_lora.main(["--models", pa, xl, "--save_to", out, "--new_rank", "2"])
    with pytest.raises(SystemExit, match="SDXL LoRA.*takes SD 2.x"):
        svd_merge_lora.main(["--models", xl, "--save_to", out, "--v2"])
    with pytest.raises(SystemExit, match="--new_rank 0: must be a positive integer"):
        svd_merge_lora.main(["--models", pa, "--save_to", out, "--new_rank", "0"])
    with pytest.raises(SystemExit, match="is also an input"):
        svd_merge_lora.main(["--models", pa, pb, "--save_to", pb])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="--device cuda: CUDA is not available"):
            svd_merge_lora.main(["--models", pa, "--save_to", out, "--device", "cuda"])
    bad_shape = dict(random_lora(SMALL_SHAPES, 2, seed=1))
    name = next(iter(SMALL_SHAPES))
    bad_shape[name + DOWN] = torch.randn(2, 99)
    pbad = write_lora(tmp_path / "bad.safetensors", bad_shape)
    with pytest.raises(SystemExit, match=f"module {name}: .*different models"):
        svd_merge_lora.main(["--models", pa, pbad, "--save_to", out])


def test_docs_worked_example(tmp_path, monkeypatch):
    from tests.lora_tool_fixtures import doc_commands

    a = random_lora(SMALL_SHAPES, rank=4, alpha=2.0, seed=1)
    b = random_lora(SMALL_SHAPES, rank=3, alpha=6.0, seed=2)
    write_lora(tmp_path / "char.safetensors", a)
    write_lora(tmp_path / "style.safetensors", b)
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands("svd_merge_lora.md", "svd_merge_lora.py"):
        svd_merge_lora.main(argv)
    got, da, db = deltas(load_state_dict(tmp_path / "char_style_r3.safetensors")), deltas(a), deltas(b)
    for name in da:
        target = (0.6 * da[name] + 0.4 * db[name]).reshape(da[name].shape[0], -1)
        err = torch.linalg.norm(target - got[name].reshape(target.shape))
        assert torch.isclose(err, torch.linalg.norm(torch.linalg.svdvals(target)[3:]), rtol=1e-4)
