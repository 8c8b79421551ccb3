"""`accelerate launch` with the CPU multi-process config file of docs/distributed.md: 2 processes x batch 2 with
gradient accumulation and the --ddp_* options train what 1 process x batch 4 trains."""
from __future__ import annotations

import re
import sys

from library.file_io import load_state_dict
from tests.dist_helpers import CAPTIONS, COLOURS, ROOT, free_port, max_difference, run
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train


def cpu_config(port: int) -> str:
    """The accelerate config file of docs/distributed.md ("Trying it on a CPU"), on a free port."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    block = text[text.index("## Trying it on a CPU"):].split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "distributed_type: MULTI_GPU" in block and "num_processes: 2" in block
    return re.sub(r"main_process_port: \d+", f"main_process_port: {port}", block)


# U-Net only with cached text-encoder outputs (each process encodes its share of the captions, then they are
# exchanged); flips still differ per sample
_TRAIN = ("--max_train_epochs", "2", "--gradient_accumulation_steps", "2", "--optimizer_type", "SGDNesterov",
          "--learning_rate", "1", "--network_train_unet_only", "--cache_text_encoder_outputs")
_FLIP = "flip_aug = true"


def test_accelerate_launch_with_accumulation_matches_one_process(tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text(cpu_config(free_port()))
    data2 = solid_dataset(tmp_path / "d2", colours=COLOURS, caption=CAPTIONS, repeats=2, batch_size=2,
                          extra_general=_FLIP)
    argv = base_args(tiny_model_dir(), data2, tmp_path / "two", *_TRAIN, "--ddp_timeout", "5",
                     "--ddp_gradient_as_bucket_view", "--ddp_static_graph")
    output = run([[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "train_network.py", *argv]])[0]
    assert "DistributedDataParallel over 2 processes (gloo): find_unused_parameters=False " \
           "gradient_as_bucket_view=True static_graph=True" in output
    assert output.count("LoRA saved:") == 1
    assert "text encoder outputs: 5 captions (3 computed, 0 from disk)" in output  # process 0's share of 5

    data4 = solid_dataset(tmp_path / "d4", colours=COLOURS, caption=CAPTIONS, repeats=2, batch_size=4,
                          extra_general=_FLIP)
    single = train(base_args(tiny_model_dir(), data4, tmp_path / "one", *_TRAIN))
    assert len(single.step_losses) == 4  # 10 samples: global batches 4, 4, 2; groups of 2 batches: 2 steps/epoch
    diff, scale = max_difference(load_state_dict(tmp_path / "two" / "lora.safetensors"),
                                 load_state_dict(tmp_path / "one" / "lora.safetensors"))
    assert diff < 2e-6 * scale, (diff, scale)
