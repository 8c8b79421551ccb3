"""merge_lora.py / sdxl_merge_lora.py: into a checkpoint (same outputs as apply_to), LoRA + LoRA, concat, shuffle."""
from __future__ import annotations

import json
import math

import pytest
import torch

from library.file_io import load_state_dict, read_metadata
from library.model_loading import load_models
from library.tensor_stream import TensorFile
from networks import merge_lora, sdxl_merge_lora
from networks.lora_math import ALPHA, DOWN, UP
from tests.conftest import tiny_models
from tests.lora_fixtures import SDXL_SHAPES, SMALL_SHAPES, deltas, random_lora, write_lora
from tests.lora_helpers import outputs
from tests.lora_tool_fixtures import outputs_with_loras, random_network, write_checkpoint, write_network
from tests.model_fixtures import load_kwargs, tiny_model_path


def _assert_close(a: list[torch.Tensor], b: list[torch.Tensor], atol: float = 2e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max()


def _lora_files(tmp_path, arch: str, n: int = 2):
    models = tiny_models(arch)
    files = []
    for i in range(n):
        net = random_network(models, dim=4 - i, alpha=2.0 + i, conv_dim=2, seed=10 + i)
        files.append(write_network(net, tmp_path / f"{arch}_lora{i}.safetensors"))
    return files


@pytest.mark.parametrize("arch", ["sd1", "sd2"])
def test_merge_into_model_equals_apply_to(tmp_path, arch):
    files = _lora_files(tmp_path, arch)
    out = tmp_path / "merged.safetensors"
    argv = ["--sd_model", str(tiny_model_path(arch)), "--save_to", str(out), "--models", *files,
            "--ratios", "0.7", "-0.4"] + (["--v2"] if arch == "sd2" else [])
    merge_lora.main(argv)
    merged = load_models(out, **load_kwargs(arch))
    expected = outputs_with_loras(arch, [(files[0], 0.7), (files[1], -0.4)])
    _assert_close(outputs(merged), expected)
    assert max((e - o).abs().max() for e, o in zip(expected, outputs(tiny_models(arch)))) > 1e-2  # LoRAs do matter
    with TensorFile(tiny_model_path(arch)) as src, TensorFile(out) as dst:
        assert dst.keys() == src.keys()  # same layout, same key order


def test_sdxl_merge_into_model_equals_apply_to_and_saves_fp16(tmp_path):
    files = _lora_files(tmp_path, "sdxl", n=1)
    out = tmp_path / "merged.safetensors"
    sdxl_merge_lora.main(["--sd_model", str(tiny_model_path("sdxl")), "--save_to", str(out), "--models", files[0],
                          "--ratios", "0.8", "--save_precision", "fp16"])
    sd = load_state_dict(out)
    assert {v.dtype for v in sd.values() if v.is_floating_point()} == {torch.float16}
    merged = load_models(out, **load_kwargs("sdxl"))
    _assert_close(outputs(merged), outputs_with_loras("sdxl", [(files[0], 0.8)]), atol=2e-2)


def test_merge_into_ckpt_model_writes_ckpt_without_ema(tmp_path):
    files = _lora_files(tmp_path, "sd1", n=1)
    sd = load_state_dict(tiny_model_path("sd1"))
    sd["model_ema.decay"] = torch.tensor(0.999)
    src = tmp_path / "base.ckpt"
    torch.save({"state_dict": sd, "global_step": 10}, src)
    out = tmp_path / "merged.ckpt"
    merge_lora.main(["--sd_model", str(src), "--save_to", str(out), "--models", files[0], "--ratios", "1.0"])
    saved = torch.load(out, weights_only=True)["state_dict"]
    assert set(saved) == set(sd) - {"model_ema.decay"}
    merged = load_models(out, **load_kwargs("sd1"))
    _assert_close(outputs(merged), outputs_with_loras("sd1", [(files[0], 1.0)]))


def test_merge_into_model_refuses_other_versions(tmp_path):
    sd1_lora = _lora_files(tmp_path, "sd1", n=1)[0]
    sdxl_lora = _lora_files(tmp_path, "sdxl", n=1)[0]
    out = str(tmp_path / "out.safetensors")
    with pytest.raises(SystemExit, match="SD 2.x model.*--v2 was not given"):
        merge_lora.main(["--sd_model", str(tiny_model_path("sd2")), "--save_to", out, "--models", sd1_lora])
    with pytest.raises(SystemExit, match="SD 1.x model.*--v2 was given"):
        merge_lora.main(["--sd_model", str(tiny_model_path("sd1")), "--save_to", out, "--models", sd1_lora, "--v2"])
    with pytest.raises(SystemExit, match="SDXL model; use the sdxl_"):
        merge_lora.main(["--sd_model", str(tiny_model_path("sdxl")), "--save_to", out, "--models", sd1_lora])
    with pytest.raises(SystemExit, match="SDXL"):
        merge_lora.main(["--sd_model", str(tiny_model_path("sd1")), "--save_to", out, "--models", sdxl_lora])
    with pytest.raises(SystemExit, match="needs an SDXL model"):
        sdxl_merge_lora.main(["--sd_model", str(tiny_model_path("sd1")), "--save_to", out, "--models", sd1_lora])
    # a LoRA made for tiny SD1 does not fit tiny SD2 (other widths): a clear error, before any output
    with pytest.raises(SystemExit, match="does not fit weight shape|matches no layer"):
        merge_lora.main(["--sd_model", str(tiny_model_path("sd2")), "--save_to", out, "--models", sd1_lora, "--v2"])
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


# ----------------------------------------------------------------------------------------------- LoRA + LoRA
def test_merge_loras_documented_formula(tmp_path):
    a = random_lora(SMALL_SHAPES, rank=4, alpha=2.0, seed=1)
    b = random_lora(SMALL_SHAPES, rank=4, alpha=8.0, seed=2)
    pa, pb = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    out = tmp_path / "ab.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", pa, pb, "--ratios", "0.6", "-0.4"])
    got = load_state_dict(out)
    for key in a:
        if key.endswith(ALPHA):
            assert float(got[key]) == 2.0  # the first model's alpha
            continue
        s_b = math.sqrt(8.0 / 2.0) * -0.4
        s_b = abs(s_b) if key.endswith(UP) else s_b
        expected = a[key] * (0.6 if key.endswith(DOWN) else abs(0.6)) + b[key] * s_b
        assert torch.allclose(got[key], expected, atol=1e-6)


