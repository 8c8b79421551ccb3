"""Cache the VAE latents of a dataset to disk (`<image>.npz`) before training; reused by --cache_latents_to_disk.

    accelerate launch -q --config_file examples/accelerate/single_process.yaml tools/cache_latents.py --sdxl \
        --pretrained_model_name_or_path=sdxl.safetensors --dataset_config=data.toml

Takes the training scripts' options; see docs/cache_latents.md.
"""
import os
import sys

if __package__ in (None, ""):  # run as `python <folder>/<script>.py`: make library/ and networks/ importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cache_tools import main

if __name__ == "__main__":
    main("latents")
