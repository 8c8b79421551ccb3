"""The README's demo (examples/tiny_lora + run_demo.sh's arguments) and the docs' worked example, in process."""
from __future__ import annotations

import os
from pathlib import Path

from library.file_io import read_metadata
from tests.train_helpers import reset_accelerate, tiny_model_dir

ROOT = Path(__file__).resolve().parent.parent


def test_demo_config_trains_and_prints_where_outputs_are(tmp_path, capsys, monkeypatch):
    from library.network_trainer import main

    monkeypatch.chdir(ROOT)
    reset_accelerate()
    out = tmp_path / "tiny_lora"
    main(["--config_file", "examples/tiny_lora/args.toml", "--dataset_config", "examples/tiny_lora/dataset.toml",
          "--pretrained_model_name_or_path", tiny_model_dir(), "--output_dir", str(out),
          "--max_train_epochs", "2", "--sample_every_n_epochs", "1"])
    printed = capsys.readouterr().out
    assert f"LoRA saved: {out / 'tiny_lora.safetensors'}" in printed
    assert f"sample images: {out / 'sample'}" in printed
    assert sorted(p.name for p in out.iterdir()) == ["sample", "tiny_lora-state", "tiny_lora.report.json",
                                                     "tiny_lora.report.png", "tiny_lora.safetensors"]
    assert len(os.listdir(out / "sample")) == 4  # 2 prompts x 2 epochs
    meta = read_metadata(out / "tiny_lora.safetensors")
    assert meta["ss_steps"] == "32" and meta["ss_network_dim"] == "8" and meta["ss_lr_scheduler"] == "cosine"
    assert '"4_sks shape": {"n_repeats": 4, "img_count": 8}' in meta["ss_dataset_dirs"]


def test_run_demo_script_uses_the_bundled_files():
    script = (ROOT / "run_demo.sh").read_text()
    assert 'accelerate" launch -q --config_file examples/accelerate/single_process.yaml --cpu' in script
    assert '--num_cpu_threads_per_process "${OMP_NUM_THREADS:-1}" train_network.py' in script
    for path in ("examples/tiny_lora/args.toml", "examples/tiny_lora/dataset.toml", "tools/make_tiny_model.py"):
        assert path in script and (ROOT / path).exists()
    images = list((ROOT / "examples/tiny_lora/images/4_sks shape").glob("*.png"))
    assert len(images) == 8 and all(p.with_suffix(".caption").exists() for p in images)


def test_debug_dataset_prints_batches_and_trains_nothing(tmp_path, capsys, monkeypatch):
    """Only the dataset options and a tokenizer: no --network_module / --output_dir, no model loaded, the bucket
    table printed once."""
    from library import model_loading
    from library.network_trainer import main

    def no_model(*args, **kwargs):
        raise AssertionError("--debug_dataset loaded the model")

    monkeypatch.setattr(model_loading, "load_models", no_model)
    monkeypatch.chdir(ROOT)
    reset_accelerate()
    main(["--dataset_config", "examples/tiny_lora/dataset.toml", "--pretrained_model_name_or_path", tiny_model_dir(),
          "--debug_dataset"])
    printed = capsys.readouterr().out
    assert "step 16/16" in printed and printed.count("caption: 'sks, a red square'") == 4  # 4 repeats
    assert printed.count("dataset: examples/tiny_lora/dataset.toml") == 1
    assert "LoRA saved" not in printed
