"""The prompt syntax of sample prompt files and generation prompts (sd-scripts' `--n --w --h --d --l --s ...`).

`parse_prompt_line(line)` -> `PromptSpec`; `read_prompt_file(path)` for .txt (one prompt a line, `#` comments),
.toml (`[prompt]` defaults plus `[[prompt.subset]]` entries) and .json (a list of lines or of objects) files.
`SAMPLERS` lists the sampler names (library.sampling turns them into schedulers). See docs/sample_prompts.md.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SAMPLERS = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)


def canonical_sampler(name: str) -> str:
    """`k_euler` -> `euler` etc.; raises ValueError for an unknown name (listing the valid ones)."""
    key = name.lower()
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    return key[2:] if key.startswith("k_") else key


@dataclass
class PromptSpec:
    """One prompt and the options written after it; None means "use the caller's default"."""

    prompt: str
    negative_prompt: str | None = None  # --n
    width: int | None = None  # --w
    height: int | None = None  # --h
    seeds: list[int] | None = None  # --d (gen_img accepts a comma list: one seed per image)
    scale: float | None = None  # --l
    negative_scale: float | None = None  # --nl
    steps: int | None = None  # --s (clamped to 1..1000)
    network_muls: list[float] | None = None  # --am (comma list, one per network)
    sampler: str | None = None  # --ss
    original_width: int | None = None  # --ow (SDXL)
    original_height: int | None = None  # --oh
    original_width_negative: int | None = None  # --nw
    original_height_negative: int | None = None  # --nh
    crop_top: int | None = None  # --ct
    crop_left: int | None = None  # --cl
    strength: float | None = None  # --t (img2img / highres fix strength)
    index: int = 0  # position in the prompt file (names the sample images)
    raw: str | None = None  # the line as written (for dynamic prompt variants)

    @property
    def seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None


def _ints(v: str) -> list[int]:
    return [int(x) for x in v.split(",") if x.strip()]


def _floats(v: str) -> list[float]:
    return [float(x) for x in v.split(",") if x.strip()]


def _steps(v: Any) -> int:
    return max(1, min(1000, int(v)))


def _optional_float(v: Any) -> float | None:
    return None if str(v).strip().lower() == "none" else float(v)


# option letter -> (PromptSpec field, converter)
PROMPT_OPTIONS: dict[str, tuple[str, Any]] = {
    "n": ("negative_prompt", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seeds", _ints),
    "l": ("scale", float),
    "nl": ("negative_scale", _optional_float),
    "s": ("steps", _steps),
    "am": ("network_muls", _floats),
    "ss": ("sampler", canonical_sampler),
    "ow": ("original_width", int),
    "oh": ("original_height", int),
    "nw": ("original_width_negative", int),
    "nh": ("original_height_negative", int),
    "ct": ("crop_top", int),
    "cl": ("crop_left", int),
    "t": ("strength", float),
}


def parse_prompt_line(line: str, index: int = 0) -> PromptSpec:
    """Parse `prompt --n negative --w 512 --h 512 --d 1 --l 7.5 --s 28 --am 0.5,1` (options as in sd-scripts).

    An option runs until the next " --". Unknown options are logged and ignored (as sd-scripts does); a bad
    value raises ValueError naming the option.
    """
    parts = line.strip().split(" --")
    spec = PromptSpec(prompt=parts[0].strip(), index=index, raw=line.strip())
    for part in parts[1:]:
        name, _, value = part.strip().partition(" ")
        key = name.lower()
        if key not in PROMPT_OPTIONS:
            logger.warning("prompt option --%s is not supported and is ignored (prompt: %.60s)", name, spec.prompt)
            continue
        attr, convert = PROMPT_OPTIONS[key]
        value = value.strip()
        try:
            setattr(spec, attr, convert(value))
        except ValueError as e:
            hint = f" ({e})" if "sampler" in str(e) else ""
            raise ValueError(f"prompt option --{name}: bad value {value!r} in prompt {spec.prompt[:60]!r}{hint}") from None
    return spec


# keys of sd-scripts' prompt dicts (toml / json prompt files) -> PromptSpec field
_DICT_KEYS = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "width": ("width", int),
    "height": ("height", int), "seed": ("seeds", lambda v: [int(v)]), "scale": ("scale", float),
    "guidance_scale": ("scale", float), "negative_scale": ("negative_scale", _optional_float),
    "sample_steps": ("steps", _steps), "steps": ("steps", _steps),
    "sample_sampler": ("sampler", canonical_sampler), "network_multipliers": ("network_muls", list),
    "original_width": ("original_width", int), "original_height": ("original_height", int),
    "original_width_negative": ("original_width_negative", int),
    "original_height_negative": ("original_height_negative", int),
    "crop_top": ("crop_top", int), "crop_left": ("crop_left", int), "enum": ("index", int),
}


def prompt_from_dict(entry: dict[str, Any], index: int = 0, source: str = "prompt") -> PromptSpec:
    """A PromptSpec from an sd-scripts prompt dict (`prompt`, `negative_prompt`, `width`, `sample_steps`, ...)."""
    spec = PromptSpec(prompt="", index=index)
    for key, value in entry.items():
        if key == "subset":
            continue
        if key not in _DICT_KEYS:
            raise ValueError(f"{source}{': ' if source else ''}unknown key {key!r}; valid: {', '.join(sorted(_DICT_KEYS))}")
        attr, convert = _DICT_KEYS[key]
        try:
            setattr(spec, attr, convert(value))
        except (TypeError, ValueError):
            raise ValueError(f"{source}{': ' if source else ''}bad value {value!r} for {key!r}") from None
    if spec.network_muls is not None:
        spec.network_muls = [float(v) for v in spec.network_muls]
    spec.index = index
    return spec


def read_prompt_file(path: str | os.PathLike, skip_invalid: bool = False) -> list[PromptSpec]:
    """Read a .txt / .toml / .json prompt file into PromptSpecs (`index` = position among the prompts).

    A bad entry raises ValueError naming the file and its line (.txt) or entry number; with `skip_invalid`
    it is logged and left out instead, so one bad line never costs the others (sampling during training).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path}: no such file")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".toml":
        import toml

        try:
            data = toml.loads(text)
        except toml.TomlDecodeError as e:
            raise ValueError(f"prompt file {path}: invalid TOML ({e})") from None
        base = data.get("prompt")
        if not isinstance(base, dict) or not isinstance(base.get("subset"), list):
            raise ValueError(f"prompt file {path}: expected a [prompt] table with [[prompt.subset]] entries")
        entries: list[tuple[str, Any]] = [(f"[[prompt.subset]] {i + 1}", {**base, **sub})
                                          for i, sub in enumerate(base["subset"])]
    elif suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {path}: invalid JSON ({e})") from None
        if not isinstance(items, list):
            raise ValueError(f"prompt file {path}: expected a JSON list of prompt lines or prompt objects")
        entries = [(f"entry {i}", item) for i, item in enumerate(items)]
    else:  # .txt and anything else: one prompt a line
        entries = [(f"line {n}", ln.strip()) for n, ln in enumerate(text.splitlines(), 1)
                   if ln.strip() and not ln.lstrip().startswith("#")]
    specs = []
    for i, (where, entry) in enumerate(entries):
        try:
            specs.append(_parse_entry(entry, i))
        except ValueError as e:
            if not skip_invalid:
                raise ValueError(f"prompt file {path}, {where}: {e}") from None
            logger.error("prompt file %s, %s: %s; this prompt is skipped", path, where, e)
    return specs