def test_single_lora_ratio_one_is_unchanged(tmp_path):
    a = random_lora(SMALL_SHAPES, rank=3, alpha=1.5, seed=4)
    out = tmp_path / "same.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", write_lora(tmp_path / "a.safetensors", a)])
    got = load_state_dict(out)
    assert set(got) == set(a)
    assert all(torch.equal(got[k], a[k]) for k in a)


@pytest.mark.parametrize("shuffle", [False, True])
def test_concat_keeps_the_weighted_sum_exactly(tmp_path, shuffle):
    a = random_lora(SMALL_SHAPES, rank=4, alpha=2.0, seed=1)
    b = random_lora(SMALL_SHAPES, rank=3, alpha=6.0, seed=2)
    pa, pb = write_lora(tmp_path / "a.safetensors", a), write_lora(tmp_path / "b.safetensors", b)
    out = tmp_path / "c.safetensors"
    argv = ["--save_to", str(out), "--models", pa, pb, "--ratios", "1.0", "-0.5", "--concat"]
    merge_lora.main(argv + (["--shuffle"] if shuffle else []))
    got = load_state_dict(out)
    da, db, dc = deltas(a), deltas(b), deltas(got)
    for name in da:
        assert got[name + DOWN].shape[0] == 7  # ranks add up
        assert torch.allclose(dc[name], da[name] - 0.5 * db[name], atol=1e-5)
    moved = any(not torch.allclose(got[name + DOWN][:4], a[name + DOWN]) for name in da)
    assert moved == shuffle  # shuffled rows no longer line up with the inputs'
    assert json.loads(read_metadata(out)["ss_merge_recipe"])["shuffle"] is shuffle


def test_different_ranks_point_to_svd_merge(tmp_path):
    pa = write_lora(tmp_path / "a.safetensors", random_lora(SMALL_SHAPES, rank=4, seed=1))
    pb = write_lora(tmp_path / "b.safetensors", random_lora(SMALL_SHAPES, rank=2, seed=2))
    with pytest.raises(SystemExit, match="rank 4 in .*a.safetensors but 2 in .*b.safetensors.*svd_merge_lora.py"):
        merge_lora.main(["--save_to", str(tmp_path / "o.safetensors"), "--models", pa, pb])


