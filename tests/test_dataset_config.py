"""Dataset config: TOML inheritance, the legacy folder convention, and every configuration error."""
from __future__ import annotations

import argparse

import pytest

from library.dataset_config import add_dataset_arguments, load_dataset_config, parse_repeat_folder
from tests.data_helpers import make_images, parse, write_toml


@pytest.fixture
def imgs(tmp_path):
    make_images(tmp_path / "a", 2)
    make_images(tmp_path / "reg", 3)
    return tmp_path


def toml_config(tmp_path, text: str, *argv: str):
    path = write_toml(tmp_path / "ds.toml", text)
    return load_dataset_config(parse("--dataset_config", path, *argv)), str(path)


def test_guide_example_and_inheritance(imgs):
    cfg, path = toml_config(imgs, f"""
[general]
enable_bucket = true
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = [512, 768]
batch_size = 4
keep_tokens = 2

  [[datasets.subsets]]
  image_dir = '{imgs / "a"}'
  class_tokens = 'hoge girl'
  num_repeats = 10
  keep_tokens = 3

  [[datasets.subsets]]
  is_reg = true
  image_dir = '{imgs / "reg"}'
  class_tokens = 'girl'
""", "--caption_extension", ".txt", "--flip_aug", "--shuffle_caption")
    ds = cfg.datasets[0]
    assert cfg.source == path
    assert ds.resolution == (512, 768) and ds.batch_size == 4 and ds.enable_bucket
    a, reg = ds.subsets
    assert (a.num_repeats, a.class_tokens, a.is_reg, a.keep_tokens) == (10, "hoge girl", False, 3)  # subset wins
    assert (reg.num_repeats, reg.is_reg, reg.keep_tokens) == (1, True, 2)  # dataset over general
    assert a.shuffle_caption and a.caption_extension == ".txt" and a.flip_aug  # general / command line
    assert a.where.endswith("datasets[0].subsets[0]")


def test_command_line_below_general(imgs):
    cfg, _ = toml_config(imgs, f"""
[general]
batch_size = 3
[[datasets]]
  [[datasets.subsets]]
  image_dir = '{imgs / "a"}'
""", "--train_batch_size", "7", "--resolution", "256,320", "--dataset_repeats", "4")
    ds = cfg.datasets[0]
    assert ds.batch_size == 3 and ds.resolution == (256, 320) and ds.subsets[0].num_repeats == 4


@pytest.mark.parametrize("body,pattern", [
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nnum_repeat = 3",
     r"datasets\[0\]\.subsets\[0\]: unknown key 'num_repeat' \(did you mean 'num_repeats'\?\)"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nnum_repeats = 'ten'",
     r"datasets\[0\]\.subsets\[0\]\.num_repeats: expected an integer, got 'ten'"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nflip_aug = 1", r"subsets\[0\]\.flip_aug: expected true or false"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nresolution = 512",
     r"subsets\[0\]: unknown key 'resolution'.*dataset setting: put it in \[\[datasets\]\] or \[general\]"),
    ("[[datasets.subsets]]\nclass_tokens = 'x'", r"subsets\[0\]: missing key 'image_dir'"),
    ("[[datasets.subsets]]\nimage_dir = '{a}/nope'", r"subsets\[0\]: image_dir .*/nope: no such folder"),
    ("[[datasets.subsets]]\nimage_dir = '{empty}'", r"subsets\[0\]: image_dir .*: no images \(.png .jpg"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nnum_repeats = 0", r"num_repeats 0: must be at least 1"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\ncaption_dropout_rate = 1.5", r"caption_dropout_rate 1.5: must be between 0 and 1"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nconditioning_data_dir = '{a}'", r"conditioning_data_dir needs --masked_loss"),
    ("batch_size = 0\n[[datasets.subsets]]\nimage_dir = '{a}'", r"datasets\[0\]: batch_size 0: must be at least 1"),
    ("resolution = [512]\n[[datasets.subsets]]\nimage_dir = '{a}'", r"datasets\[0\]\.resolution: expected a positive size"),
    ("enable_bucket = true\nmax_bucket_reso = 256\n[[datasets.subsets]]\nimage_dir = '{a}'",
     r"max_bucket_reso 256 is smaller than the resolution 512x512"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\n[[datasets.subsets]]\nmetadata_file = '{meta}'",
     r"datasets\[0\]: mixes metadata_file subsets"),
    ("[[datasets.subsets]]\nimage_dir = '{a}'\nmetadata_file = '{a}/missing.json'", r"metadata_file .*missing.json: no such file"),
])
def test_config_errors_name_file_table_and_key(imgs, body, pattern):
    (imgs / "empty").mkdir()
    (imgs / "meta.json").write_text("{}")
    prefix = "[[datasets]]\n" + ("" if body.startswith("resolution") else "resolution = 512\n")
    text = prefix + body.format(a=imgs / "a", empty=imgs / "empty", meta=imgs / "meta.json")
    path = write_toml(imgs / "bad.toml", text)
    with pytest.raises((ValueError, FileNotFoundError), match=pattern) as e:
        load_dataset_config(parse("--dataset_config", path))
    assert str(path) in str(e.value)


