"""Side-by-side benchmark against kohya-ss sd-scripts: both trainers (and the LoRA tools) on the same inputs.

    python bench/compare_reference.py --settings sd15_fp32 --steps 6 --workdir /tmp/compare
    python bench/compare_reference.py --settings all --tools --workdir /tmp/compare --json compare.json

1. Installs sd-scripts at REFERENCE_COMMIT (from --reference_src: a git URL or a local git directory) into its own
   folder outside the checkout (default ~/.cache/sd-lora-suite/reference-<commit>): the source, and a virtual
   environment with its pinned requirements and torch held at the local version (torch==<ours> named first in
   the same pip command, so nothing pulls another torch; opencv as the headless build). If torchvision does not
   import there, a stand-in module with the three transforms sd-scripts uses goes on its PYTHONPATH.
2. Builds (in a child process) one random-weight full-size checkpoint per family in the original single-file
   layout (tools/make_tiny_model.py), its offline tokenizers (--tokenizer_cache_dir layout, read by both
   programs), and a small dataset (random images, one caption, a dataset TOML both read).
3. Runs both programs' train_network.py / sdxl_train_network.py with identical flags, in the order theirs, ours,
   ours, theirs for each setting (so a drift of a shared machine biases neither side), one process at a time.
   Per-step times come from each progress bar ("steps: ... k/N"), timestamped as its lines arrive; the first step
   (warm-up) is left out and the median of the rest is reported. Peak RSS is the child's own (`os.wait4`; this
   parent never imports torch, so the high-water mark is not inherited). Also the wall time from process start
   to saved LoRA file.
4. With --tools: the LoRA tools of bench/bench_lora_tools.py (merge, two-LoRA merge, SVD merge, extract, resize)
   with both programs' scripts on the same SD1.5-size files, each in its own process.
Prints the table (ours, theirs, ratio) and writes JSON with --json. See docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_REPO = "https://github.com/kohya-ss/sd-scripts"
REFERENCE_COMMIT = "48d368fa557731ad0488c07304dfeba8c07910eb"  # sd-scripts main, 2026-02-16 (merge of the sd3 branch)
TORCH_VERSION = "2.13.0"

# name: (family, extra flags); all share COMMON_FLAGS. The SDXL settings are U-Net only on cached latents and
# text-encoder outputs with gradient checkpointing, as in the issue.
SETTINGS = {
    "sd15_fp32": ("sd1", []),
    "sd15_bf16": ("sd1", ["--mixed_precision", "bf16"]),
    "sd15_gc": ("sd1", ["--gradient_checkpointing"]),
    "sdxl_fp32": ("sdxl", ["--network_train_unet_only", "--cache_text_encoder_outputs", "--gradient_checkpointing"]),
    "sdxl_full_bf16": ("sdxl", ["--network_train_unet_only", "--cache_text_encoder_outputs", "--gradient_checkpointing",
                                "--mixed_precision", "bf16", "--full_bf16"]),
}
TRAIN_SCRIPTS = {"sd1": "train_network.py", "sdxl": "sdxl_train_network.py"}
STEP_LINE = re.compile(r"steps:\s*\d+%\|[^|\r\n]*\|\s*(\d+)/(\d+)")

TORCHVISION_STANDIN = '''"""Stand-in for torchvision (not installable here without another torch): the transforms sd-scripts uses."""
'''
TRANSFORMS_STANDIN = '''"""ToTensor, Normalize, Compose and functional.pil_to_tensor / gaussian_blur, as sd-scripts uses them."""
import numpy as np
import torch

from . import functional  # noqa: F401


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class ToTensor:
    def __call__(self, pic):
        arr = np.asarray(pic)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))
        return t.float().div(255) if t.dtype == torch.uint8 else t.float()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std
'''
FUNCTIONAL_STANDIN = '''import numpy as np
import torch


def pil_to_tensor(pic):
    arr = np.asarray(pic)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def gaussian_blur(x, kernel_size, sigma=None):
    raise NotImplementedError("torchvision stand-in: gaussian_blur is not needed by this benchmark")
'''


# ------------------------------------------------------------------------------------------- reference install
def reference_dir(base: str | None, commit: str) -> Path:
    return Path(base or Path.home() / ".cache" / "sd-lora-suite" / f"reference-sd-scripts-{commit[:12]}")


def _git(git_dir: str, *args: str, binary: bool = False):
    out = subprocess.run(["git", "--git-dir", git_dir, *args], capture_output=True, check=False)
    if out.returncode != 0:
        return None
    return out.stdout if binary else out.stdout.decode()


def export_source(src: str, commit: str, dest: Path) -> int:
    """Write the files of `commit` from a git directory or URL into `dest`; returns how many were skipped
    (objects absent from a partial mirror: none of them is Python code the trainers import)."""
    git_dir = src
    if "://" in src:  # a URL: clone it first
        clone = dest.parent / "clone.git"
        subprocess.run(["git", "clone", "--bare", "--quiet", src, str(clone)], check=True)
        git_dir = str(clone)
    elif (Path(src) / ".git").is_dir():
        git_dir = str(Path(src) / ".git")
    listing = _git(git_dir, "ls-tree", "-r", "-z", commit)
    if listing is None:
        raise ValueError(f"--reference_src {src}: commit {commit} not found (need a git directory or URL holding it)")
    skipped = 0
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        _, kind, sha = meta.split()
        if kind != "blob":
            continue
        data = _git(git_dir, "cat-file", "blob", sha, binary=True)
        if data is None:
            skipped += 1
            continue
        target = dest / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return skipped


def install_reference(src: str, commit: str, base: Path) -> tuple[Path, Path, dict[str, str]]:
    """(python of the reference venv, its source folder, extra environment); installs once (`.complete`)."""
    source, venv = base / "src", base / "venv"
    python = venv / "bin" / "python"
    if not (base / ".complete").exists():
        shutil.rmtree(base, ignore_errors=True)
        source.mkdir(parents=True)
        skipped = export_source(src, commit, source)
        log(f"sd-scripts {commit[:12]} exported to {source} ({skipped} absent large files skipped)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        reqs = [line.strip() for line in (source / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith(("#", "-e"))]
        reqs = [r.replace("opencv-python==", "opencv-python-headless==") for r in reqs]
        cmd = [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", "-q", f"torch=={TORCH_VERSION}",
               *reqs]
        log("installing the reference requirements: " + " ".join(cmd[4:]))
        subprocess.run(cmd, check=True)
        write_torchvision_standin(base / "standin")
        (base / ".complete").write_text(commit)
    env = {}
    check = subprocess.run([str(python), "-c", "from torchvision import transforms"], capture_output=True)
    if check.returncode != 0:
        env["PYTHONPATH"] = str(base / "standin")
    return python, source, env


def write_torchvision_standin(folder: Path) -> None:
    pkg = folder / "torchvision"
    (pkg / "transforms").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(TORCHVISION_STANDIN)
    (pkg / "transforms" / "__init__.py").write_text(TRANSFORMS_STANDIN)
    (pkg / "transforms" / "functional.py").write_text(FUNCTIONAL_STANDIN)


# ------------------------------------------------------------------------------------------- inputs
def prepare_inputs(family: str, size: str, work: Path, resolution: int, images: int) -> dict[str, str]:
    """In a child process (torch stays out of this one): checkpoint, tokenizers, dataset TOML."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from bench.compare_reference import _prepare; "
            "_prepare(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))")
    subprocess.run([sys.executable, "-c", code, str(ROOT), family, size, str(work), str(resolution), str(images)],
                   check=True)
    return json.loads((work / f"inputs_{family}_{size}.json").read_text())