def _parse_entry(entry: Any, index: int) -> PromptSpec:
    if isinstance(entry, str):
        return parse_prompt_line(entry, index=index)
    if isinstance(entry, dict):
        return prompt_from_dict(entry, index=index, source="")
    raise ValueError(f"expected a string or an object, got {type(entry).__name__}")


# {[e$$][count or range$$][separator$$]variant|variant|...}
_DYNAMIC = re.compile(r"\{((e|E)\$\$)?(([\d\-]+)\$\$)?(([^|}]+?)\$\$)?(.+?((\|).+?)*?)\}")


def expand_dynamic_prompt(line: str, repeat_count: int, rng: random.Random) -> list[str]:
    """sd-scripts' dynamic prompts: `{a|b|c}` picks one variant per image (`repeat_count` lines);
    `{e$$a|b|c}` enumerates every variant (one line each); `{2$$a|b|c}` / `{1-3$$...}` pick that many,
    joined by ", " or by the separator given as `{2$$ and $$a|b|c}`. A line without braces is returned as is.
    """
    groups = list(_DYNAMIC.finditer(line))
    if not groups:
        return [line]
    choosers = [_variant_chooser(m) for m in groups]
    enumerated = [m.group(2) is not None for m in groups]
    if not any(enumerated):
        lines = []
        for _ in range(repeat_count):
            current = line
            for m, choose in zip(groups, choosers):
                current = current.replace(m.group(0), choose(rng)[0], 1)
            lines.append(current)
        return lines
    lines = [line]
    for m, choose, enum in zip(groups, choosers, enumerated):
        if enum:
            lines = [current.replace(m.group(0), value, 1) for current in lines for value in choose(rng)]
    for m, choose, enum in zip(groups, choosers, enumerated):
        if not enum:
            lines = [current.replace(m.group(0), choose(rng)[0], 1) for current in lines]
    return lines


def _variant_chooser(m: re.Match):
    variants = m.group(7).split("|")
    separator = ", " if m.group(6) is None else m.group(6)
    low, high = 1, 1
    if m.group(4) is not None:
        bounds = [int(x) for x in m.group(4).split("-") if x != ""] or [1]
        low, high = min(bounds[0], bounds[-1]), max(bounds[0], bounds[-1])
        low, high = max(0, low), min(len(variants), high)
    if m.group(2) is not None:
        values = [separator.join(c) for n in range(low, high + 1) for c in itertools.combinations(variants, n)]
        return lambda rng: values
    return lambda rng: [separator.join(rng.sample(variants, rng.randint(low, high)))]
