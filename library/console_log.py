"""--console_log_level / --console_log_file / --console_log_simple (sd-scripts' later releases): the root logger's
level, an extra log file, and plain message-only lines. Applied right after the arguments are parsed."""
from __future__ import annotations

import argparse
import logging
import os

DETAILED = "%(levelname)s %(name)s: %(message)s"
SIMPLE = "%(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_console_log(args: argparse.Namespace) -> argparse.Namespace:
    """Apply the console options of `args` (if any) to the root logger; returns `args`."""
    level = getattr(args, "console_log_level", None)
    path = getattr(args, "console_log_file", None)
    simple = getattr(args, "console_log_simple", False)
    if not (level or path or simple):
        return args
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig()
    if level:
        root.setLevel(level)
    if simple:
        for handler in root.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setFormatter(logging.Formatter(SIMPLE))
    if path and not any(isinstance(h, logging.FileHandler) and h.baseFilename == os.path.abspath(path)
                        for h in root.handlers):
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
        root.addHandler(handler)
    return args

