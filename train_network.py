"""Train a LoRA (or another kohya network module) for Stable Diffusion 1.x / 2.x; sd-scripts compatible.

    accelerate launch -q --config_file examples/accelerate/single_process.yaml train_network.py \
        --pretrained_model_name_or_path=model.safetensors \
        --dataset_config=data.toml --output_dir=out --output_name=my_lora --network_module=networks.lora ...

See docs/train_network.md for every option.
"""
from library.network_trainer import main

if __name__ == "__main__":
    main(sdxl=False)
