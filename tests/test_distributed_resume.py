"""State and resume with several processes: a DyLoRA run on two "machines" (torchrun --nnodes 2 on 127.0.0.1)
resumed by 2 processes on one machine ends with the weights of the uninterrupted run; resumed by 1 process it
warns. DyLoRA trains a random rank per step (the same in every process) and leaves parameters without gradients
(DDP's find_unused_parameters path)."""
from __future__ import annotations

import logging

import torch

from library.file_io import load_state_dict
from tests.dist_helpers import AUGMENT, CAPTIONS, COLOURS, free_port, run, torchrun
from tests.train_helpers import base_args, solid_dataset, tiny_model_dir, train

_TRAIN = ("--max_train_epochs", "3", "--save_state", "--save_every_n_epochs", "1", "--noise_offset", "0.05",
          "--network_dropout", "0.1", "--network_module", "networks.dylora", "--network_args", "unit=2")


def test_two_machines_then_resumed_by_two_processes(tmp_path, caplog):
    data = solid_dataset(tmp_path / "d", colours=COLOURS, caption=CAPTIONS, batch_size=2, extra_general=AUGMENT)
    full = base_args(tiny_model_dir(), data, tmp_path / "full", *_TRAIN)
    port = free_port()
    outputs = run([torchrun(1, nnodes=2, node_rank=rank, port=port) + ["train_network.py", *full] for rank in (0, 1)])
    assert "DistributedDataParallel over 2 processes (gloo): find_unused_parameters=True" in outputs[0]
    state = tmp_path / "full" / "lora-000001-state"
    resumed = base_args(tiny_model_dir(), data, tmp_path / "resumed", *_TRAIN, "--resume", str(state))
    run([torchrun(2) + ["train_network.py", *resumed]])
    final, weights = (load_state_dict(tmp_path / d / "lora.safetensors") for d in ("full", "resumed"))
    for key, value in final.items():  # the same processes redo the same work: identical up to float noise
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-7)

    with caplog.at_level(logging.WARNING):
        one = train(base_args(tiny_model_dir(), data, tmp_path / "one", *_TRAIN, "--resume", str(state)))
    assert "saved by 2 processes, resumed by 1" in caplog.text
    # from step 2 (end of epoch 1), epochs 2 and 3 at 3 steps each (5 samples at batch 2 for one process)
    assert one.progress.global_step == 8 and one.progress.epoch == 3
