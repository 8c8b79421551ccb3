"""Prompt options, prompt files, schedulers, the denoising loop and the trainer's sample_images (tiny models, CPU)."""
from __future__ import annotations

import json
import logging
import random
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from library import sampling as S
from tests.conftest import tiny_models

SD_LINE = ("masterpiece, best quality, 1girl --n low quality, worst quality --w 768 --h 640 --d 1 --l 7.5 --s 28")


def _job(prompt="a cat", **kw):
    spec = S.parse_prompt_line(prompt)
    defaults = S.JobDefaults(width=64, height=64, steps=2, sampler=kw.pop("sampler", "euler"))
    return S.make_job(spec, defaults, seed=kw.pop("seed", 1))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.float32) for im in images])


def test_parse_prompt_line_all_options():
    spec = S.parse_prompt_line(SD_LINE + " --nl 3 --am 0.5,1 --ss k_euler_a --ow 1024 --oh 896 --ct 8 --cl 16")
    assert spec.prompt == "masterpiece, best quality, 1girl"
    assert spec.negative_prompt == "low quality, worst quality"
    assert (spec.width, spec.height, spec.seed, spec.scale, spec.steps) == (768, 640, 1, 7.5, 28)
    assert spec.negative_scale == 3.0 and spec.network_muls == [0.5, 1.0] and spec.sampler == "euler_a"
    assert (spec.original_width, spec.original_height, spec.crop_top, spec.crop_left) == (1024, 896, 8, 16)
    assert S.parse_prompt_line("x --s 5000").steps == 1000  # clamped like sd-scripts
    assert S.parse_prompt_line("x --d 3,4,5").seeds == [3, 4, 5]


def test_parse_prompt_line_unknown_option_warns_and_bad_value_errors(caplog):
    with caplog.at_level(logging.WARNING):
        spec = S.parse_prompt_line("a dog --zz 3 --w 256")
    assert spec.width == 256 and "--zz" in caplog.text
    with pytest.raises(ValueError, match=r"--w: bad value 'wide'"):
        S.parse_prompt_line("a dog --w wide")
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        S.parse_prompt_line("a dog --ss nope")


def test_read_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# prompt 1\n" + SD_LINE + "\n\n   \n# prompt 2\na dog --d 2 --s 3\n", encoding="utf-8")
    specs = S.read_prompt_file(txt)
    assert [s.prompt for s in specs] == ["masterpiece, best quality, 1girl", "a dog"]
    assert [s.index for s in specs] == [0, 1] and specs[1].seed == 2 and specs[1].steps == 3

    toml_file = tmp_path / "p.toml"
    toml_file.write_text('[prompt]\nwidth = 96\nsample_steps = 4\nnegative_prompt = "bad"\n'
                         '[[prompt.subset]]\nprompt = "one"\nseed = 7\n'
                         '[[prompt.subset]]\nprompt = "two"\nwidth = 128\n', encoding="utf-8")
    one, two = S.read_prompt_file(toml_file)
    assert (one.prompt, one.width, one.steps, one.seed, one.negative_prompt) == ("one", 96, 4, 7, "bad")
    assert (two.prompt, two.width, two.index) == ("two", 128, 1)

    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a cat --w 72", {"prompt": "b", "scale": 3, "sample_sampler": "k_lms"}]))
    a, b = S.read_prompt_file(js)
    assert a.width == 72 and (b.prompt, b.scale, b.sampler, b.index) == ("b", 3.0, "lms", 1)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"prompt": "x", "widht": 3}]))
    with pytest.raises(ValueError, match=r"bad.json, entry 0: unknown key 'widht'"):
        S.read_prompt_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        S.read_prompt_file(tmp_path / "missing.txt")


def test_make_scheduler_classes_and_prediction_type():
    expected = {"ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "lms": "LMSDiscreteScheduler",
                "k_lms": "LMSDiscreteScheduler", "euler": "EulerDiscreteScheduler",
                "k_euler_a": "EulerAncestralDiscreteScheduler", "heun": "HeunDiscreteScheduler",
                "k_dpm_2": "KDPM2DiscreteScheduler", "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
                "dpmsolver": "DPMSolverMultistepScheduler", "dpmsolver++": "DPMSolverMultistepScheduler",
                "dpmsingle": "DPMSolverSinglestepScheduler"}
    for name, cls in expected.items():
        sched = S.make_scheduler(name, {"beta_end": 0.02}, v_parameterization=True)
        assert type(sched).__name__ == cls
        assert sched.config.prediction_type == "v_prediction" and sched.config.beta_end == 0.02
    assert S.make_scheduler("dpmsolver").config.algorithm_type == "dpmsolver"
    assert S.make_scheduler("dpmsolver++").config.algorithm_type == "dpmsolver++"
    assert S.make_scheduler("ddim").config.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="valid: ddim, pndm"):
        S.make_scheduler("plms")


