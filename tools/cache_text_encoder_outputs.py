"""Cache text encoder outputs to disk (`<image>_te_outputs.npz`) before training; reused by
--cache_text_encoder_outputs_to_disk.

    accelerate launch --num_cpu_threads_per_process 1 tools/cache_text_encoder_outputs.py --sdxl \
        --pretrained_model_name_or_path=sdxl.safetensors --dataset_config=data.toml

Takes the training scripts' options; see docs/cache_text_encoder_outputs.md.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from library.cache_tools import main  # noqa: E402

if __name__ == "__main__":
    main("text_encoder_outputs")
