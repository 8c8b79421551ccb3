"""Dataset options and configuration: the TOML dataset config and the legacy command-line folders.

Three ways to describe data end in one validated model (`DataConfig` -> `DatasetConfig` -> `SubsetConfig`):
1. `--dataset_config file.toml` with `[general]`, `[[datasets]]`, `[[datasets.subsets]]`; a value is taken from
   the subset, else its dataset, else `[general]`, else the command line, else the default.
2. `--train_data_dir` whose subfolders are named `<repeats>_<identifier> <class>` (e.g. `20_sls frog`) and
   `--reg_data_dir` with `<repeats>_<class>` subfolders (DreamBooth, class tokens or caption files).
3. `--in_json` metadata (fine tuning) with `--train_data_dir` as the image folder.

`load_dataset_config(args)` checks everything that can be checked without models: unknown keys, types, value
ranges, folders, images present, metadata files, caching conflicts. Errors are `ValueError` /
`FileNotFoundError` with one line naming the file, the table (`datasets[0].subsets[1]`) and the key.
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import voluptuous as vol

from library.captions import CaptionOptions
from library.images import IMAGE_EXTENSIONS, list_images

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- validators
def _strict_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise vol.Invalid(f"expected true or false, got {v!r}")
    return v


def _strict_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise vol.Invalid(f"expected an integer, got {v!r}")
    return v


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise vol.Invalid(f"expected a number, got {v!r}")
    return float(v)


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise vol.Invalid(f"expected a string, got {v!r}")
    return v


def _resolution(v: Any) -> tuple[int, int]:
    """512, "512", "512,768", [512, 768] -> (width, height)."""
    if isinstance(v, str):
        try:
            parts = [int(p) for p in v.replace("x", ",").split(",") if p.strip()]
        except ValueError:
            raise vol.Invalid(f"expected a size like 512 or [512, 768], got {v!r}") from None
        v = parts[0] if len(parts) == 1 else parts
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if (not isinstance(v, (list, tuple)) or len(v) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)):
        raise vol.Invalid(f"expected a positive size like 512 or [512, 768] (width, height), got {v!r}")
    return int(v[0]), int(v[1])


def _float_pair(v: Any) -> tuple[float, float]:
    if isinstance(v, str):
        try:
            v = [float(p) for p in v.split(",")]
        except ValueError:
            raise vol.Invalid(f"expected two numbers like [2.0, 4.0], got {v!r}") from None
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise vol.Invalid(f"expected two numbers like [2.0, 4.0], got {v!r}")
    return _number(v[0]), _number(v[1])


# keys a subset may hold that may also be given higher up (dataset, general, command line)
SUBSET_ASCENDABLE: dict[str, Callable] = {
    "num_repeats": _strict_int,
    "shuffle_caption": _strict_bool,
    "keep_tokens": _strict_int,
    "keep_tokens_separator": _string,
    "caption_separator": _string,
    "secondary_separator": _string,
    "enable_wildcard": _strict_bool,
    "caption_prefix": _string,
    "caption_suffix": _string,
    "caption_dropout_rate": _number,
    "caption_dropout_every_n_epochs": _strict_int,
    "caption_tag_dropout_rate": _number,
    "color_aug": _strict_bool,
    "flip_aug": _strict_bool,
    "face_crop_aug_range": _float_pair,
    "random_crop": _strict_bool,
    "token_warmup_min": _strict_int,
    "token_warmup_step": _number,
    "caption_extension": _string,
    "class_tokens": _string,
    "cache_info": _strict_bool,
    "alpha_mask": _strict_bool,
}
# keys only a subset may hold
SUBSET_ONLY: dict[str, Callable] = {"image_dir": _string, "is_reg": _strict_bool, "metadata_file": _string,
                                    "conditioning_data_dir": _string, "validation": _strict_bool}
# keys of a dataset (may also be in [general] or on the command line)
DATASET_ASCENDABLE: dict[str, Callable] = {
    "resolution": _resolution,
    "batch_size": _strict_int,
    "enable_bucket": _strict_bool,
    "min_bucket_reso": _strict_int,
    "max_bucket_reso": _strict_int,
    "bucket_reso_steps": _strict_int,
    "bucket_no_upscale": _strict_bool,
}
# command-line names that differ from the config names
ARG_TO_CONFIG = {"train_batch_size": "batch_size", "dataset_repeats": "num_repeats"}

SUBSET_DEFAULTS: dict[str, Any] = {
    "num_repeats": 1, "shuffle_caption": False, "keep_tokens": 0, "keep_tokens_separator": None,
    "caption_separator": ",", "secondary_separator": None, "enable_wildcard": False, "caption_prefix": None,
    "caption_suffix": None, "caption_dropout_rate": 0.0, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "color_aug": False, "flip_aug": False, "face_crop_aug_range": None,
    "random_crop": False, "token_warmup_min": 1, "token_warmup_step": 0, "caption_extension": ".caption",
    "class_tokens": None, "cache_info": False, "alpha_mask": False,
}
DATASET_DEFAULTS: dict[str, Any] = {
    "resolution": None, "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256, "max_bucket_reso": 1024,
    "bucket_reso_steps": 64, "bucket_no_upscale": False,
}
UNSUPPORTED_KEYS: dict[str, str] = {}


# ------------------------------------------------------------------------------------------------- model
@dataclass
class SubsetConfig:
    """One folder (DreamBooth) or metadata file (fine tuning) with its settings, fully resolved."""

    where: str
    image_dir: str | None
    metadata_file: str | None = None
    is_reg: bool = False
    num_repeats: int = 1
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str | None = None
    caption_separator: str = ","
    secondary_separator: str | None = None
    enable_wildcard: bool = False
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    color_aug: bool = False
    flip_aug: bool = False
    face_crop_aug_range: tuple[float, float] | None = None
    random_crop: bool = False
    token_warmup_min: int = 1
    token_warmup_step: float = 0
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    cache_info: bool = False
    alpha_mask: bool = False
    conditioning_data_dir: str | None = None  # mask images for --masked_loss (library.loss_masks)
    validation: bool = False  # the whole subset is held out for the validation loss (library.validation)

    @property
    def is_finetuning(self) -> bool:
        return self.metadata_file is not None

    def caption_options(self) -> CaptionOptions:
        names = {f.name for f in fields(CaptionOptions)}
        return CaptionOptions(**{k: getattr(self, k) for k in names})


@dataclass
class DatasetConfig:
    """One `[[datasets]]` table: shared resolution, batch size and bucketing, and its subsets."""

    where: str
    subsets: list[SubsetConfig]
    resolution: tuple[int, int] | None = None
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    @property
    def is_finetuning(self) -> bool:
        return any(s.is_finetuning for s in self.subsets)


@dataclass
class DataConfig:
    """All datasets of a training run and where they were described (a TOML path or the command line)."""

    source: str
    datasets: list[DatasetConfig] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- arguments
def add_dataset_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every dataset, caption, bucket and latent-cache option of the training guide to `parser`.

    Options the parser already has (added by another module) are left as they are.
    """
    g = parser.add_argument_group("dataset", "training data: a TOML dataset config, or the legacy folder options")
    existing = set(parser._option_string_actions)  # noqa: SLF001 - argparse has no public query

    def add(*names: str, **kw: Any) -> None:
        if not existing.intersection(names):
            g.add_argument(*names, **kw)

    add("--dataset_config", type=str, default=None,
        help="TOML file describing the datasets ([general], [[datasets]], [[datasets.subsets]]); "
             "see docs/dataset_config.md. Replaces --train_data_dir/--reg_data_dir/--in_json")
    add("--train_data_dir", type=str, default=None,
        help="folder whose subfolders '<repeats>_<identifier> <class>' hold the training images "
             "(with --in_json: the folder of the images)")
    add("--reg_data_dir", type=str, default=None,
        help="folder whose subfolders '<repeats>_<class>' hold regularization images")
    add("--in_json", type=str, default=None, help="metadata JSON (fine tuning: captions, tags, buckets)")
    add("--dataset_repeats", type=int, default=1, help="repeats of the images of --in_json (default 1)")
    add("--resolution", type=str, default=None,
        help="training resolution: 'size' or 'width,height' (e.g. 512 or 512,768)")
    add("--train_batch_size", type=int, default=1, help="batch size (default 1)")
    add("--caption_extension", type=str, default=".caption",
        help="extension of the caption files next to the images (default .caption)")
    add("--caption_extention", type=str, default=None, help=argparse.SUPPRESS)  # old misspelling
    add("--shuffle_caption", action="store_true", help="shuffle the comma-separated tags of each caption")
    add("--caption_separator", type=str, default=",", help="separator of the tags in a caption (default ,)")
    add("--keep_tokens", type=int, default=0, help="keep the first N tags in place when shuffling / dropping")
    add("--keep_tokens_separator", type=str, default=None,
        help="tags before this separator (e.g. '|||') stay fixed; a second one fixes the tags after it too")
    add("--secondary_separator", type=str, default=None,
        help="separator kept together while shuffling, replaced by caption_separator afterwards (e.g. ';;;')")
    add("--enable_wildcard", action="store_true",
        help="captions may use {a|b|c} (one chosen per step) and several lines (one line chosen)")
    add("--caption_prefix", type=str, default=None, help="text put before every caption")
    add("--caption_suffix", type=str, default=None, help="text put after every caption")
    add("--caption_dropout_rate", type=float, default=0.0, help="probability to train an image with an empty caption")
    add("--caption_dropout_every_n_epochs", type=int, default=0,
        help="train every Nth epoch with empty captions (0: never)")
    add("--caption_tag_dropout_rate", type=float, default=0.0,
        help="probability to drop each (non-kept) tag of a caption")
    add("--token_warmup_min", type=int, default=1, help="tags used at the start of token warmup (default 1)")
    add("--token_warmup_step", type=float, default=0,
        help="steps until all tags are used (below 1: a fraction of the training steps; 0: off)")
    add("--weighted_captions", action="store_true",
        help="captions use the AUTOMATIC1111 weight syntax: (abc), [abc], (abc:1.23), nested")
    add("--max_token_length", type=int, default=None, choices=[75, 150, 225],
        help="tokens per caption: 75 (default), 150 or 225, encoded in 75-token chunks")
    add("--color_aug", action="store_true", help="random hue/gamma changes (not with latent caching)")
    add("--flip_aug", action="store_true", help="random horizontal flips (cached as a second latent)")
    add("--face_crop_aug_range", type=str, default=None,
        help="range of face size relative to the image, e.g. 2.0,4.0 (faces from *_cx_cy_w_h file names)")
    add("--random_crop", action="store_true", help="crop at a random position instead of the center")
    add("--alpha_mask", action="store_true", help="use the alpha channel of the images as a loss mask")
    add("--enable_bucket", action="store_true", help="aspect-ratio bucketing")
    add("--min_bucket_reso", type=int, default=256, help="smallest bucket side (default 256)")
    add("--max_bucket_reso", type=int, default=1024, help="largest bucket side (default 1024)")
    add("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this (64; 32 for SDXL)")
    add("--bucket_no_upscale", action="store_true", help="never enlarge images: buckets follow the image sizes")
    add("--prior_loss_weight", type=float, default=1.0, help="loss weight of regularization images (default 1.0)")
    add("--cache_latents", action="store_true",
        help="encode every image with the VAE once before training, kept in memory (no color_aug/random_crop)")
    add("--cache_latents_to_disk", action="store_true",
        help="like --cache_latents, saved as .npz next to each image and reused by later runs")
    add("--vae_batch_size", type=int, default=1, help="images per VAE batch when caching latents (default 1)")
    add("--max_data_loader_n_workers", type=int, default=8,
        help="data loading processes (default 8, at most CPU count - 1; 0 loads in the main process)")
    add("--persistent_data_loader_workers", action="store_true", help="keep the loader processes between epochs")
    add("--debug_dataset", action="store_true",
        help="print what would be trained (files, bucket, caption, token count) per step, then exit")
    add("--debug_dataset_dir", type=str, default=None,
        help="with --debug_dataset: also save the cropped/augmented images to this folder")
    return parser


