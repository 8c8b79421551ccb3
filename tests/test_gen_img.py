"""gen_img_diffusers.py / sdxl_gen_img.py: seeds, networks (applied, merged, per-prompt), prompt files, PNG info."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from library import gen_img
from tests.conftest import tiny_models

BASE = ["--W", "64", "--H", "64", "--steps", "2", "--sampler", "euler_a", "--device", "cpu"]


def _run(tmp_path, extra, arch="sd1", comps=None, outdir="out", sized=True):
    sdxl = arch == "sdxl"
    base = BASE if sized else BASE[4:]  # without --W/--H
    argv = ["--ckpt", str(tmp_path), "--outdir", str(tmp_path / outdir), *base, *extra]
    args = gen_img.build_parser(sdxl).parse_args(argv)
    return gen_img.run(args, sdxl, components=comps if comps is not None else tiny_models(arch))


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im, dtype=np.float32)


def _lora_file(path, arch="sd1", seed=0):
    """A LoRA file with non-zero up weights (a fresh LoRA is a no-op) for the tiny model of `arch`."""
    from networks.lora import create_network

    comps = tiny_models(arch)
    net = create_network(1.0, 4, 4, comps.vae, comps.text_encoder, comps.unet)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    net.save_weights(str(path))
    return str(path)


def test_same_seed_same_image_metadata_and_no_overwrite(tmp_path):
    first = _run(tmp_path, ["--prompt", "a (red:1.3) cat --n dog", "--seed", "3", "--sequential_file_name"])
    second = _run(tmp_path, ["--prompt", "a (red:1.3) cat --n dog", "--seed", "3", "--sequential_file_name"])
    assert [p.rsplit("/", 1)[-1] for p in first + second] == ["im_000001.png", "im_000001_1.png"]
    assert np.array_equal(_pixels(first[0]), _pixels(second[0]))
    other = _run(tmp_path, ["--prompt", "a (red:1.3) cat --n dog", "--seed", "4"])
    assert np.abs(_pixels(other[0]) - _pixels(first[0])).mean() > 1
    with Image.open(first[0]) as im:
        text = dict(im.text)
    assert text["prompt"] == "a (red:1.3) cat" and text["negative-prompt"] == "dog"
    assert (text["seed"], text["steps"], text["scale"], text["sampler"]) == ("3", "2", "7.5", "euler_a")
    assert (text["width"], text["height"]) == ("64", "64")
    assert "Seed: 3" in text["parameters"] and "Negative prompt: dog" in text["parameters"]


def test_seed_of_seeds_and_images_per_prompt(tmp_path):
    paths = _run(tmp_path, ["--prompt", "a cat", "--seed", "7", "--images_per_prompt", "3", "--batch_size", "2"])
    seeds = [Image.open(p).text["seed"] for p in paths]
    assert len(paths) == 3 and len(set(seeds)) == 3 and "7" not in seeds
    again = _run(tmp_path, ["--prompt", "a cat", "--seed", "7", "--images_per_prompt", "3"], outdir="again")
    assert [Image.open(p).text["seed"] for p in again] == seeds
    for a, b in zip(paths, again):  # batch size 2 vs 1: same images
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_networks_mul_zero_applied_and_merged(tmp_path):
    lora = _lora_file(tmp_path / "a.safetensors")
    prompt = ["--prompt", "a cat --n dog", "--seed", "5"]
    none = _pixels(_run(tmp_path, prompt, outdir="none")[0])
    zero = _pixels(_run(tmp_path, prompt + ["--network_module", "networks.lora", "--network_weights", lora,
                                            "--network_mul", "0"], outdir="zero")[0])
    applied_path = _run(tmp_path, prompt + ["--network_module", "networks.lora", "--network_weights", lora,
                                            "--network_mul", "0.8"], outdir="applied")[0]
    merged = _pixels(_run(tmp_path, prompt + ["--network_module", "networks.lora", "--network_weights", lora,
                                              "--network_mul", "0.8", "--network_merge"], outdir="merged")[0])
    applied = _pixels(applied_path)
    assert np.array_equal(zero, none)
    assert np.abs(applied - none).mean() > 1  # the network does something
    assert np.abs(applied - merged).mean() < 1.0 and np.abs(applied - merged).max() <= 8
    nets = json.loads(Image.open(applied_path).text["networks"])
    assert nets == [{"file": "a.safetensors", "multiplier": 0.8, "merged": False}]


def test_two_networks_own_multipliers_and_per_prompt_am(tmp_path):
    a, b = _lora_file(tmp_path / "a.safetensors", seed=1), _lora_file(tmp_path / "b.safetensors", seed=2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two networks, per-prompt multipliers\n"
                       "a cat --d 9 --am 1,0\n\n"
                       "a cat --d 9 --am 0\n", encoding="utf-8")
    both = ["--network_module", "networks.lora", "--network_weights", a, b, "--network_mul", "1", "1"]
    per_prompt = _run(tmp_path, ["--from_file", str(prompts), *both], outdir="pp")
    only_a = _run(tmp_path, ["--prompt", "a cat --d 9", "--network_module", "networks.lora",
                             "--network_weights", a], outdir="a")
    plain = _run(tmp_path, ["--prompt", "a cat --d 9"], outdir="plain")
    both_on = _run(tmp_path, ["--prompt", "a cat --d 9", *both], outdir="both")
    assert len(per_prompt) == 2  # the comment and the blank line are no prompts
    assert np.abs(_pixels(per_prompt[0]) - _pixels(only_a[0])).max() <= 1
    assert np.array_equal(_pixels(per_prompt[1]), _pixels(plain[0]))  # --am 0 repeats for the second network
    assert np.abs(_pixels(both_on[0]) - _pixels(only_a[0])).mean() > 1
    assert [n["multiplier"] for n in json.loads(Image.open(per_prompt[0]).text["networks"])] == [1.0, 0.0]


def test_per_prompt_options_override(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a dog --w 96 --h 64 --s 3 --d 11 --l 4.5 --n cat --ss k_lms\n", encoding="utf-8")
    (path,) = _run(tmp_path, ["--from_file", str(prompts), "--scale", "9"])
    with Image.open(path) as im:
        assert im.size == (96, 64)
        t = im.text
    assert (t["seed"], t["steps"], t["scale"], t["negative-prompt"], t["sampler"]) == ("11", "3", "4.5", "cat", "lms")
    assert path.rsplit("/", 1)[-1].endswith("_11.png")


def test_sdxl_size_conditioning_and_defaults(tmp_path):
    assert gen_img.job_defaults(gen_img.build_parser(True).parse_args(["--ckpt", "x"]), True, []).width == 1024
    assert gen_img.job_defaults(gen_img.build_parser(False).parse_args(["--ckpt", "x"]), False, []).height == 512
    lora = _lora_file(tmp_path / "xl.safetensors", arch="sdxl")
    common = ["--prompt", "a cat --n dog", "--seed", "2", "--network_weights", lora]
    plain = _run(tmp_path, common, arch="sdxl", outdir="p")
    cond = _run(tmp_path, common + ["--original_width", "2048", "--original_height", "512", "--crop_top", "32"],
                arch="sdxl", outdir="c")
    prompt_cond = _run(tmp_path, ["--prompt", "a cat --n dog --ow 2048 --oh 512 --ct 32", "--seed", "2",
                                  "--network_weights", lora], arch="sdxl", outdir="pc")
    with Image.open(cond[0]) as im:
        t = im.text
    assert (t["original-width"], t["original-height"], t["crop-top"], t["crop-left"]) == ("2048", "512", "32", "0")
    assert np.abs(_pixels(cond[0]) - _pixels(plain[0])).mean() > 0.5
    assert np.array_equal(_pixels(cond[0]), _pixels(prompt_cond[0]))


def test_interactive_reads_stdin(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("a cat --d 1\n\na dog --d 2 --w 72\n"))
    paths = _run(tmp_path, ["--interactive"])
    assert [Image.open(p).text["prompt"] for p in paths] == ["a cat", "a dog"]
    assert Image.open(paths[1]).size == (72, 64)


@pytest.mark.parametrize("extra,message", [
    (["--mask_path", "m.png"], "--mask_path (inpainting / CLIP Vision) is not supported"),
    (["--image_path", "nothing.png"], "--image_path nothing.png: no such file or folder"),
    (["--strength", "1.5"], "--strength 1.5: expected a value from 0 to 1"),
    (["--fp16", "--bf16"], "--fp16 and --bf16 are exclusive"),
    (["--network_weights", "missing.safetensors"], "--network_weights missing.safetensors: no such file"),
    (["--network_module", "networks.lora", "networks.lora", "--network_weights", "{lora}"],
     "--network_module: give one module for all networks or one per --network_weights"),
    (["--max_embeddings_multiples", "5"], "--max_embeddings_multiples 5: expected 1, 2 or 3"),
    (["--xformers"], "--xformers"),
    (["--device", "gpu0"], "--device gpu0: not a torch device"),
    (["--network_module", "networks.nothere", "--network_weights", "{lora}"],
     "--network_module networks.nothere: no such Python module"),
])
def test_errors_before_loading(tmp_path, capsys, extra, message):
    if extra == ["--xformers"] and torch.cuda.is_available():
        pytest.skip("xformers may be usable on a CUDA machine; this case checks the CPU refusal")
    lora = _lora_file(tmp_path / "l.safetensors") if "{lora}" in extra else ""
    argv = ["--ckpt", str(tmp_path), "--prompt", "x", *[e.replace("{lora}", lora) for e in extra]]
    with pytest.raises(SystemExit) as exc:
        gen_img.main(argv)
    assert message in str(exc.value)
    with pytest.raises(SystemExit, match="--ckpt nowhere/at/all: no such file"):
        gen_img.main(["--ckpt", "nowhere/at/all", "--prompt", "x"])


def test_scripts_end_to_end_on_saved_models(tmp_path):
    """The worked examples of docs/gen_img_diffusers.md and docs/sdxl_gen_img.md on tiny saved models."""
    import os
    import subprocess
    import sys

    from library.model_loading import save_models

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    save_models(tiny_models("sd1"), tmp_path / "model")
    lora = _lora_file(tmp_path / "my_lora.safetensors")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\nmasterpiece, 1girl, (red hair:1.2) --n lowres --d 1\n"
                       "a house --w 96 --am 0.3\n", encoding="utf-8")
    cmd = [sys.executable, "gen_img_diffusers.py", "--ckpt", str(tmp_path / "model"), "--outdir",
           str(tmp_path / "out"), "--from_file", str(prompts), "--images_per_prompt", "2", "--batch_size", "2",
           "--W", "64", "--H", "64", "--steps", "4", "--sampler", "k_euler_a", "--seed", "42", "--network_module",
           "networks.lora", "--network_weights", lora, "--network_mul", "0.8"]
    env = dict(os.environ, PYTHONPATH=repo, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = sorted((tmp_path / "out").glob("*.png"))
    assert len(out) == 4
    infos = [dict(Image.open(p).text) for p in out]
    assert sorted(i["seed"] for i in infos if i["prompt"].startswith("masterpiece")) == ["1", "1"]
    house = [i for i in infos if i["prompt"] == "a house"]
    assert len(house) == 2 and all(json.loads(i["networks"])[0]["multiplier"] == 0.3 for i in house)
    assert {Image.open(p).size for p in out} == {(64, 64), (96, 64)}

    save_models(tiny_models("sdxl"), tmp_path / "xl")
    gen_img.main(["--ckpt", str(tmp_path / "xl"), "--outdir", str(tmp_path / "xl_out"), "--prompt",
                  "a cat --n dog --ow 2048 --oh 2048", "--W", "64", "--H", "64", "--steps", "3", "--seed", "5",
                  "--sampler", "dpmsolver++", "--device", "cpu"], sdxl=True)
    (xl,) = (tmp_path / "xl_out").glob("*.png")
    assert Image.open(xl).text["original-width"] == "2048"
    with pytest.raises(SystemExit, match="SDXL"):  # the SD script refuses an SDXL model
        gen_img.main(["--ckpt", str(tmp_path / "xl"), "--outdir", str(tmp_path / "x2"), "--prompt", "x",
                      "--W", "64", "--H", "64", "--steps", "1", "--device", "cpu"])


def test_dynamic_prompts(tmp_path):
    paths = _run(tmp_path, ["--prompt", "a {e$$cat|dog} --d 3 --n {ugly|bad}", "--images_per_prompt", "5"])
    infos = [dict(Image.open(p).text) for p in paths]
    assert [i["prompt"] for i in infos] == ["a cat", "a dog"]  # enumeration: one image per variant
    assert all(i["seed"] == "3" and i["negative-prompt"] in ("ugly", "bad") for i in infos)
    picked = _run(tmp_path, ["--prompt", "a {red|blue} cat", "--images_per_prompt", "6", "--seed", "1"],
                  outdir="picked")
    again = _run(tmp_path, ["--prompt", "a {red|blue} cat", "--images_per_prompt", "6", "--seed", "1"],
                 outdir="again")
    prompts = [Image.open(p).text["prompt"] for p in picked]
    assert len(prompts) == 6 and set(prompts) <= {"a red cat", "a blue cat"}
    assert prompts == [Image.open(p).text["prompt"] for p in again]  # reproducible with --seed


def test_img2img_sizes_strength_and_names(tmp_path):
    from library import sampling as S

    src_dir = tmp_path / "src"
    src_dir.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 70, 3), dtype=np.uint8)).save(src_dir / "photo.png")
    comps = tiny_models("sd1")
    base = ["--prompt", "a cat --d 3", "--image_path", str(src_dir)]
    (kept,) = _run(tmp_path, base + ["--strength", "0", "--use_original_file_name"], comps=comps, outdir="s0",
                   sized=False)
    assert kept.endswith("/photo.png") and Image.open(kept).size == (64, 96)  # source size, multiple of 32
    with Image.open(src_dir / "photo.png") as im:
        latents = S.encode_init_images(comps.vae, [im], 64, 96)
    (roundtrip,) = S.decode_latents(comps.vae, latents)
    assert np.abs(_pixels(kept) - np.asarray(roundtrip, dtype=np.float32)).max() <= 1  # strength 0: no steps
    (half,) = _run(tmp_path, base + ["--strength", "0.5"], outdir="s5", sized=False)
    (per_prompt,) = _run(tmp_path, ["--prompt", "a cat --d 3 --t 0.5", "--image_path", str(src_dir),
                                    "--strength", "0.9"], outdir="t5", sized=False)
    (txt2img,) = _run(tmp_path, ["--prompt", "a cat --d 3 --w 64 --h 96"], outdir="t2i")
    assert Image.open(half).text["strength"] == "0.5" and "strength" not in Image.open(txt2img).text
    assert np.array_equal(_pixels(half), _pixels(per_prompt))
    assert np.abs(_pixels(half) - _pixels(kept)).mean() > 1 and np.abs(_pixels(half) - _pixels(txt2img)).mean() > 1


@pytest.mark.parametrize("latents", [False, True])
def test_highres_fix_two_passes(tmp_path, latents):
    extra = ["--highres_fix_latents_upscaling"] if latents else []
    paths = _run(tmp_path, ["--prompt", "a cat --d 4", "--W", "128", "--H", "96", "--highres_fix_scale", "0.5",
                            "--highres_fix_steps", "2", "--highres_fix_save_1st", "--sequential_file_name", *extra])
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["im_0000001.png", "im_1000002.png"]
    assert Image.open(paths[0]).size == (64, 32) and Image.open(paths[1]).size == (128, 96)
    second = dict(Image.open(paths[1]).text)
    assert second["seed"] == "4" and second["strength"] == "0.8"
    plain = _run(tmp_path, ["--prompt", "a cat --d 4", "--W", "128", "--H", "96"], outdir="plain")
    assert np.abs(_pixels(paths[1]) - _pixels(plain[0])).mean() > 1
