"""Clean-up rules for tags and captions in the fine-tuning metadata (finetune/clean_captions_and_tags.py).

Each rule is a small named function or table below; edit them for your data set as the guide suggests.

Tags (comma separated, as written by WD14 tagger / DeepDanbooru):
1. underscores become spaces (`long_hair` -> `long hair`), except in short emoticon tags such as `^_^`, `o_o`;
2. rating tags (`rating:safe`, `rating:explicit`, ...) are removed;
3. exact duplicates are removed (first one kept);
4. with several people (a tag containing `girls` or `boys`, e.g. `2girls`), attribute groups that cannot be told
   apart per person (hair length, hair cut, hair colour, eye colour, sleeves, hairstyle) are removed when more
   than one tag of the group is present;
5. a one-word tag that a longer tag ends with is removed (`shirt` when `white shirt` is there).

Captions (BLIP): the replacements in `CAPTION_REPLACEMENTS` (girl/girls/woman/women/lady/person variants,
"anime girl" -> "girl", ...) are applied in order, on whole words, each until it no longer matches.
"""
from __future__ import annotations

import re

EMOTICON_MAX_LEN = 3  # `^_^`, `o_o`, `>_<` keep their underscore

# Rule 4: groups of per-person attributes. A tag belongs to a group when the pattern matches it entirely.
MULTI_PERSON_GROUPS: dict[str, re.Pattern] = {
    "hair length": re.compile(r"(long|short|medium) hair"),
    "hair cut": re.compile(r"(bob|hime) cut"),
    "eye colour": re.compile(r"[\w\-]+ eyes"),
    "sleeves": re.compile(r"[\w\-]+ sleeves|sleeveless"),
    "hairstyle": re.compile(r"ponytail|braid|ahoge|twintails|[\w\-]+ bun|single hair bun|single side bun|two side up"
                            r"|two tails|[\w\-]+ braid|sidelocks"),
    "hair colour": re.compile(r"(?!(long|short|medium) hair$)[\w\-]+ hair"),
}
# Rule 4 does not apply to these (they describe a state, not a per-person colour).
NOT_ATTRIBUTES = {"closed eyes", "half-closed eyes", "covered eyes", "empty eyes"}
# Rule 5: tags treated as a single "word" even though they contain a space.
SUBSUMABLE_PHRASES = {"hair ornament"}

# Order matters: earlier replacements run first ("anime girl" before "girl girl" clean-up).
CAPTION_REPLACEMENTS: list[tuple[str, str]] = [
    ("anime anime", "anime"),
    ("young", ""),
    ("anime girl", "girl"),
    ("cartoon female", "girl"),
    ("cartoon lady", "girl"),
    ("cartoon character", "girl"),
    ("cartoon woman", "girl"),
    ("cartoon women", "girls"),
    ("cartoon girl", "girl"),
    ("anime female", "girl"),
    ("anime lady", "girl"),
    ("anime character", "girl"),
    ("anime woman", "girl"),
    ("anime women", "girls"),
    ("lady", "girl"),
    ("female", "girl"),
    ("woman", "girl"),
    ("women", "girls"),
    ("people", "girls"),
    ("person", "girl"),
    ("a cartoon figure", "a figure"),
    ("a cartoon image", "an image"),
    ("a cartoon picture", "a picture"),
    ("an anime cartoon image", "an image"),
    ("a cartoon anime drawing", "a drawing"),
    ("a cartoon drawing", "a drawing"),
    ("girl girl", "girl"),
    ("an girl", "a girl"),  # "an anime girl" -> "an girl" above
]


def split_tags(tags: str) -> list[str]:
    return [t.strip() for t in tags.split(",") if t.strip()]


def remove_underscores(tags: list[str]) -> list[str]:
    return [t if len(t) <= EMOTICON_MAX_LEN else t.replace("_", " ") for t in tags]


def is_rating_tag(tag: str) -> bool:
    return tag.startswith("rating:") or tag.startswith("rating ")


def remove_duplicates(tags: list[str]) -> list[str]:
    return list(dict.fromkeys(tags))


def has_several_people(tags: list[str]) -> bool:
    return any("girls" in t or "boys" in t for t in tags)


def remove_ambiguous_attributes(tags: list[str]) -> list[str]:
    """Rule 4: drop each attribute group that has more than one tag (who has which colour is unknown)."""
    drop: set[str] = set()
    for pattern in MULTI_PERSON_GROUPS.values():
        members = [t for t in tags if t not in NOT_ATTRIBUTES and pattern.fullmatch(t)]
        if len(members) > 1:
            drop.update(members)
    return [t for t in tags if t not in drop]


def remove_subsumed(tags: list[str]) -> list[str]:
    """Rule 5: `shirt` goes when `white shirt` (or `frilled white shirt`) is present."""
    def subsumed(tag: str) -> bool:
        if " " in tag and tag not in SUBSUMABLE_PHRASES:
            return False
        return any(other != tag and other.endswith(" " + tag) for other in tags)

    return [t for t in tags if not subsumed(t)]


def clean_tags(tags: str) -> str:
    """Apply tag rules 1-5 to a comma separated tag string."""
    items = remove_underscores(split_tags(tags))
    items = remove_duplicates([t for t in items if not is_rating_tag(t)])
    if has_several_people(items):
        items = remove_ambiguous_attributes(items)
    return ", ".join(remove_subsumed(items))


_CAPTION_PATTERNS = [(re.compile(rf"\b{re.escape(src)}\b"), dst) for src, dst in CAPTION_REPLACEMENTS]


def clean_caption(caption: str) -> str:
    """Apply CAPTION_REPLACEMENTS on whole words, each until stable; collapse the spaces removals leave."""
    for pattern, replacement in _CAPTION_PATTERNS:
        while True:
            new = pattern.sub(replacement, caption)
            if new == caption:
                break
            caption = new
        caption = re.sub(r" {2,}", " ", caption).strip()
    return caption


def clean_metadata(metadata: dict[str, dict], debug: bool = False) -> tuple[int, int]:
    """Clean every entry's `tags` and `caption` in place; returns (tags changed, captions changed)."""
    import logging

    from tqdm import tqdm

    log = logging.getLogger(__name__)
    changed = [0, 0]
    for key, entry in tqdm(metadata.items(), desc="cleaning", smoothing=0.0):
        for i, (name, fn) in enumerate((("tags", clean_tags), ("caption", clean_caption))):
            value = entry.get(name)
            if not isinstance(value, str):
                continue
            new = fn(value)
            if new != value:
                changed[i] += 1
                if debug:
                    log.info("%s %s\n  FROM: %s\n  TO:   %s", key, name, value, new)
            entry[name] = new
    return changed[0], changed[1]
