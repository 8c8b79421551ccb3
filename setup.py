"""Installs the `library` and `networks` packages so the scripts and user code can import them."""
from setuptools import setup

setup(
    name="sd-lora-suite",
    version="0.1.0",
    description="LoRA training and tools for Stable Diffusion 1.x, 2.x and SDXL (kohya sd-scripts compatible)",
    packages=["library", "library.dataprep", "networks"],
    package_data={"networks": ["lora_target_tables/*.json.gz"]},
    python_requires=">=3.10",
    install_requires=[line.strip() for line in open("requirements.txt") if line.strip() and not line.startswith("#")],
)
