"""Caption processing with fixed seeds and the A1111 weighted-prompt parser."""
from __future__ import annotations

import random

import pytest

from library.captions import CaptionOptions, expand_wildcards, parse_weighted_prompt, process_caption

CAP = "sls frog, green, pond, lily pad, sunny, water"


def run(opts: CaptionOptions, seed: int = 0, caption: str = CAP, **kw) -> str:
    return process_caption(caption, opts, random.Random(seed), **kw)


def test_no_options_is_identity():
    assert run(CaptionOptions()) == CAP


def test_shuffle_keeps_first_tokens_and_all_tags():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens=1)
    outs = {run(opts, seed) for seed in range(20)}
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[0] == "sls frog" and sorted(tags) == sorted(CAP.split(", "))
    assert run(opts, 3) == run(opts, 3)  # same seed, same caption


def test_keep_tokens_separator_fixes_head_and_tail():
    opts = CaptionOptions(shuffle_caption=True, keep_tokens_separator="|||")
    cap = "sls frog, green ||| a, b, c, d, e ||| masterpiece, best"
    for seed in range(10):
        tags = run(opts, seed, cap).split(", ")
        assert tags[:2] == ["sls frog", "green"] and tags[-2:] == ["masterpiece", "best"]
        assert sorted(tags[2:-2]) == ["a", "b", "c", "d", "e"]


def test_caption_dropout_and_every_n_epochs():
    assert run(CaptionOptions(caption_dropout_rate=1.0)) == ""
    opts = CaptionOptions(caption_dropout_every_n_epochs=2)
    assert run(opts, epoch=1) == CAP and run(opts, epoch=2) == "" and run(opts, epoch=3) == CAP
    # rate 0.5 over many draws: roughly half dropped
    rng = random.Random(1)
    dropped = sum(process_caption(CAP, CaptionOptions(caption_dropout_rate=0.5), rng) == "" for _ in range(400))
    assert 150 < dropped < 250


def test_tag_dropout_never_drops_kept_tokens():
    assert run(CaptionOptions(caption_tag_dropout_rate=1.0, keep_tokens=2)) == "sls frog, green"
    rng = random.Random(0)
    lengths = [len(process_caption(CAP, CaptionOptions(caption_tag_dropout_rate=0.5, keep_tokens=1), rng).split(", "))
               for _ in range(200)]
    assert min(lengths) >= 1 and 2.5 < sum(lengths) / len(lengths) < 4.5  # 1 + 5 * 0.5 on average


def test_prefix_suffix_and_secondary_separator():
    out = run(CaptionOptions(caption_prefix="photo of", caption_suffix="4k"), caption="a;;;b, c")
    assert out == "photo of a;;;b, c 4k"
    opts = CaptionOptions(shuffle_caption=True, secondary_separator=";;;")
    for seed in range(5):
        out = run(opts, seed, "a;;;b, c, d")
        assert "a,b" in out and sorted(out.replace("a,b", "ab").split(", ")) == ["ab", "c", "d"]


def test_token_warmup():
    opts = CaptionOptions(token_warmup_min=1, token_warmup_step=10)
    # flex tags: 6; at step s: floor(s * (6 - 1) / 10) + 1
    assert run(opts, step=0) == "sls frog"
    assert run(opts, step=4) == "sls frog, green, pond"  # floor(2.0) + 1 = 3
    assert run(opts, step=10) == CAP
    frac = CaptionOptions(token_warmup_min=2, token_warmup_step=0.5)  # half of 20 steps
    assert run(frac, step=0, max_train_steps=20) == "sls frog, green"
    assert run(frac, step=10, max_train_steps=20) == CAP


def test_wildcards():
    rng = random.Random(0)
    outs = {expand_wildcards("a {red|blue|green} frog", rng) for _ in range(50)}
    assert outs == {"a red frog", "a blue frog", "a green frog"}
    assert {expand_wildcards("line one\nline two", rng) for _ in range(50)} == {"line one", "line two"}


@pytest.mark.parametrize("text,expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("[less]", [("less", 1 / 1.1)]),
    ("(abc:1.23)", [("abc", 1.23)]),
    ("((nested))", [("nested", 1.1 * 1.1)]),
    ("", [("", 1.0)]),
])
def test_parse_weighted_prompt(text, expected):
    got = parse_weighted_prompt(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_parse_weighted_prompt_webui_example():
    got = parse_weighted_prompt("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")
    assert [t for t, _ in got] == ["a ", "house", " ", "on", " a ", "hill", ", sun, ", "sky", "."]
    assert [w for _, w in got] == pytest.approx([1.0, 1.3 * 1.1 * 1.1, 1.1, 1.0, 1.1, 0.55, 1.1, 1.1 ** 4, 1.1])
