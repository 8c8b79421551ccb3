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