def test_lora_family_mismatches(tmp_path):
    sd = write_lora(tmp_path / "sd.safetensors", random_lora(SMALL_SHAPES, 2, seed=1), {"ss_v2": "False"})
    sd2 = write_lora(tmp_path / "sd2.safetensors", random_lora(SMALL_SHAPES, 2, seed=1), {"ss_v2": "True"})
    xl = write_lora(tmp_path / "xl.safetensors", random_lora(SDXL_SHAPES, 2, seed=1))
    out = str(tmp_path / "o.safetensors")
    with pytest.raises(SystemExit, match="different model versions.*SD 1.x.*SD 2.x"):
        merge_lora.main(["--save_to", out, "--models", sd, sd2])
    with pytest.raises(SystemExit, match="SDXL LoRA.*use sdxl_merge_lora.py"):
        merge_lora.main(["--save_to", out, "--models", xl])
    with pytest.raises(SystemExit, match="SD 1.x \\(v1\\) LoRA.*use merge_lora.py"):
        sdxl_merge_lora.main(["--save_to", out, "--models", sd])
    sdxl_merge_lora.main(["--save_to", out, "--models", xl, "--ratios", "0.5"])
    assert read_metadata(out)["ss_base_model_version"] == "sdxl_base_v1-0"


def test_metadata_merged_and_recipe_recorded(tmp_path):
    common = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": "x"}
    pa = write_lora(tmp_path / "a.safetensors", random_lora(SMALL_SHAPES, 2, seed=1),
                    {**common, "ss_seed": "1", "sshs_model_hash": "aaa"})
    pb = write_lora(tmp_path / "b.safetensors", random_lora(SMALL_SHAPES, 2, seed=2),
                    {**common, "ss_seed": "2", "sshs_model_hash": "bbb"})
    out = tmp_path / "o.safetensors"
    merge_lora.main(["--save_to", str(out), "--models", pa, pb, "--ratios", "0.5", "0.5", "--save_precision", "bf16"])
    md = read_metadata(out)
    assert md["ss_output_name"] == "x" and "ss_seed" not in md  # kept when equal, dropped when they differ
    assert md["ss_network_dim"] == "2" and md["ss_network_alpha"] == "2"
    assert len(md["sshs_model_hash"]) == 64 and md["sshs_model_hash"] not in ("aaa", "bbb")
    recipe = json.loads(md["ss_merge_recipe"])
    assert [(m["file"], m["ratio"], m["sshs_model_hash"]) for m in recipe["models"]] == [
        ("a.safetensors", 0.5, "aaa"), ("b.safetensors", 0.5, "bbb")]
    assert load_state_dict(out)[next(iter(SMALL_SHAPES)) + DOWN].dtype == torch.bfloat16


def test_argument_errors(tmp_path):
    pa = write_lora(tmp_path / "a.safetensors", random_lora(SMALL_SHAPES, 2, seed=1))
    with pytest.raises(SystemExit, match="--save_to .* is also an input"):
        merge_lora.main(["--save_to", pa, "--models", pa])
    with pytest.raises(SystemExit, match="--ratios has 2 values but --models has 1"):
        merge_lora.main(["--save_to", str(tmp_path / "o.safetensors"), "--models", pa, "--ratios", "1", "2"])
    with pytest.raises(SystemExit, match="no such file"):
        merge_lora.main(["--save_to", str(tmp_path / "o.safetensors"), "--models", str(tmp_path / "missing.safetensors")])
    with pytest.raises(SystemExit, match="--concat / --shuffle apply when merging LoRAs"):
        merge_lora.main(["--sd_model", str(tiny_model_path("sd1")), "--save_to", str(tmp_path / "o.safetensors"),
                         "--models", pa, "--concat"])
    bad = write_lora(tmp_path / "bad.safetensors", {"lora_unet_x.hada_w1_a": torch.zeros(2, 2)})
    with pytest.raises(SystemExit, match="lora_unet_x: a loha module without hada_w1_b"):
        merge_lora.main(["--save_to", str(tmp_path / "o.safetensors"), "--models", bad])
    assert not (tmp_path / "o.safetensors").exists()


