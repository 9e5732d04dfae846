"""Checkpoints the tests and benches build: random weights, sizes chosen for what they measure."""

from pathlib import Path

# A vision tower where a batch of images takes seconds on this machine's CPUs (the issue's
# moderate size: hidden 384 x 6 blocks, DeepStack at blocks 1, 3, 5); the text side stays tiny.
SLOW_VISION = {"vision_config": {"depth": 6, "hidden_size": 384, "intermediate_size": 1536, "num_heads": 6,
                                 "deepstack_visual_indexes": [1, 3, 5]}}


def slow_vision_checkpoint(path: Path) -> Path:
    from qwen3vl_epd.checkpoint.tiny import build_tiny

    if not (path / "config.json").exists():
        build_tiny(path, overrides=SLOW_VISION)
    return path