# ----------------------------------------------------------------------------------------- config loading
class _Problem(ValueError):
    pass


def _where(path: list) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_table(table: Any, where: str, allowed: dict[str, Callable], source: str) -> dict[str, Any]:
    """Check the keys and value types of one TOML table; return the converted values."""
    if not isinstance(table, dict):
        raise _Problem(f"{source}: {where}: expected a table, got {table!r}")
    for key in table:
        if key in allowed:
            continue
        if key in UNSUPPORTED_KEYS:
            raise _Problem(f"{source}: {where}: {key!r} is not supported ({UNSUPPORTED_KEYS[key]})")
        hint = ""
        if key in DATASET_ASCENDABLE and "subsets" in where:
            hint = f"; {key!r} is a dataset setting: put it in [[datasets]] or [general]"
        elif key in SUBSET_ONLY:
            hint = f"; {key!r} belongs in a [[datasets.subsets]] table"
        elif key == "subsets" or key == "datasets":
            hint = f"; {key!r} is not allowed here"
        raise _Problem(f"{source}: {where}: unknown key {key!r}{_suggest(key, list(allowed))}{hint}. "
                       f"Valid keys here: {', '.join(sorted(allowed))}")
    schema = vol.Schema({vol.Optional(k): v for k, v in allowed.items()}, extra=vol.ALLOW_EXTRA)
    try:
        return schema(table)
    except vol.MultipleInvalid as e:
        err = e.errors[0]
        key = _where(list(err.path))
        raise _Problem(f"{source}: {where}.{key}: {err.msg}") from None


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--dataset_config {path}: no such file")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None


