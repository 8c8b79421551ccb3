#!/usr/bin/env bash
# The README's first command: a complete LoRA training on bundled data, no download, about a minute on a CPU.
#   1. sets up the environment (tools/setup_env.sh, once),
#   2. builds a tiny random-weight SD 1.x model into output/tiny_sd1 (once),
#   3. trains a LoRA on examples/tiny_lora (8 images with captions, dataset.toml, args.toml) with
#      `accelerate launch ... train_network.py`, saving every 2 epochs with the training state and sample images,
#   4. prints where the LoRA file and the sample images are.
# Extra arguments go to train_network.py (e.g. `bash run_demo.sh --max_train_epochs 2`);
# `OMP_NUM_THREADS=2 bash run_demo.sh` uses two threads.
# The same run on a real model: see docs/train_network.md ("Real model").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
venv="$(bash tools/setup_env.sh)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
model="output/tiny_sd1"
if [ ! -f "$model/model_index.json" ]; then
  echo "building the tiny demo model in $model" >&2
  "$venv/bin/python" tools/make_tiny_model.py --arch sd1 --size tiny --format diffusers --output "$model"
fi
# One OpenMP thread unless OMP_NUM_THREADS says otherwise: on a machine where another process holds a core, two
# threads wait on each other at every operation (docs/benchmarks.md, "CPU threads"). `-q` and the bundled config:
# no accelerate warning about defaults, and a bad option ends with the one-line error.
"$venv/bin/accelerate" launch -q --config_file examples/accelerate/single_process.yaml --cpu \
  --num_cpu_threads_per_process "${OMP_NUM_THREADS:-1}" train_network.py \
  --config_file examples/tiny_lora/args.toml \
  --dataset_config examples/tiny_lora/dataset.toml \
  --pretrained_model_name_or_path "$model" \
  "$@"
