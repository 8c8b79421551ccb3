"""resize_lora.py: fixed rank (optimal error, scale kept), dynamic ranks keep the stated fraction, errors."""
from __future__ import annotations

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from networks import resize_lora
from networks.lora_math import ALPHA, DOWN
from tests.lora_fixtures import SMALL_SHAPES, deltas, random_lora, write_lora


@pytest.fixture
def lora(tmp_path):
    sd = random_lora(SMALL_SHAPES, rank=8, alpha=4.0, seed=5)
    return sd, write_lora(tmp_path / "in.safetensors", sd, {"ss_network_dim": "8", "ss_output_name": "x"})


def test_fixed_rank_is_optimal_and_keeps_scale(tmp_path, lora):
    sd, path = lora
    out = tmp_path / "r.safetensors"
    resize_lora.main(["--model", path, "--save_to", str(out), "--new_rank", "3"])
    got = load_state_dict(out)
    for name, delta in deltas(sd).items():
        assert got[name + DOWN].shape[0] == 3 and float(got[name + ALPHA]) == pytest.approx(4.0 / 8 * 3)
        mat = delta.reshape(delta.shape[0], -1)
        err = torch.linalg.norm(mat - deltas(got)[name].reshape(mat.shape))
        assert torch.isclose(err, torch.linalg.norm(torch.linalg.svdvals(mat)[3:]), rtol=1e-4)
    md = read_metadata(out)
    assert md["ss_network_dim"] == "3" and md["ss_output_name"] == "x"
    assert md["ss_training_comment"].startswith("resized to 3 from 8")


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_ratio", 4.0)])
def test_dynamic_rank_keeps_the_stated_fraction(tmp_path, lora, method, param, capsys):
    sd, path = lora
    out = tmp_path / "r.safetensors"
    resize_lora.main(["--model", path, "--save_to", str(out), "--new_rank", "8", "--dynamic_method", method,
                      "--dynamic_param", str(param), "--verbose"])
    got = load_state_dict(out)
    printed = capsys.readouterr().out
    for name, delta in deltas(sd).items():
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))[:8]
        k = got[name + DOWN].shape[0]
        if method == "sv_ratio":  # every singular value above largest / param is kept, none below
            assert s[k - 1] > s[0] / param and (k == 8 or s[k] <= s[0] / param)
        else:
            if method == "sv_fro":
                kept = lambda j: float(s[:j].norm() / s.norm())  # noqa: E731
            else:
                kept = lambda j: float(s[:j].sum() / s.sum())  # noqa: E731
            assert kept(k) >= param - 1e-6 and (k == 1 or kept(k - 1) < param)  # smallest rank that reaches it
        fro = float(deltas(got)[name].norm() / delta.norm())
        assert f"{name}: rank 8 -> {k}, retained Frobenius norm {fro:.2%}" in printed
    assert read_metadata(out)["ss_training_comment"].startswith(f"dynamic resize with {method}: {param} from 8")


def test_errors(tmp_path, lora):
    _, path = lora
    out = str(tmp_path / "r.safetensors")
    with pytest.raises(SystemExit, match="needs --dynamic_param"):
        resize_lora.main(["--model", path, "--save_to", out, "--dynamic_method", "sv_fro"])
    with pytest.raises(SystemExit, match="sv_fro needs a fraction"):
        resize_lora.main(["--model", path, "--save_to", out, "--dynamic_method", "sv_fro", "--dynamic_param", "2"])
    with pytest.raises(SystemExit, match="sv_ratio needs a ratio >= 1"):
        resize_lora.main(["--model", path, "--save_to", out, "--dynamic_method", "sv_ratio", "--dynamic_param", "0.5"])
    with pytest.raises(SystemExit, match="is also an input"):
        resize_lora.main(["--model", path, "--save_to", path])
    with pytest.raises(SystemExit, match="no such file"):
        resize_lora.main(["--model", str(tmp_path / "nope.safetensors"), "--save_to", out])
    assert not (tmp_path / "r.safetensors").exists()


def test_docs_worked_example(tmp_path, monkeypatch, capsys):
    from tests.lora_tool_fixtures import doc_commands

    sd = random_lora(SMALL_SHAPES, rank=8, alpha=4.0, seed=6)
    write_lora(tmp_path / "char.safetensors", sd)
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands("resize_lora.md", "resize_lora.py"):
        resize_lora.main(argv)
    r2 = load_state_dict(tmp_path / "char_r2.safetensors")
    assert {r2[k].shape[0] for k in r2 if k.endswith(DOWN)} == {2}
    fro = deltas(load_state_dict(tmp_path / "char_fro90.safetensors"))
    for name, delta in deltas(sd).items():
        assert float(fro[name].norm() / delta.norm()) >= 0.9 - 1e-6
    assert "retained Frobenius norm" in capsys.readouterr().out


def test_benchmark_script_runs_at_tiny_size(tmp_path):
    from bench.bench_lora_tools import main as bench_main

    results = bench_main(["--size", "tiny", "--workdir", str(tmp_path), "--json", str(tmp_path / "r.json"),
                          "--cases", "merge_two_loras", "resize_rank2"])
    assert set(results) == {"merge_two_loras", "resize_rank2"}
    assert all(r["seconds"] > 0 and 0.05 < r["peak_rss_gib"] < 4 for r in results.values())
    assert (tmp_path / "ab.safetensors").exists() and (tmp_path / "resized.safetensors").exists()


def test_new_conv_rank_sets_the_rank_of_3x3_convs_only(tmp_path, lora):
    sd, path = lora
    out = tmp_path / "c.safetensors"
    resize_lora.main(["--model", path, "--save_to", str(out), "--new_rank", "3", "--new_conv_rank", "5"])
    ranks = {name: t.shape[0] for name, t in load_state_dict(out).items() if name.endswith(DOWN)}
    assert ranks == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" + DOWN: 3,
                     "lora_unet_down_blocks_0_attentions_0_proj_in" + DOWN: 3,
                     "lora_unet_down_blocks_0_resnets_0_conv1" + DOWN: 5}
    with pytest.raises(SystemExit, match="--new_conv_rank 0: must be a positive integer"):
        resize_lora.main(["--model", path, "--save_to", str(tmp_path / "d.safetensors"), "--new_conv_rank", "0"])
