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


# The moderate checkpoint where per-token compute matters (issue 22's peer comparison): real-model
# head_dim 128, text hidden 768 x 6 layers, 16 experts top-4, vision hidden 384 x 6; 325 M parameters.
MODERATE = {
    "text_config": {"hidden_size": 768, "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
                    "head_dim": 128, "intermediate_size": 1536, "moe_intermediate_size": 256, "num_experts": 16,
                    "num_experts_per_tok": 4, "norm_topk_prob": True,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                        "mrope_interleaved": True}},
    "vision_config": {"depth": 6, "hidden_size": 384, "intermediate_size": 1536, "num_heads": 6, "out_hidden_size": 768,
                      "deepstack_visual_indexes": [1, 3, 5]},
}


def moderate_checkpoint(path: Path) -> Path:
    from qwen3vl_epd.checkpoint.tiny import build_tiny

    if not (path / "config.json").exists():
        build_tiny(path, overrides=MODERATE)
    return path
