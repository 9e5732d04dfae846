"""Weights per half of the real Qwen3-VL checkpoints, counted from their configs: each model is
built by transformers on the meta device (no weights, no download) and its parameters summed per
half: the encoder holds `model.visual.*`, the language server `model.language_model.*` and
`lm_head.*` (nothing more when the embeddings are tied). Also the KV cache per token.

The architecture fields below are those of the checkpoints' config.json files on the Hugging Face
hub (Qwen/Qwen3-VL-*-Instruct), as published.

Run: .venv/bin/python bench/memory.py
"""

import torch
from goals import verdict
from transformers import AutoConfig, AutoModelForImageTextToText

VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16, temporal_patch_size=2,
              spatial_merge_size=2, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
              in_channels=3, hidden_act="gelu_pytorch_tanh")
TEXT = dict(head_dim=128, vocab_size=151936)
MOE = dict(num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[])
CHECKPOINTS = {  # name → (model_type, tied embeddings, text_config, vision_config)
    "Qwen3-VL-2B": ("qwen3_vl", True, dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                           num_attention_heads=16, num_key_value_heads=8),
                    dict(VISION, depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                         deepstack_visual_indexes=[5, 11, 17])),
    "Qwen3-VL-8B": ("qwen3_vl", False, dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                            num_attention_heads=32, num_key_value_heads=8),
                    dict(VISION, out_hidden_size=4096)),
    "Qwen3-VL-32B": ("qwen3_vl", False, dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                                             num_attention_heads=64, num_key_value_heads=8),
                     dict(VISION, out_hidden_size=5120)),
    "Qwen3-VL-30B-A3B": ("qwen3_vl_moe", False, dict(MOE, hidden_size=2048, intermediate_size=6144,
                                                     num_hidden_layers=48, num_attention_heads=32,
                                                     num_key_value_heads=4, moe_intermediate_size=768),
                         dict(VISION, out_hidden_size=2048)),
    "Qwen3-VL-235B-A22B": ("qwen3_vl_moe", False, dict(MOE, hidden_size=4096, intermediate_size=12288,
                                                       num_hidden_layers=94, num_attention_heads=64,
                                                       num_key_value_heads=4, moe_intermediate_size=1536),
                           dict(VISION, out_hidden_size=4096)),
}
GIB = 2**30
# The parameter counts their model cards publish (total, both halves), to check the count against.
PUBLISHED = {"Qwen3-VL-8B": 8.77e9}


def halves(model_type: str, tied: bool, text: dict, vision: dict) -> tuple[int, int, dict]:
    """(vision parameters, language parameters, text config) of one checkpoint."""
    config = AutoConfig.for_model(model_type, tie_word_embeddings=tied, text_config={**TEXT, **text,
                                  "tie_word_embeddings": tied}, vision_config=vision)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    seen, counts = set(), {"vision": 0, "language": 0}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # a tied lm_head is the embedding itself
            continue
        seen.add(id(p))
        counts["vision" if ".visual." in f".{name}" else "language"] += p.numel()
    return counts["vision"], counts["language"], {**TEXT, **text}


def main() -> None:
    print("| checkpoint | encoder weights (bf16) | language weights (bf16) | KV cache per 1k tokens (bf16) |\n"
          "|---|---|---|---|")
    off = 0.0
    for name, (kind, tied, text, vision) in CHECKPOINTS.items():
        v, lang, t = halves(kind, tied, text, vision)
        if name in PUBLISHED:
            off = max(off, abs(v + lang - PUBLISHED[name]) / PUBLISHED[name])
        kv = 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * t["head_dim"] * 2 * 1024
        print(f"| {name} | {v / 1e9:.2f} B params, {2 * v / GIB:.2f} GiB | {lang / 1e9:.2f} B params, "
              f"{2 * lang / GIB:.1f} GiB | {kv / 2**20:.0f} MiB |")
    print(f"goal: parameter_count_vs_model_card {off:.4f} (target <= 0.01) {verdict(off, '<=', 0.01)}")


if __name__ == "__main__":
    main()