def _prepare(family: str, size: str, work: str, resolution: int, images: int) -> None:
    import numpy as np
    from PIL import Image

    from tools.make_tiny_model import make_model, tokenizer_cache_dir_for

    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    ckpt = work_dir / f"{family}_{size}.safetensors"
    if not ckpt.exists():
        tmp = ckpt.with_name(".tmp-" + ckpt.name)
        make_model(family, size, "ldm", tmp, seed=0)
        shutil.move(str(tokenizer_cache_dir_for(tmp)), str(tokenizer_cache_dir_for(ckpt)))
        os.replace(tmp, ckpt)
    img_dir = work_dir / f"images_{resolution}"
    img_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(images):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(img_dir / f"{i}.png")
        (img_dir / f"{i}.txt").write_text("a photo of sks")
    toml = work_dir / f"dataset_{resolution}.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = {resolution}\nbatch_size = 1\n'
                    f'\n[[datasets.subsets]]\nimage_dir = "{img_dir.as_posix()}"\nnum_repeats = 50\n')
    info = {"checkpoint": str(ckpt), "tokenizers": str(tokenizer_cache_dir_for(ckpt)), "dataset": str(toml)}
    (work_dir / f"inputs_{family}_{size}.json").write_text(json.dumps(info))


def train_flags(setting: str, inputs: dict[str, str], out: Path, steps: int) -> list[str]:
    """The command line both trainers get (sd-scripts' option names; ours are the same)."""
    return ["--pretrained_model_name_or_path", inputs["checkpoint"], "--tokenizer_cache_dir", inputs["tokenizers"],
            "--dataset_config", inputs["dataset"], "--output_dir", str(out), "--output_name", "lora",
            "--save_model_as", "safetensors", "--network_module", "networks.lora", "--network_dim", "4",
            "--network_alpha", "4", "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--max_train_steps",
            str(steps), "--seed", "0", "--cache_latents", "--max_data_loader_n_workers", "0", "--sdpa",
            *SETTINGS[setting][1]]


