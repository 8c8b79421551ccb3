"""Train a LoRA for SDXL: train_network.py's options plus text-encoder output caching; sd-scripts compatible.

    accelerate launch -q --config_file examples/accelerate/single_process.yaml sdxl_train_network.py \
        --pretrained_model_name_or_path=sdxl.safetensors \
        --dataset_config=data.toml --output_dir=out --output_name=my_lora --network_module=networks.lora \
        --network_train_unet_only --cache_text_encoder_outputs --cache_latents --gradient_checkpointing

See docs/sdxl_train_network.md.
"""
from library.network_trainer import main

if __name__ == "__main__":
    main(sdxl=True)
