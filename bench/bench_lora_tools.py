"""Benchmark of the LoRA tools: wall time and peak RSS of each, on random models of a chosen size.

    python bench/bench_lora_tools.py --size full --arch sd1 --workdir /tmp/lora_bench [--json out.json]

Creates a random-weight checkpoint (tools/make_tiny_model.py's `make_model`) and random LoRAs named for it,
then runs each tool in its own process (so its peak RSS is its own, read from `os.wait4`):

| case | command |
| --- | --- |
| merge_into_model | merge_lora.py --sd_model base --models lora_a --ratios 0.8 |
| merge_into_model_cold | the same with an empty LoRA target-table cache (first run for a model size) |
| merge_two_loras | merge_lora.py --models lora_a lora_b --ratios 0.6 0.4 |
| svd_merge_rank4 | svd_merge_lora.py --models lora_a lora_c --new_rank 4 (ranks 4 and 8) |
| extract_dim4 | extract_lora_from_models.py --model_org base --model_tuned merged --dim 4 |
| resize_rank2 | resize_lora.py --model lora_c --new_rank 2 |

and prints a table (and writes JSON with --json). The targets for a full SD1.5-size model are in
docs/merge_lora.md. Full size needs about 9 GB of disk and several GB of memory: run it on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGETS = {  # full SD1.5 size, from the issue: (seconds, GiB peak RSS or None)
    "merge_into_model": (11.0, 6.2),
    "merge_into_model_cold": (11.0, 6.2),
    "merge_two_loras": (2.0, None),
    "svd_merge_rank4": (28.0, 1.3),
    "extract_dim4": (36.0, 6.2),
}


def random_lora_file(arch: str, size: str, rank: int, path: Path, seed: int, conv: bool = False) -> None:
    """A LoRA with random factors for every LierLa (plus C3Lier with `conv`) layer of `arch` at `size`."""
    import torch
    from safetensors.torch import save_file

    from library.sd_configs import build_models
    from networks.lora_names import lora_targets

    models = build_models(arch, size, meta=True, tokenizers=False)
    targets = lora_targets(models.text_encoders if models.is_sdxl else models.text_encoders[0], models.unet,
                           include_conv3x3=conv)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in targets.items():
        shape = tuple(t.module.weight.shape)
        r = min(rank, shape[0], shape[1])
        kernel = shape[2:] if len(shape) == 4 else ()
        sd[f"{name}.lora_down.weight"] = torch.randn(r, shape[1], *kernel, generator=g) * 0.01
        sd[f"{name}.lora_up.weight"] = torch.randn(shape[0], r, *([1, 1] if kernel else []), generator=g) * 0.01
        sd[f"{name}.alpha"] = torch.tensor(float(r))
    save_file(sd, str(path), metadata={"ss_network_dim": str(rank), "ss_network_module": "networks.lora"})


def run_measured(argv: list[str], extra_env: dict | None = None) -> dict:
    """Run a tool in a child process; its wall time and peak RSS (GiB).

    Linux keeps a process's RSS high-water mark across fork + exec, so the parent must stay small (it never
    imports torch: the models are prepared in another child) for `ru_maxrss` to be the tool's own peak.
    """
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stderr = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}):\n{stderr[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_gib": round(usage.ru_maxrss / 2 ** 20, 3)}


def cases(work: Path) -> dict[str, list[str]]:
    f = lambda name: str(work / name)  # noqa: E731
    return {
        "merge_into_model": ["networks/merge_lora.py", "--sd_model", f("base.safetensors"), "--models",
                             f("lora_a.safetensors"), "--ratios", "0.8", "--save_to", f("merged.safetensors")],
        "merge_into_model_cold": ["networks/merge_lora.py", "--sd_model", f("base.safetensors"), "--models",
                                  f("lora_a.safetensors"), "--ratios", "0.8", "--save_to", f("merged_cold.safetensors")],
        "merge_two_loras": ["networks/merge_lora.py", "--models", f("lora_a.safetensors"), f("lora_b.safetensors"),
                            "--ratios", "0.6", "0.4", "--save_to", f("ab.safetensors")],
        "svd_merge_rank4": ["networks/svd_merge_lora.py", "--models", f("lora_a.safetensors"), f("lora_c.safetensors"),
                            "--ratios", "0.6", "0.4", "--new_rank", "4", "--save_to", f("svd.safetensors")],
        "extract_dim4": ["networks/extract_lora_from_models.py", "--model_org", f("base.safetensors"),
                         "--model_tuned", f("merged.safetensors"), "--dim", "4", "--save_to", f("extracted.safetensors")],
        "resize_rank2": ["networks/resize_lora.py", "--model", f("lora_c.safetensors"), "--new_rank", "2",
                         "--save_to", f("resized.safetensors")],
    }


def prepare(arch: str, size: str, work: Path) -> None:
    from tools.make_tiny_model import make_model

    work.mkdir(parents=True, exist_ok=True)
    for name in ("merged", "merged_cold", "ab", "svd", "extracted", "resized"):
        (work / f"{name}.safetensors").unlink(missing_ok=True)
    if not (work / "base.safetensors").exists():
        make_model(arch, size, "ldm", work / "base.safetensors", seed=0)
    random_lora_file(arch, size, 4, work / "lora_a.safetensors", seed=1)
    random_lora_file(arch, size, 4, work / "lora_b.safetensors", seed=2)
    random_lora_file(arch, size, 8, work / "lora_c.safetensors", seed=3, conv=True)
    warm_target_cache(work / "base.safetensors")


def warm_target_cache(model: Path) -> None:
    """Build the on-disk LoRA target table of the model once, as any earlier run of a tool would have."""
    from library import ldm_convert as lc
    from library.tensor_stream import TensorFile
    from networks.lora_checkpoint_ops import read_shapes, target_table

    with TensorFile(model) as f:
        target_table(lc.infer_layout(read_shapes(f), str(model)))


def format_table(results: dict[str, dict], size: str) -> str:
    lines = [f"{'case':<18} {'seconds':>8} {'peak RSS GiB':>13} {'target s':>9} {'target GiB':>11}"]
    for case, r in results.items():
        t_s, t_gib = TARGETS.get(case, (None, None)) if size == "full" else (None, None)
        lines.append(f"{case:<18} {r['seconds']:>8.2f} {r['peak_rss_gib']:>13.3f} "
                     f"{'' if t_s is None else t_s:>9} {'' if t_gib is None else t_gib:>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description="Time and peak memory of the LoRA tools.")
    parser.add_argument("--size", default="tiny", choices=("tiny", "full"), help="model size (default tiny)")
    parser.add_argument("--arch", default="sd1", choices=("sd1", "sd2", "sdxl"), help="architecture (default sd1)")
    parser.add_argument("--workdir", required=True, help="folder for the generated models and outputs")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--cases", nargs="*", default=None, help="run only these cases")
    parser.add_argument("--prepare_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    if args.prepare_only:
        prepare(args.arch, args.size, work)
        return {}
    run_measured([str(Path(__file__).resolve()), "--prepare_only", "--size", args.size, "--arch", args.arch,
                  "--workdir", str(work)])
    results = {}
    for case, cmd in cases(work).items():
        if args.cases and case not in args.cases:
            continue
        if args.arch == "sdxl":
            cmd = [c.replace("networks/merge_lora.py", "networks/sdxl_merge_lora.py") for c in cmd]
            if case == "extract_dim4":
                cmd.append("--sdxl")
        if args.arch == "sd2" and case in ("merge_into_model", "extract_dim4"):
            cmd.append("--v2")
        # "_cold": an empty target-table cache, as on the first run ever for this model size
        cold = {"SD_LORA_SUITE_CACHE": str(work / "empty_cache")} if case.endswith("_cold") else None
        if cold:
            shutil.rmtree(work / "empty_cache", ignore_errors=True)
        results[case] = run_measured(cmd, cold)
    print(format_table(results, args.size))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "size": args.size, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