def _args_fallback(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys the command line sets (lowest-priority values)."""
    values = {}
    for name, value in vars(args).items():
        key = ARG_TO_CONFIG.get(name, name)
        if key in SUBSET_ASCENDABLE or key in DATASET_ASCENDABLE:
            if value is not None:
                values[key] = value
    if getattr(args, "caption_extention", None):
        values["caption_extension"] = args.caption_extention
    for key in ("resolution", "face_crop_aug_range"):
        if key in values:
            try:
                values[key] = DATASET_ASCENDABLE.get(key, SUBSET_ASCENDABLE.get(key))(values[key])
            except vol.Invalid as e:
                raise ValueError(f"--{key} {values[key]!r}: {e.msg}") from None
    return values


def _resolve(cls: type, layers: list[dict[str, Any]], defaults: dict[str, Any], **fixed: Any) -> Any:
    values = dict(defaults)
    for layer in reversed(layers):  # lowest priority first
        values.update({k: v for k, v in layer.items() if k in defaults})
    return cls(**fixed, **values)


def _from_toml(path: str, args: argparse.Namespace) -> DataConfig:
    data = _read_toml(path)
    for key in data:
        if key not in ("general", "datasets"):
            raise ValueError(f"{path}: unknown top-level key {key!r}{_suggest(key, ['general', 'datasets'])}; "
                             "expected [general] and [[datasets]] tables")
    general_keys = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE}
    general = _check_table(data.get("general", {}), "general", general_keys, path)
    datasets_raw = data.get("datasets")
    if not datasets_raw:
        raise ValueError(f"{path}: no [[datasets]] table; add at least one with [[datasets.subsets]] image_dir = ...")
    if not isinstance(datasets_raw, list):
        raise ValueError(f"{path}: 'datasets' must be an array of tables written [[datasets]]")
    cli = _args_fallback(args)
    config = DataConfig(source=path)
    for i, ds_raw in enumerate(datasets_raw):
        where = f"datasets[{i}]"
        ds = _check_table(ds_raw, where, {**general_keys, "subsets": lambda v: v}, path)
        subsets_raw = ds.pop("subsets", None)
        if not subsets_raw or not isinstance(subsets_raw, list):
            raise ValueError(f"{path}: {where}: no [[datasets.subsets]] table; each dataset needs at least one subset "
                             "with image_dir (or metadata_file)")
        subsets = []
        for j, sub_raw in enumerate(subsets_raw):
            swhere = f"{where}.subsets[{j}]"
            sub = _check_table(sub_raw, swhere, {**SUBSET_ASCENDABLE, **SUBSET_ONLY}, path)
            if "image_dir" not in sub and "metadata_file" not in sub:
                raise ValueError(f"{path}: {swhere}: missing key 'image_dir' (the folder holding the images)")
            only = {k: sub.get(k) for k in SUBSET_ONLY}
            only["is_reg"] = bool(only["is_reg"])
            only["validation"] = bool(only["validation"])
            subsets.append(_resolve(SubsetConfig, [sub, ds, general, cli], SUBSET_DEFAULTS, where=f"{path}: {swhere}",
                                    **only))
        config.datasets.append(_resolve(DatasetConfig, [ds, general, cli], DATASET_DEFAULTS,
                                        where=f"{path}: {where}", subsets=subsets))
    base = Path(path).resolve().parent
    for ds in config.datasets:
        for sub in ds.subsets:
            sub.image_dir = _locate(sub.image_dir, base)
            sub.metadata_file = _locate(sub.metadata_file, base)
            sub.conditioning_data_dir = _locate(sub.conditioning_data_dir, base)
            _warn_repeat_prefix(sub)
    return config


def _warn_repeat_prefix(sub: SubsetConfig) -> None:
    """A '10_sks cat' image_dir in a TOML trains num_repeats times, not 10: warn when the two differ."""
    name = Path(sub.image_dir or "").name
    head, sep, _ = name.partition("_")
    if sep and head.isdigit() and int(head) != sub.num_repeats:
        logger.warning("%s: image_dir %r: the '%s_' prefix sets no repeats in a dataset config; num_repeats does "
                       "(%d here)", sub.where, name, head, sub.num_repeats)


def _locate(p: str | None, toml_dir: Path) -> str | None:
    """Paths are relative to the working folder (as the original); fall back to the TOML's folder."""
    if p is None:
        return p
    p = os.path.expanduser(p)
    if os.path.isabs(p):
        return p
    if os.path.exists(p):
        if (toml_dir / p).exists() and (toml_dir / p).resolve() != Path(p).resolve():
            logger.info("%s: using %s (the working folder), not %s (beside the dataset config)", p,
                        os.path.abspath(p), toml_dir / p)
        return p
    alt = toml_dir / p
    return str(alt) if alt.exists() else p


def parse_repeat_folder(name: str) -> tuple[int, str]:
    """'20_sls frog' -> (20, 'sls frog'). Raises ValueError for a name without a positive repeat prefix."""
    head, sep, rest = name.partition("_")
    if not sep or not head.isdigit():
        raise ValueError(f"folder name {name!r} does not start with '<repeats>_' (e.g. '20_sls frog')")
    repeats = int(head)
    if repeats < 1:
        raise ValueError(f"folder name {name!r}: the repeat count must be at least 1")
    return repeats, rest


def _legacy_subsets(parent: str, is_reg: bool, flag: str) -> list[dict[str, Any]]:
    root = Path(parent)
    if not root.is_dir():
        raise FileNotFoundError(f"{flag} {parent}: no such folder")
    subsets = []
    for sub in sorted(root.iterdir()):
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        try:
            repeats, tokens = parse_repeat_folder(sub.name)
        except ValueError as e:
            pattern = "<repeats>_<class>" if is_reg else "<repeats>_<identifier> <class>"
            raise ValueError(f"{flag} {parent}: {e}; name each subfolder '{pattern}' or move it out") from None
        subsets.append({"image_dir": str(sub), "num_repeats": repeats, "class_tokens": tokens or None,
                        "is_reg": is_reg, "where": f"{flag} {sub}"})
    if not subsets:
        loose = list_images(root)
        hint = f" ({len(loose)} images lie directly inside it; move them into a subfolder)" if loose else ""
        example = "1_frog" if is_reg else "20_sls frog"
        raise ValueError(f"{flag} {parent}: no '<repeats>_<name>' subfolders (e.g. '{example}'){hint}")
    return subsets


def _from_command_line(args: argparse.Namespace) -> DataConfig:
    cli = _args_fallback(args)
    train_dir, reg_dir, in_json = (getattr(args, k, None) for k in ("train_data_dir", "reg_data_dir", "in_json"))
    if in_json:
        if reg_dir:
            raise ValueError("--reg_data_dir cannot be used with --in_json (fine tuning has no regularization images)")
        raw = [{"image_dir": train_dir, "metadata_file": in_json, "is_reg": False, "where": f"--in_json {in_json}"}]
    elif train_dir:
        raw = _legacy_subsets(train_dir, False, "--train_data_dir")
        if reg_dir:
            raw += _legacy_subsets(reg_dir, True, "--reg_data_dir")
    else:
        raise ValueError("no training data: give --dataset_config file.toml, or --train_data_dir "
                         "(with subfolders like '20_sls frog'), or --in_json with --train_data_dir")
    subsets = []
    for r in raw:
        fixed = {k: r.get(k) for k in SUBSET_ONLY}
        layer = {k: v for k, v in r.items() if k in SUBSET_DEFAULTS}
        if in_json:
            layer["num_repeats"] = getattr(args, "dataset_repeats", 1) or 1
        subsets.append(_resolve(SubsetConfig, [layer, cli], SUBSET_DEFAULTS, where=r["where"], **fixed))
    ds = _resolve(DatasetConfig, [cli], DATASET_DEFAULTS, where="command line", subsets=subsets)
    return DataConfig(source="command line", datasets=[ds])


# ------------------------------------------------------------------------------------------- validation
def _validate_subset(sub: SubsetConfig, ds: DatasetConfig) -> None:
    w = sub.where
    if sub.num_repeats < 1:
        raise ValueError(f"{w}: num_repeats {sub.num_repeats}: must be at least 1")
    for key in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(sub, key) <= 1.0:
            raise ValueError(f"{w}: {key} {getattr(sub, key)}: must be between 0 and 1")
    for key in ("keep_tokens", "caption_dropout_every_n_epochs", "token_warmup_min"):
        if getattr(sub, key) < 0:
            raise ValueError(f"{w}: {key} {getattr(sub, key)}: must not be negative")
    if sub.token_warmup_step < 0:
        raise ValueError(f"{w}: token_warmup_step {sub.token_warmup_step}: must not be negative")
    if sub.face_crop_aug_range is not None:
        lo, hi = sub.face_crop_aug_range
        if not 0 < lo <= hi:
            raise ValueError(f"{w}: face_crop_aug_range {list(sub.face_crop_aug_range)}: expected 0 < min <= max")
    if sub.caption_extension and not sub.caption_extension.startswith("."):
        logger.warning("%s: caption_extension %r has no leading dot; caption files are named image%s",
                       w, sub.caption_extension, sub.caption_extension)
    if sub.is_finetuning:
        if sub.is_reg:
            raise ValueError(f"{w}: is_reg cannot be used with metadata_file (fine tuning has no regularization images)")
        if not os.path.isfile(sub.metadata_file):
            raise FileNotFoundError(f"{w}: metadata_file {sub.metadata_file}: no such file")
        if sub.image_dir is not None and not os.path.isdir(sub.image_dir):
            raise FileNotFoundError(f"{w}: image_dir {sub.image_dir}: no such folder")
        return
    if sub.image_dir is None:
        raise ValueError(f"{w}: missing key 'image_dir'")
    if not os.path.isdir(sub.image_dir):
        raise FileNotFoundError(f"{w}: image_dir {sub.image_dir}: no such folder")
    if not list_images(sub.image_dir):
        inner = [d.name for d in Path(sub.image_dir).iterdir() if d.is_dir() and list_images(d)]
        hint = f"; its subfolders {inner[:3]} hold images: point image_dir at them" if inner else ""
        raise ValueError(f"{w}: image_dir {sub.image_dir}: no images ({' '.join(IMAGE_EXTENSIONS)}){hint}")


def _validate_dataset(ds: DatasetConfig) -> None:
    w = ds.where
    kinds = {s.is_finetuning for s in ds.subsets}
    if len(kinds) > 1:
        raise ValueError(f"{w}: mixes metadata_file subsets (fine tuning) with image folder subsets (DreamBooth); "
                         "put them in separate [[datasets]]")
    if ds.batch_size < 1:
        raise ValueError(f"{w}: batch_size {ds.batch_size}: must be at least 1")
    if ds.resolution is None and not ds.is_finetuning:
        raise ValueError(f"{w}: no resolution: set resolution in the dataset config or --resolution (e.g. 512)")
    if ds.bucket_reso_steps < 8 or ds.bucket_reso_steps % 8:
        raise ValueError(f"{w}: bucket_reso_steps {ds.bucket_reso_steps}: must be a positive multiple of 8 (64; 32 for SDXL)")
    if ds.enable_bucket:
        for key, rounded in (("min_bucket_reso", -(-ds.min_bucket_reso // ds.bucket_reso_steps) * ds.bucket_reso_steps),
                             ("max_bucket_reso", ds.max_bucket_reso // ds.bucket_reso_steps * ds.bucket_reso_steps)):
            if getattr(ds, key) != rounded:
                logger.warning("%s: %s %d is not a multiple of bucket_reso_steps %d; using %d",
                               w, key, getattr(ds, key), ds.bucket_reso_steps, rounded)
                setattr(ds, key, rounded)
        if ds.min_bucket_reso < ds.bucket_reso_steps or ds.min_bucket_reso > ds.max_bucket_reso:
            raise ValueError(f"{w}: min_bucket_reso {ds.min_bucket_reso} / max_bucket_reso {ds.max_bucket_reso}: "
                             f"expected bucket_reso_steps <= min <= max")
        if ds.resolution is not None and max(ds.resolution) > ds.max_bucket_reso:
            raise ValueError(f"{w}: max_bucket_reso {ds.max_bucket_reso} is smaller than the resolution "
                             f"{ds.resolution[0]}x{ds.resolution[1]}; raise max_bucket_reso")
        if ds.resolution is not None and min(ds.resolution) < ds.min_bucket_reso:
            raise ValueError(f"{w}: min_bucket_reso {ds.min_bucket_reso} is larger than the resolution "
                             f"{ds.resolution[0]}x{ds.resolution[1]}; lower min_bucket_reso")
    for sub in ds.subsets:
        _validate_subset(sub, ds)


CACHE_CONFLICTS = {
    "color_aug": "it changes the colors of the image every step",
    "random_crop": "it crops a different part of the image every step",
    "face_crop_aug_range": "it scales and crops the image around the face differently every step",
}


def check_cacheable(sub: SubsetConfig, flag: str = "--cache_latents") -> None:
    """Raise when a subset uses an augmentation that a cached (fixed) latent cannot reproduce."""
    for key, why in CACHE_CONFLICTS.items():
        if getattr(sub, key):
            raise ValueError(f"{sub.where}: {key} cannot be used with {flag}: a cached latent is one fixed image "
                             f"and {why}; drop one of them (flip_aug works with caching)")


def _validate_caching(config: DataConfig, args: argparse.Namespace) -> None:
    flag = "--cache_latents_to_disk" if getattr(args, "cache_latents_to_disk", False) else "--cache_latents"
    if getattr(args, "cache_latents", False) or getattr(args, "cache_latents_to_disk", False):
        for ds in config.datasets:
            for sub in ds.subsets:
                check_cacheable(sub, flag)


def load_dataset_config(args: argparse.Namespace) -> DataConfig:
    """Validated dataset configuration from `--dataset_config` or the legacy options (no model needed)."""
    path = getattr(args, "dataset_config", None)
    if path:
        ignored = [f"--{k}" for k in ("train_data_dir", "reg_data_dir", "in_json") if getattr(args, k, None)]
        if ignored:
            logger.warning("--dataset_config is given: ignoring %s", " ".join(ignored))
        try:
            config = _from_toml(path, args)
        except _Problem as e:
            raise ValueError(str(e)) from None
    else:
        config = _from_command_line(args)
    for ds in config.datasets:
        _validate_dataset(ds)
    _validate_caching(config, args)
    from library.loss_masks import validate_masks
    from library.validation import validate_split

    validate_masks(config, args)
    validate_split(config, args)
    return config


def read_metadata_file(path: str, where: str) -> dict[str, dict[str, Any]]:
    """The fine-tuning metadata JSON: {image key: {"caption", "tags", "train_resolution", ...}}."""
    from library.dataprep.metadata import load_metadata

    try:
        data = load_metadata(path)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where}: metadata_file {e}") from None
    if not data:
        raise ValueError(f"{where}: metadata_file {path}: holds no images")
    return data
