"""Pluggable network modules (LoRA, DyLoRA) and the LoRA tools."""
