"""Shared helpers of the training tests: tiny models on disk, tiny datasets, in-process training runs."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

MODEL_CACHE = Path(tempfile.gettempdir()) / f"sd-lora-suite-test-models-{os.getuid()}"


def tiny_model_dir(root: Path | None = None, arch: str = "sd1") -> str:
    """A tiny Diffusers model folder of `arch`, built once and shared by the test processes (atomic rename)."""
    out = MODEL_CACHE / f"tiny_{arch}_v1"
    if not out.is_dir():
        from tools.make_tiny_model import make_model

        MODEL_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=MODEL_CACHE))
        make_model(arch, "tiny", "diffusers", tmp / "model")
        try:
            os.replace(tmp / "model", out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp / "model", ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def solid_dataset(root: Path, colours=((220, 30, 30),), size: int = 64, caption: str = "sks",
                  repeats: int = 1, batch_size: int = 1, extra_general: str = "") -> str:
    """Images of solid colours with one caption; returns the dataset TOML path."""
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(colours):
        Image.fromarray(np.full((size, size, 3), colour, np.uint8)).save(img_dir / f"{i}.png")
        (img_dir / f"{i}.caption").write_text(caption if isinstance(caption, str) else caption[i])
    toml = root / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".caption"\n{extra_general}\n[[datasets]]\nresolution = {size}\n'
                    f'batch_size = {batch_size}\n[[datasets.subsets]]\nimage_dir = "{img_dir.as_posix()}"\n'
                    f"num_repeats = {repeats}\n")
    return str(toml)


def parse(argv: list[str], sdxl: bool = False) -> argparse.Namespace:
    from library import train_args
    from library.dataset_config import add_dataset_arguments

    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    train_args.add_all_training_arguments(parser)
    return train_args.parse_args(parser, argv)


def base_args(model: str, dataset: str, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--dataset_config", dataset, "--output_dir", str(out),
            "--output_name", "lora", "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
            "--learning_rate", "1e-3", "--seed", "1", "--max_data_loader_n_workers", "0", "--cache_latents",
            *extra]


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state; each in-process run of the tests starts a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def train(argv: list[str], sdxl: bool = False):
    from library.network_trainer import train as run

    reset_accelerate()
    return run(parse(argv, sdxl), sdxl)


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """Make the trainer's loss NaN at optimizer step `step` (1-based) of the next runs."""
    from library import network_trainer

    original_loss = network_trainer.NetworkTrainer.loss

    def loss(self, batch):
        value = original_loss(self, batch)
        return value * float("nan") if self.progress.global_step == step - 1 else value

    monkeypatch.setattr(network_trainer.NetworkTrainer, "loss", loss)
