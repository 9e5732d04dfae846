"""Checkpoints of every served Qwen3-VL variant, written by transformers itself (from_config, a
seeded init, save_pretrained in shards), and the hub's on-disk MoE expert layout."""

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from qwen3vl_epd.checkpoint.tiny import build_tiny

TIED = {"tie_word_embeddings": True, "text_config": {"tie_word_embeddings": True}}


def _levels(*indexes: int) -> dict:
    return {"deepstack_visual_indexes": list(indexes)}


# name → build_tiny arguments (every one sharded); "hub" re-stores its MoE experts as the hub does
VARIANTS = {
    "dense_3_levels": dict(dense=True),
    "dense_1_level_tied": dict(dense=True, overrides={**TIED, "vision_config": _levels(1)}),
    "dense_0_levels": dict(dense=True, overrides={"vision_config": _levels()}),
    "moe_1_level_top1": dict(overrides={"text_config": {"num_experts_per_tok": 1}, "vision_config": _levels(2)}),
    "moe_0_levels_tied": dict(overrides={**TIED, "vision_config": _levels()}),
    "moe_mlp_only_layers": dict(overrides={"text_config": {"mlp_only_layers": [1, 3]}}),
    "moe_hub_expert_layout": dict(hub=True),
}


def build_variant(name: str, root: Path) -> Path:
    """The variant's checkpoint under root (built once)."""
    out = root / name
    if (out / "config.json").exists():
        return out
    kw = dict(VARIANTS[name])
    hub = kw.pop("hub", False)
    build_tiny(out, seed=len(name), max_shard_size="20MB", **kw)
    if hub:
        to_hub_expert_layout(out)
    return out


def to_hub_expert_layout(checkpoint: Path) -> None:
    """Store the fused MoE experts transposed ([E, H, 2I] and [E, I, H]), as hub checkpoints do."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        path = checkpoint / shard
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for k, t in tensors.items():
            if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                tensors[k] = t.transpose(1, 2).contiguous()
        save_file(tensors, str(path), metadata={"format": "pt"})