# ------------------------------------------------------------------------------------------- measuring
def step_times(stamps: dict[int, float]) -> list[float]:
    """Seconds of each step from the times the bar first showed k/N (step 1: from the first 0/N line)."""
    counts = sorted(stamps)
    return [stamps[b] - stamps[a] for a, b in zip(counts, counts[1:]) if b == a + 1]


def read_progress(stream, stamps: dict[int, float], log_file) -> None:
    """Timestamp the first appearance of each `steps: ... k/N` as the bytes arrive (tqdm ends lines with \\r)."""
    pending = ""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        now = time.perf_counter()
        text = chunk.decode(errors="replace")
        log_file.write(text)
        pending += text
        *lines, pending = re.split(r"[\r\n]", pending)
        for line in lines:
            m = STEP_LINE.search(line)
            if m:
                stamps.setdefault(int(m.group(1)), now)


def run_measured(cmd: list[str], cwd: Path, env: dict[str, str], log_path: Path,
                 timeout: float | None = None) -> dict:
    """Run one program; wall seconds, peak RSS (GiB, its own), per-step seconds. With `timeout`, a run still going
    then is stopped and reported with `timed_out` (its wall time and peak RSS so far are lower bounds)."""
    stamps: dict[int, float] = {}
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.PIPE)
        reader = threading.Thread(target=read_progress, args=(proc.stderr, stamps, log_file))
        reader.start()
        timed_out, hwm_kib = False, 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG if timeout else 0)
            if pid:
                break
            hwm_kib = max(hwm_kib, _vm_hwm_kib(proc.pid))
            if time.perf_counter() - start > timeout:
                timed_out = True
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
        reader.join()
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if timed_out:
        return {"wall_s": round(wall, 2), "peak_rss_gib": round(max(hwm_kib, usage.ru_maxrss) / 2**20, 3),
                "step_times": step_times(stamps), "s_per_step": None, "timed_out": True}
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}); log {log_path}:\n{tail}")
    times = step_times(stamps)
    return {"wall_s": round(wall, 2), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3), "step_times": times,
            "s_per_step": round(statistics.median(times[1:]), 3) if len(times) > 1 else None}


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident memory so far (Linux /proc; 0 elsewhere)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def program_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    # TQDM_MININTERVAL=0: both progress bars print every step (tqdm >= 4.66 reads TQDM_* defaults from the
    # environment); by default an update within 0.1 s of the last one is not shown and its step would be lost
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", TQDM_MININTERVAL="0")
    env.update(extra)
    return env


def compare_training(settings: list[str], size: str, steps: int, work: Path, ours_python: str,
                     reference: tuple[Path, Path, dict[str, str]] | None, resolution: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    for setting in settings:
        family = SETTINGS[setting][0]
        inputs = prepare_inputs(family, size, work, resolution, images=4)
        script = TRAIN_SCRIPTS[family]
        sides = {"ours": (ours_python, ROOT, program_env({"PYTHONPATH": str(ROOT)}))}
        if reference is not None:
            ref_python, ref_src, ref_env = reference
            sides["theirs"] = (str(ref_python), ref_src,
                               program_env({**ref_env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ref_src),
                                                                                   ref_env.get("PYTHONPATH")]))}))
        order = ["theirs", "ours", "ours", "theirs"] if "theirs" in sides else ["ours", "ours"]
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        (work / "runs").mkdir(exist_ok=True)
        for i, name in enumerate(order):
            python, cwd, env = sides[name]
            out = work / "runs" / f"{setting}_{name}_{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [python, str(Path(cwd) / script), *train_flags(setting, inputs, out, steps)]
            log(f"{setting}: {name} run {len(runs[name]) + 1} ...")
            r = run_measured(cmd, Path(cwd), env, work / "runs" / f"{setting}_{name}_{i}.log")
            if not (out / "lora.safetensors").exists():
                raise RuntimeError(f"{setting} {name}: no lora.safetensors in {out}")
            runs[name].append(r)
            log(f"  {r['s_per_step']} s/step, peak {r['peak_rss_gib']} GiB, {r['wall_s']} s to the saved file")
        results[setting] = summarize(runs)
    return results


