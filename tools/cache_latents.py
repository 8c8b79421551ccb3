"""Cache the VAE latents of a dataset to disk (`<image>.npz`) before training; reused by --cache_latents_to_disk.

    accelerate launch --num_cpu_threads_per_process 1 tools/cache_latents.py --sdxl \
        --pretrained_model_name_or_path=sdxl.safetensors --dataset_config=data.toml

Takes the training scripts' options; see docs/cache_latents.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cache_tools import main  # noqa: E402

if __name__ == "__main__":
    main("latents")
