"""Caption processing at training time and the AUTOMATIC1111 weighted-prompt syntax.

`process_caption` applies, in the original's order: prefix/suffix, whole-caption dropout (rate and every n
epochs), then on the tag list (split by `caption_separator`, default ","): the fixed head (`keep_tokens`
tags, or everything before `keep_tokens_separator`; a second separator also fixes a tail), token warmup,
shuffle and tag dropout of the rest, `secondary_separator` replacement. All randomness comes from the `rng`
argument (a `random.Random`), so a seed gives the same captions in any worker.

`parse_weighted_prompt` parses `(abc)` (x1.1), `[abc]` (/1.1), `(abc:1.23)`, nesting and `\\(` escapes
exactly as the WebUI does, returning [(text, weight), ...].
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass


@dataclass
class CaptionOptions:
    """The caption settings of one subset (names as in the dataset config)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    caption_separator: str = ","
    secondary_separator: str | None = None
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    enable_wildcard: bool = False


def _split_tags(text: str, separator: str) -> list[str]:
    return [t.strip() for t in text.split(separator) if t.strip()]


def warmup_step_count(token_warmup_step: float, max_train_steps: int | None) -> int:
    """`token_warmup_step` below 1 is a fraction of the training steps (as in the original)."""
    if 0 < token_warmup_step < 1:
        return math.floor(token_warmup_step * (max_train_steps or 0))
    return int(token_warmup_step)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """`{a|b|c}` -> one of the options; with several lines (wildcard captions) one line is chosen first."""
    lines = [line for line in caption.split("\n") if line.strip()]
    if len(lines) > 1:
        caption = rng.choice(lines)
    return re.sub(r"\{([^{}]*)\}", lambda m: rng.choice(m.group(1).split("|")), caption)


def process_caption(caption: str, opts: CaptionOptions, rng: random.Random, epoch: int = 1,
                    step: int = 0, max_train_steps: int | None = None) -> str:
    """The caption as trained at `epoch` (1-based, as the original counts) and global `step`."""
    if opts.enable_wildcard:
        caption = expand_wildcards(caption, rng)
    if opts.caption_prefix:
        caption = opts.caption_prefix + " " + caption
    if opts.caption_suffix:
        caption = caption + " " + opts.caption_suffix

    drop = opts.caption_dropout_rate > 0 and rng.random() < opts.caption_dropout_rate
    drop = drop or (opts.caption_dropout_every_n_epochs > 0 and epoch % opts.caption_dropout_every_n_epochs == 0)
    if drop:
        return ""

    warmup_steps = warmup_step_count(opts.token_warmup_step, max_train_steps)
    if opts.shuffle_caption or warmup_steps > 0 or opts.caption_tag_dropout_rate > 0:
        sep = opts.caption_separator
        fixed, flex, fixed_tail = [], [], []
        if opts.keep_tokens_separator and opts.keep_tokens_separator in caption:
            head, rest = caption.split(opts.keep_tokens_separator, 1)
            if opts.keep_tokens_separator in rest:
                rest, tail = rest.split(opts.keep_tokens_separator, 1)
                fixed_tail = _split_tags(tail, sep)
            fixed, flex = _split_tags(head, sep), _split_tags(rest, sep)
        else:
            tags = [t.strip() for t in caption.strip().split(sep)]
            fixed, flex = tags[:opts.keep_tokens], tags[opts.keep_tokens:]

        if warmup_steps and step < warmup_steps:
            keep = math.floor(step * ((len(flex) - opts.token_warmup_min) / warmup_steps)) + opts.token_warmup_min
            flex = flex[:keep]
        if opts.shuffle_caption:
            rng.shuffle(flex)
        if opts.caption_tag_dropout_rate > 0:
            flex = [t for t in flex if rng.random() >= opts.caption_tag_dropout_rate]
        caption = ", ".join(fixed + flex + fixed_tail)

    if opts.secondary_separator:
        caption = caption.replace(opts.secondary_separator, opts.caption_separator)
    return caption


_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1


def parse_weighted_prompt(text: str) -> list[tuple[str, float]]:
    """Split an A1111 prompt into (text, weight) runs; unbalanced brackets still apply to the end.

    >>> parse_weighted_prompt("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), float(weight))
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            res.append([piece, 1.0])
    for pos in round_open:
        multiply_from(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply_from(pos, SQUARE_MULTIPLIER)
    if not res:
        return [("", 1.0)]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return [(t, w) for t, w in merged]