def summarize(runs: dict[str, list[dict]]) -> dict:
    summary = {"runs": runs}
    for name, rs in runs.items():
        per_step = [t for r in rs for t in r["step_times"][1:]]
        summary[name] = {"s_per_step": round(statistics.median(per_step), 3) if per_step else None,
                         "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                         "wall_s": round(statistics.median(r["wall_s"] for r in rs), 2)}
    if "theirs" in runs:
        for key in ("s_per_step", "peak_rss_gib", "wall_s"):
            a, b = summary["ours"][key], summary["theirs"][key]
            summary.setdefault("ratio", {})[key] = round(a / b, 3) if a and b else None
    return summary


def compare_tools(size: str, work: Path, ours_python: str, reference: tuple[Path, Path, dict[str, str]] | None,
                  only: list[str] | None = None, timeout: float | None = None) -> dict[str, dict]:
    """bench_lora_tools' cases with both programs' scripts (SD1.5 layout), in the order theirs, ours. A run past
    `timeout` seconds is stopped: its time and peak memory so far are lower bounds (`timed_out`)."""
    tools_dir = work / "tools"
    subprocess.run([ours_python, str(ROOT / "bench" / "bench_lora_tools.py"), "--prepare_only", "--size", size,
                    "--workdir", str(tools_dir)], check=True, env=program_env({"PYTHONPATH": str(ROOT)}))
    sys.path.insert(0, str(ROOT))
    from bench.bench_lora_tools import cases

    results: dict[str, dict] = {}
    for case, argv in cases(tools_dir).items():
        if case.endswith("_cold") or (only and case not in only):
            continue
        results[case] = {}
        sides = [("ours", ours_python, ROOT, {"PYTHONPATH": str(ROOT)})]
        if reference is not None:
            sides.insert(0, ("theirs", str(reference[0]), reference[1],
                             {**reference[2], "PYTHONPATH": os.pathsep.join(filter(None, [str(reference[1]),
                                                                            reference[2].get("PYTHONPATH")]))}))
        for name, python, cwd, extra in sides:
            cmd = [python, str(Path(cwd) / argv[0]), *argv[1:]]
            if name == "theirs" and case == "merge_into_model":  # their merge must not overwrite the extract input
                cmd = [c.replace("merged.safetensors", "merged_ref.safetensors") for c in cmd]
            r = run_measured(cmd, Path(cwd), program_env(extra), work / f"tool_{case}_{name}.log", timeout)
            results[case][name] = {"wall_s": r["wall_s"], "peak_rss_gib": r["peak_rss_gib"],
                                   "timed_out": r.get("timed_out", False)}
            log(f"{case}: {name} {'stopped after ' if r.get('timed_out') else ''}{r['wall_s']} s, "
                f"{r['peak_rss_gib']} GiB")
        if "theirs" in results[case]:
            o, t = results[case]["ours"], results[case]["theirs"]
            # against a stopped run the ratios are upper bounds, printed with "<"
            results[case]["ratio"] = {k: round(o[k] / t[k], 3) for k in ("wall_s", "peak_rss_gib")}
            results[case]["ratio_is_bound"] = t["timed_out"]
    return results


# ------------------------------------------------------------------------------------------- output
def format_table(training: dict[str, dict], tools: dict[str, dict]) -> str:
    def cell(v, fmt="{:.2f}"):
        return "-" if v is None else fmt.format(v)

    lines = []
    if training:
        lines.append("| setting | ours s/step | theirs s/step | ratio | ours peak GiB | theirs peak GiB | ratio | "
                     "ours s to file | theirs s to file | ratio |")
        lines.append("| --- " * 10 + "|")
        for setting, r in training.items():
            o, t, q = r["ours"], r.get("theirs", {}), r.get("ratio", {})
            lines.append(f"| {setting} | {cell(o['s_per_step'])} | {cell(t.get('s_per_step'))} | "
                         f"{cell(q.get('s_per_step'))} | {cell(o['peak_rss_gib'])} | {cell(t.get('peak_rss_gib'))} | "
                         f"{cell(q.get('peak_rss_gib'))} | {cell(o['wall_s'], '{:.0f}')} | "
                         f"{cell(t.get('wall_s'), '{:.0f}')} | {cell(q.get('wall_s'))} |")
    if tools:
        lines += ["", "| tool | ours s | theirs s | ratio | ours peak GiB | theirs peak GiB | ratio |",
                  "| --- " * 7 + "|"]
        for case, r in tools.items():
            o, t, q = r["ours"], r.get("theirs", {}), r.get("ratio", {})
            bound = ">" if t.get("timed_out") else ""
            below = "<" if r.get("ratio_is_bound") else ""
            lines.append(f"| {case} | {cell(o['wall_s'])} | {bound}{cell(t.get('wall_s'))} | "
                         f"{below}{cell(q.get('wall_s'))} | {cell(o['peak_rss_gib'])} | "
                         f"{bound}{cell(t.get('peak_rss_gib'))} | {below}{cell(q.get('peak_rss_gib'))} |")
    return "\n".join(lines)


def log(message: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="sd15_fp32",
                   help=f"comma list of {', '.join(SETTINGS)}, or all (default sd15_fp32)")
    p.add_argument("--steps", type=int, default=6, help="training steps per run (the first is left out; default 6)")
    p.add_argument("--size", default="full", choices=["full", "tiny"],
                   help="model size (tiny: only our program can load it; for checking the plumbing)")
    p.add_argument("--resolution", type=int, default=512, help="image side (default 512)")
    p.add_argument("--workdir", required=True, help="folder for models, datasets, outputs and logs")
    p.add_argument("--reference_src", default=REFERENCE_REPO,
                   help="sd-scripts git URL or local git directory holding the pinned commit")
    p.add_argument("--reference_commit", default=REFERENCE_COMMIT, help="sd-scripts commit (default the pinned one)")
    p.add_argument("--reference_dir", default=None,
                   help="where the reference source and venv live (default ~/.cache/sd-lora-suite/reference-...)")
    p.add_argument("--no_reference", action="store_true", help="run only our program (plumbing checks)")
    p.add_argument("--no_training", action="store_true", help="skip the trainers (with --tools: tools only)")
    p.add_argument("--tools", action="store_true", help="also compare the LoRA tools (merge, svd merge, extract, resize)")
    p.add_argument("--tool_cases", default=None,
                   help="comma list of bench_lora_tools cases for --tools (default all): merge_into_model, "
                        "merge_two_loras, svd_merge_rank4, extract_dim4, resize_rank2")
    p.add_argument("--tool_timeout", type=float, default=None,
                   help="stop a tool run after this many seconds and report lower bounds (default: no limit)")
    p.add_argument("--json", default=None, help="write the results here")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    settings = list(SETTINGS) if args.settings == "all" else args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"error: --settings {','.join(unknown)}: unknown; choose from {', '.join(SETTINGS)} or all")
    if args.steps < 3:
        raise SystemExit("error: --steps must be >= 3 (the first step is warm-up)")
    if args.size == "tiny" and not args.no_reference:
        raise SystemExit("error: --size tiny needs --no_reference (sd-scripts loads only full-size checkpoints)")
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    reference = None
    if not args.no_reference:
        reference = install_reference(args.reference_src, args.reference_commit,
                                      reference_dir(args.reference_dir, args.reference_commit))
    training = {} if args.no_training else compare_training(settings, args.size, args.steps, work, sys.executable,
                                                            reference, args.resolution)
    tools = compare_tools(args.size, work, sys.executable, reference,
                          args.tool_cases.split(",") if args.tool_cases else None,
                          args.tool_timeout) if args.tools else {}
    print(format_table(training, tools))
    report = {"reference_commit": args.reference_commit if reference else None, "size": args.size,
              "steps": args.steps, "resolution": args.resolution, "training": training, "tools": tools,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpus": os.cpu_count()}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
