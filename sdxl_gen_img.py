"""Generate images with Stable Diffusion XL and LoRA networks (see docs/sdxl_gen_img.md)."""
from library.gen_img import main

if __name__ == "__main__":
    main(sdxl=True)
