"""Every entry script starts as its docs print it: `python finetune/x.py --help` from the checkout, in the project's
venv, with no PYTHONPATH and without the project installed (the scripts' bootstrap finds library/ and networks/)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT_DIRS = (".", "finetune", "tools", "networks", "bench")
# `python x.py` or `accelerate launch [launch options] x.py` in a docs page or the README
DOC_COMMAND = re.compile(r"(?:\bpython3?|accelerate launch(?: -{1,2}[\w-]+(?:[ =][\w.]+)?)*) +([\w/]+\.py)\b")


def entry_scripts() -> list[str]:
    """Paths (relative to the checkout) of the files that run as scripts."""
    found = []
    for folder in SCRIPT_DIRS:
        for path in sorted((ROOT / folder).glob("*.py")):
            if 'if __name__ == "__main__":' in path.read_text():
                found.append(path.relative_to(ROOT).as_posix())
    return found


def documented_scripts() -> set[str]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    return {m.group(1) for page in pages for m in DOC_COMMAND.finditer(page.read_text())}


def _help(script: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    # exactly as printed: a relative path, run from the checkout (sys.executable is the venv's python)
    return subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_every_documented_script_is_an_entry_script():
    documented = documented_scripts()
    assert {"finetune/merge_captions_to_metadata.py", "tools/resize_images_to_resolution.py",
            "train_network.py"} <= documented
    assert documented <= set(entry_scripts()), documented - set(entry_scripts())


def test_every_entry_script_prints_its_help_without_pythonpath():
    scripts = [s for s in entry_scripts() if s != "networks/lora_target_tables.py"]  # a generator, no options
    assert "finetune/make_captions.py" in scripts and len(scripts) >= 24
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(scripts, pool.map(_help, scripts)))
    failed = {s: p.stderr.strip().splitlines()[-1:] for s, p in results.items()
              if p.returncode != 0 or "usage:" not in p.stdout}
    assert not failed, failed