@pytest.mark.parametrize("arch,sampler", [("sd1", "euler_a"), ("sd2-v", "ddim"), ("sdxl", "dpmsolver++")])
def test_loop_matches_diffusers_pipeline(arch, sampler):
    comps = tiny_models(arch)
    job = S.make_job(S.PromptSpec("a cat", negative_prompt="dog", seeds=[5]),
                     S.JobDefaults(width=64, height=64, steps=3, sampler=sampler))
    ours = S.denoise_batch(comps, [job], "cpu")
    pipe = S.build_pipeline(comps, sampler)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(5)
    noise = S.initial_noise(job, gen)[None]
    cond, pooled = S.encode_prompts(comps, ["a cat"], torch.device("cpu"))
    uncond, upooled = S.encode_prompts(comps, ["dog"], torch.device("cpu"))
    kwargs = dict(prompt_embeds=cond, negative_prompt_embeds=uncond, height=64, width=64, num_inference_steps=3,
                  guidance_scale=7.5, latents=noise, output_type="latent", generator=gen)
    if comps.is_sdxl:
        kwargs.update(pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=upooled)
    ref = pipe(**kwargs).images
    assert torch.allclose(ours, ref, atol=1e-4 * ref.abs().max().item() + 1e-5)


def test_every_sampler_runs_and_seed_decides():
    comps = tiny_models("sd1")
    results = {}
    for name in S.SAMPLERS:
        job = _job("a red cat --n blurry", sampler=name)
        (_, image), = S.generate(comps, [job], "cpu")
        arr = np.asarray(image)
        assert arr.shape == (64, 64, 3) and arr.std() > 0
        results[name] = arr
        init = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(1))
        img2img = replace(_job("a red cat --n blurry", sampler=name), steps=4, init_image=init, strength=0.6)
        (_, latents), = S.generate(comps, [img2img], "cpu", decode=False)
        assert torch.isfinite(latents).all() and not torch.equal(latents, init), name
    assert np.array_equal(results["euler_a"], results["k_euler_a"])  # aliases
    assert not np.array_equal(results["euler"], results["euler_a"])


def test_same_seed_same_image_regardless_of_batch():
    comps = tiny_models("sd1")
    a, b = _job("a cat", seed=11), _job("a dog", seed=12)
    alone = _pixels(im for _, im in S.generate(comps, [a], "cpu"))
    again = _pixels(im for _, im in S.generate(comps, [a], "cpu"))
    batched = _pixels(im for _, im in S.generate(comps, [b, a], "cpu", batch_size=2))
    assert np.array_equal(alone, again)
    assert np.abs(batched[1] - alone[0]).max() <= 1  # same image inside a batch (float reordering at most)
    other = _pixels(im for _, im in S.generate(comps, [_job("a cat", seed=13)], "cpu"))
    assert np.abs(other - alone).mean() > 1


def test_negative_scale_and_sdxl_size_conditioning_change_the_image():
    comps = tiny_models("sdxl")
    base = _job("a cat --n dog")
    img = _pixels(im for _, im in S.generate(comps, [base], "cpu"))
    for line in ("a cat --n dog --nl 4", "a cat --n dog --ow 2048 --oh 256", "a cat --n dog --ct 512"):
        other = _pixels(im for _, im in S.generate(comps, [_job(line)], "cpu"))
        assert np.abs(other - img).mean() > 0.5, line


def test_batches_split_on_different_settings():
    jobs = [_job("a"), _job("b"), _job("c --w 128"), _job("d"), _job("e"), _job("f")]
    assert [len(b) for b in S.batches(jobs, 2)] == [2, 1, 2, 1]