def test_unknown_key_in_general_lists_valid_keys(imgs):
    path = write_toml(imgs / "g.toml", f"[general]\nshufle_caption = true\n[[datasets]]\nresolution = 512\n"
                                       f"[[datasets.subsets]]\nimage_dir = '{imgs / 'a'}'\n")
    with pytest.raises(ValueError, match=r"general: unknown key 'shufle_caption' \(did you mean 'shuffle_caption'\?\)"
                                         r".*Valid keys here: .*batch_size"):
        load_dataset_config(parse("--dataset_config", path))


def test_toml_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--dataset_config .*nope.toml: no such file"):
        load_dataset_config(parse("--dataset_config", tmp_path / "nope.toml"))
    bad = write_toml(tmp_path / "bad.toml", "[general\nx = 1")
    with pytest.raises(ValueError, match="bad.toml: not valid TOML"):
        load_dataset_config(parse("--dataset_config", bad))
    none = write_toml(tmp_path / "none.toml", "[general]\nshuffle_caption = true\n")
    with pytest.raises(ValueError, match=r"no \[\[datasets\]\] table"):
        load_dataset_config(parse("--dataset_config", none))
    top = write_toml(tmp_path / "top.toml", "dataset = 1\n")
    with pytest.raises(ValueError, match="unknown top-level key 'dataset' \\(did you mean 'datasets'\\?\\)"):
        load_dataset_config(parse("--dataset_config", top))


def test_missing_resolution(imgs):
    path = write_toml(imgs / "r.toml", f"[[datasets]]\n[[datasets.subsets]]\nimage_dir = '{imgs / 'a'}'\n")
    with pytest.raises(ValueError, match=r"datasets\[0\]: no resolution: set resolution .* or --resolution"):
        load_dataset_config(parse("--dataset_config", path))


def test_caching_conflicts_say_why(imgs):
    text = f"[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = '{imgs / 'a'}'\ncolor_aug = true\n"
    with pytest.raises(ValueError, match=r"subsets\[0\]: color_aug cannot be used with --cache_latents: a cached "
                                         r"latent is one fixed image and it changes the colors"):
        toml_config(imgs, text, "--cache_latents")
    with pytest.raises(ValueError, match="random_crop cannot be used with --cache_latents_to_disk"):
        toml_config(imgs, text.replace("color_aug", "random_crop"), "--cache_latents_to_disk")
    cfg, _ = toml_config(imgs, text.replace("color_aug", "flip_aug"), "--cache_latents")  # flip is fine
    assert cfg.datasets[0].subsets[0].flip_aug


def test_parse_repeat_folder():
    assert parse_repeat_folder("20_sls frog") == (20, "sls frog")
    assert parse_repeat_folder("1_frog") == (1, "frog")
    assert parse_repeat_folder("3_my_tag name") == (3, "my_tag name")
    assert parse_repeat_folder("10_") == (10, "")
    for bad in ("sls frog", "x_frog", "0_frog", "-1_frog", "20 sls frog"):
        with pytest.raises(ValueError):
            parse_repeat_folder(bad)


def test_legacy_folders(tmp_path):
    make_images(tmp_path / "train" / "20_sls frog", 2)
    make_images(tmp_path / "train" / "10_cpc rabbit", 1)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are ignored
    make_images(tmp_path / "reg" / "1_frog", 4)
    cfg = load_dataset_config(parse("--train_data_dir", tmp_path / "train", "--reg_data_dir", tmp_path / "reg",
                                    "--resolution", "512", "--caption_extention", ".txt", "--keep_tokens", "1"))
    assert cfg.source == "command line"
    subs = {(s.num_repeats, s.class_tokens, s.is_reg) for s in cfg.datasets[0].subsets}
    assert subs == {(20, "sls frog", False), (10, "cpc rabbit", False), (1, "frog", True)}
    assert all(s.caption_extension == ".txt" and s.keep_tokens == 1 for s in cfg.datasets[0].subsets)


