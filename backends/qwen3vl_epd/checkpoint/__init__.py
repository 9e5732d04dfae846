"""Checkpoints: safetensors reading, the architecture a checkpoint names, the embedded tiny one."""