def test_sample_images_names_files_and_leaves_rng_untouched(tmp_path):
    comps = tiny_models("sd1")
    comps.unet.train()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# c\na cat --w 64 --h 64 --s 2 --d 42\n\na dog --w 64 --h 72 --s 2\n", encoding="utf-8")

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    paths = S.sample_images(comps, prompts, tmp_path / "out", step=120, epoch=None, sampler="k_euler_a",
                            output_name="mylora")
    after = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after[0], expected[0]) and after[1:] == expected[1:]
    assert comps.unet.training and all(m.training for m in comps.unet.modules())
    assert not comps.vae.training

    assert len(paths) == 2
    assert re.fullmatch(r"mylora_000120_00_\d{14}_42\.png", paths[0].split("/")[-1])
    assert re.fullmatch(r"mylora_000120_01_\d{14}_\d+\.png", paths[1].split("/")[-1])
    assert all(p.startswith(str(tmp_path / "out" / "sample")) for p in paths)

    from PIL import Image

    with Image.open(paths[0]) as im:
        assert im.size == (64, 64)
        assert im.text["prompt"] == "a cat" and im.text["seed"] == "42" and im.text["sampler"] == "euler_a"
        assert not {k for k in im.text if k.startswith(("original-", "crop-"))}  # SDXL-only keys
        first = np.asarray(im)
    with Image.open(paths[1]) as im:
        assert im.size == (64, 72)
    again = S.sample_images(comps, prompts, tmp_path / "out", step=0, epoch=3, sampler="euler_a")
    assert re.fullmatch(r"e000003_00_\d{14}_42\.png", again[0].split("/")[-1])
    with Image.open(again[0]) as im:
        assert np.array_equal(np.asarray(im), first)


def test_weighted_and_long_prompts_reach_the_encoder():
    comps = tiny_models("sd1")
    dev = torch.device("cpu")
    plain, _ = S.encode_prompts(comps, ["a red cat"], dev)
    weighted, _ = S.encode_prompts(comps, ["a (red:1.5) cat"], dev)
    assert plain.shape == weighted.shape == (1, 77, 32)
    assert not torch.allclose(plain, weighted)
    long_a = "a cat, " * 15 + "red"  # 108 characters: one token each with the tiny tokenizer
    long_b = "a cat, " * 15 + "blue"
    one_a, _ = S.encode_prompts(comps, [long_a], dev, max_embeddings_multiples=1)
    one_b, _ = S.encode_prompts(comps, [long_b], dev, max_embeddings_multiples=1)
    three_a, _ = S.encode_prompts(comps, [long_a], dev, max_embeddings_multiples=3)
    three_b, _ = S.encode_prompts(comps, [long_b], dev, max_embeddings_multiples=3)
    assert torch.equal(one_a, one_b)  # cut at 75 tokens: the differing end is lost
    assert three_a.shape[1] == 2 + 3 * 75 and not torch.allclose(three_a, three_b)


def test_sample_images_with_training_network(tmp_path, caplog):
    from networks.lora import create_network

    comps = tiny_models("sd1")
    net = create_network(0.7, 4, 4, comps.vae, comps.text_encoder, comps.unet, neuron_dropout=0.5,
                         module_dropout=0.5)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_up" in name:
                p.normal_(0, 0.5)
    net.apply_to(comps.text_encoder, comps.unet)
    net.train()
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --w 64 --h 64 --s 2 --d 3\na cat --w 64 --h 64 --s 2 --d 3 --am 0\n")
    first = S.sample_images(comps, prompts, tmp_path, 1, networks=[net])
    second = S.sample_images(comps, prompts, tmp_path, 2, networks=[net])
    assert net.multiplier == 0.7 and net.training  # restored
    assert all(lora.multiplier == 0.7 for lora in net.unet_loras)
    with_net, off = _pixels(Image.open(p) for p in first)
    assert np.array_equal(with_net, _pixels([Image.open(second[0])])[0])  # no dropout while sampling
    net.set_multiplier(0.0)
    (plain,) = S.sample_images(comps, [S.parse_prompt_line("a cat --w 64 --h 64 --s 2 --d 3")], tmp_path, 3)
    assert np.array_equal(off, _pixels([Image.open(plain)])[0])
    assert np.abs(with_net - off).mean() > 1

    with caplog.at_level(logging.ERROR):
        assert S.sample_images(comps, tmp_path / "missing.txt", tmp_path, 4) == []
    assert "no sample images at step 4" in caplog.text and "missing.txt" in caplog.text


def test_dynamic_prompt_variants():
    rng = random.Random(0)
    picks = S.expand_dynamic_prompt("a {cat|dog|fox} --w 64", 20, rng)
    assert len(picks) == 20 and set(picks) == {"a cat --w 64", "a dog --w 64", "a fox --w 64"}
    assert S.expand_dynamic_prompt("a {e$$cat|dog} in {e$$red|blue}", 1, rng) == [
        "a cat in red", "a cat in blue", "a dog in red", "a dog in blue"]
    assert S.expand_dynamic_prompt("{e$$1-2$$ and $$x|y}", 1, rng) == ["x", "y", "x and y"]
    two = S.expand_dynamic_prompt("{2$$x|y|z}", 5, rng)
    assert all(len(p.split(", ")) == 2 and len(set(p.split(", "))) == 2 for p in two)
    assert S.expand_dynamic_prompt("no braces --d 1", 3, rng) == ["no braces --d 1"]