def test_legacy_errors(tmp_path):
    make_images(tmp_path / "train" / "frog", 1)
    with pytest.raises(ValueError, match=r"--train_data_dir .*: folder name 'frog' does not start with "
                                         r"'<repeats>_' \(e.g. '20_sls frog'\)"):
        load_dataset_config(parse("--train_data_dir", tmp_path / "train", "--resolution", "512"))
    make_images(tmp_path / "flat", 2)
    with pytest.raises(ValueError, match=r"no '<repeats>_<name>' subfolders .*2 images lie directly inside it"):
        load_dataset_config(parse("--train_data_dir", tmp_path / "flat", "--resolution", "512"))
    with pytest.raises(FileNotFoundError, match="--train_data_dir .*missing: no such folder"):
        load_dataset_config(parse("--train_data_dir", tmp_path / "missing", "--resolution", "512"))
    (tmp_path / "t2" / "5_x").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"--train_data_dir .*5_x: image_dir .*: no images"):
        load_dataset_config(parse("--train_data_dir", tmp_path / "t2", "--resolution", "512"))
    with pytest.raises(ValueError, match="no training data: give --dataset_config"):
        load_dataset_config(parse("--resolution", "512"))
    with pytest.raises(ValueError, match="--resolution 'big': expected a size"):
        load_dataset_config(parse("--train_data_dir", tmp_path / "flat", "--resolution", "big"))


def test_in_json_fine_tuning(tmp_path):
    make_images(tmp_path / "imgs", 1)
    meta = tmp_path / "meta.json"
    meta.write_text('{"img0": {"caption": "a frog"}}')
    cfg = load_dataset_config(parse("--in_json", meta, "--train_data_dir", tmp_path / "imgs", "--resolution", "512",
                                    "--dataset_repeats", "3"))
    sub = cfg.datasets[0].subsets[0]
    assert sub.is_finetuning and sub.num_repeats == 3 and sub.metadata_file == str(meta)


def test_add_dataset_arguments_skips_existing_options():
    parser = argparse.ArgumentParser()
    parser.add_argument("--train_batch_size", type=int, default=5)
    add_dataset_arguments(parser)
    args = parser.parse_args(["--resolution", "512,768", "--flip_aug"])
    assert args.train_batch_size == 5 and args.resolution == "512,768" and args.flip_aug
    assert args.caption_extension == ".caption" and args.max_token_length is None and args.bucket_reso_steps == 64


def test_docs_worked_example(tmp_path, monkeypatch):
    """docs/dataset_config.md's worked example: the TOML block builds the dataset with the stated steps."""
    from pathlib import Path

    from library.dataset_debug import debug_dataset
    from library.datasets import build_dataset_group
    from library.sd_configs import make_clip_tokenizer

    doc = (Path(__file__).resolve().parents[1] / "docs" / "dataset_config.md").read_text(encoding="utf-8")
    section = doc.split("## Worked example", 1)[1]
    toml_text = section.split("```toml\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "data" / "frog", 3, size=(512, 512), captions={0: "sls frog, green, on a leaf"},
                caption_ext=".txt")
    make_images(tmp_path / "data" / "reg", 5, size=(512, 512), seed=1)
    write_toml(tmp_path / "frog.toml", toml_text)
    args = parse("--dataset_config", "frog.toml", "--debug_dataset", "--debug_dataset_dir", "shown")
    group = build_dataset_group(args, [make_clip_tokenizer("clip")])
    assert (group.num_train_images, group.num_reg_images, len(group)) == (30, 30, 30)
    assert [i.num_repeats for i in group.images if i.is_reg] == [6] * 5
    lines: list[str] = []
    assert debug_dataset(group, args, max_steps=3, out=lines.append) == 3
    text = "\n".join(lines)
    assert "step 1/30  bucket 512x512  batch 2" in text and "batches (steps) per epoch: 30" in text
    assert "tokens:" in text
    assert len(list((tmp_path / "shown").glob("*.png"))) == 6
    captions = [line for line in lines if "caption: 'sls frog, " in line]
    assert all(line.split("'")[1].startswith("sls frog, ") for line in captions)


def test_repeat_prefix_of_a_toml_image_dir_is_ignored_with_a_warning(tmp_path, caplog, monkeypatch):
    caplog.set_level("INFO", logger="library.dataset_config")
    make_images(tmp_path / "10_sks cat", 2)
    cfg, _ = toml_config(tmp_path, """
[[datasets]]
resolution = 64
  [[datasets.subsets]]
  image_dir = '10_sks cat'
""")
    assert cfg.datasets[0].subsets[0].num_repeats == 1
    assert "image_dir '10_sks cat': the '10_' prefix sets no repeats in a dataset config; num_repeats does " \
           "(1 here)" in caplog.text
    # found beside the TOML only: nothing to say about where; found in both places: the log says which
    assert "working folder" not in caplog.text
    caplog.clear()
    toml_config(tmp_path, "[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = '10_sks cat'\n"
                          "  num_repeats = 10\n")
    assert "prefix" not in caplog.text  # prefix and num_repeats agree: nothing to say
    monkeypatch.chdir(tmp_path.parent)
    make_images(tmp_path.parent / "10_sks cat", 1)
    load_dataset_config(parse("--dataset_config", str(tmp_path / "ds.toml")))
    assert "10_sks cat: using" in caplog.text and "(the working folder), not" in caplog.text