def test_target_table_is_cached_and_equal_to_a_fresh_one(tmp_path, monkeypatch):
    from library import ldm_convert as lc
    from networks import lora_checkpoint_ops as ops
    from networks import lora_target_tables as tables

    monkeypatch.setenv("SD_LORA_SUITE_CACHE", str(tmp_path))
    with TensorFile(tiny_model_path("sdxl")) as f:
        layout = lc.infer_layout(ops.read_shapes(f))
    fresh = ops.placed_targets(layout, aliases=True)
    assert len(list((tmp_path / "lora_targets").glob("*.json"))) == 1
    monkeypatch.setattr(tables, "meta_models", lambda layout: pytest.fail("cache not used"))
    assert ops.placed_targets(layout, aliases=True) == fresh
    lierla = ops.placed_targets(layout, include_conv3x3=False)
    assert set(lierla) < set(fresh) and not any(p.kind == "conv3x3" for p in lierla.values())


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_shipped_real_size_tables_match_lora_names(tmp_path, monkeypatch, arch):
    """The shipped tables (used on a first run, without importing diffusers) equal a fresh computation."""
    import gzip

    from networks import lora_target_tables as tables

    layout = tables.real_size_layout(arch)
    shipped = tables.SHIPPED_DIR / f"{tables.config_key(layout)}.json.gz"
    assert json.loads(gzip.decompress(shipped.read_bytes())) == json.loads(json.dumps(tables.build_target_table(layout)))
    monkeypatch.setenv("SD_LORA_SUITE_CACHE", str(tmp_path))  # empty user cache: the shipped table is used
    monkeypatch.setattr(tables, "meta_models", lambda layout: pytest.fail("shipped table not used"))
    names = {row[0] for row in tables.target_table(layout)["targets"]}
    expected = ({"lora_unet_input_blocks_8_1_transformer_blocks_9_attn2_to_k",
                 "lora_te2_text_model_encoder_layers_31_mlp_fc2"} if arch == "sdxl" else
                {"lora_unet_up_blocks_3_attentions_2_proj_out", "lora_te_text_model_encoder_layers_11_mlp_fc2"})
    assert expected <= names  # real-size depths (10 transformer blocks, 32 / 12 encoder layers)


def test_docs_worked_example(tmp_path, monkeypatch):
    from tests.lora_tool_fixtures import doc_commands

    models = tiny_models("sd1")
    write_checkpoint(models, tmp_path / "model.safetensors")
    char = write_network(random_network(models, dim=4, alpha=2.0, conv_dim=2, seed=21), tmp_path / "char.safetensors")
    style = write_network(random_network(models, dim=4, alpha=4.0, conv_dim=2, seed=22), tmp_path / "style.safetensors")
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands("merge_lora.md", "merge_lora.py"):
        merge_lora.main(argv)
    merged = load_models(tmp_path / "merged.safetensors", **load_kwargs("sd1"))
    _assert_close(outputs(merged), outputs_with_loras("sd1", [(char, 0.8), (style, 0.5)]))
    d_char, d_style = deltas(load_state_dict(char)), deltas(load_state_dict(style))
    d_concat = deltas(load_state_dict(tmp_path / "char_minus_style.safetensors"))
    assert set(d_concat) == set(d_char)
    for name in d_char:
        assert torch.allclose(d_concat[name], d_char[name] - d_style[name], atol=1e-5)
    assert (tmp_path / "half_half.safetensors").exists()


def test_sdxl_docs_worked_example(tmp_path, monkeypatch):
    from tests.lora_tool_fixtures import doc_commands

    models = tiny_models("sdxl")
    write_checkpoint(models, tmp_path / "sdxl_model.safetensors")
    char = write_network(random_network(models, dim=2, seed=23), tmp_path / "sdxl_char.safetensors")
    monkeypatch.chdir(tmp_path)
    for argv in doc_commands("sdxl_merge_lora.md", "sdxl_merge_lora.py"):
        sdxl_merge_lora.main(argv)
    merged = load_models(tmp_path / "sdxl_merged.safetensors", **load_kwargs("sdxl"))
    _assert_close(outputs(merged), outputs_with_loras("sdxl", [(char, 0.8)]), atol=2e-2)


def _peak_rss_mib(script: str, argv: list[str]) -> float:
    """Run a tool in a fresh process; its own peak RSS (VmHWM, which restarts at exec) in MiB."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import runpy, sys\n"
            f"sys.argv = {[script, *argv]!r}\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "finally:\n"
            "    print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])\n")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def test_merge_into_model_streams_one_tensor_at_a_time(tmp_path):
    """A checkpoint with 256 MiB more tensors costs the merge about one of them (64 MiB), not all."""
    files = _lora_files(tmp_path, "sd1", n=1)
    sd = load_state_dict(tiny_model_path("sd1"))
    small = tmp_path / "small.safetensors"
    from safetensors.torch import save_file

    save_file(sd, str(small))
    big = tmp_path / "big.safetensors"
    save_file({**sd, **{f"model.extra_{i}": torch.full((16, 1024, 1024), float(i)) for i in range(4)}}, str(big))
    del sd
    peaks = [_peak_rss_mib("networks/merge_lora.py", ["--sd_model", str(src), "--models", files[0],
                                                       "--save_to", str(tmp_path / f"out_{src.stem}.safetensors")])
             for src in (small, big)]
    assert peaks[1] - peaks[0] < 100, peaks  # all four extra tensors together would be 256 MiB
    with TensorFile(tmp_path / "out_big.safetensors") as f:
        assert float(f.get("model.extra_3")[0, 0, 0]) == 3.0
