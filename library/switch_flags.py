"""On/off flags that a command line can set either way, so a flag turned on in a `--config_file` TOML can be
turned off again: `--save_state`, `--save_state true`, `--save_state false`, `--no-save_state`.

`make_switchable(parser)` converts every `store_true` option of a parser in place (the options keep their names,
defaults and help; `--no-<name>` is added, hidden from --help).
"""
from __future__ import annotations

import argparse
from typing import Any

TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE + FALSE:
        return value in TRUE
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class SwitchAction(argparse.Action):
    """`--flag` (True), `--flag true|false`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, True if values is None else values)


def make_switchable(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Turn the parser's store_true options into switches (idempotent)."""
    for action in list(parser._actions):
        if type(action) is not argparse._StoreTrueAction:
            continue
        action.__class__ = SwitchAction
        action.nargs, action.type, action.metavar = "?", parse_bool, "true|false"
        container = next((g for g in parser._action_groups if action in g._group_actions), parser)
        negatives = [f"--no-{flag[2:]}" for flag in action.option_strings if flag.startswith("--")]
        free = [flag for flag in negatives if flag not in parser._option_string_actions]
        if free:
            container.add_argument(*free, dest=action.dest, action="store_false", default=argparse.SUPPRESS,
                                   help=argparse.SUPPRESS)
    return parser
