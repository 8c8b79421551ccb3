"""Generate images with Stable Diffusion 1.x/2.x and LoRA networks (see docs/gen_img_diffusers.md)."""
from library.gen_img import main

if __name__ == "__main__":
    main(sdxl=False)
