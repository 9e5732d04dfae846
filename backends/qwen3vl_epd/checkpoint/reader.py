"""Hugging Face checkpoint reading and per-half weight loading.

python -m qwen3vl_epd.checkpoint --tiny DIR [--dense] writes the embedded tiny checkpoint
(checkpoint/tiny.py; --dense: the dense Qwen3-VL architecture instead of the MoE one)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
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

def load_config(checkpoint_dir: str | os.PathLike):
    """The checkpoint's Qwen3VLMoeConfig; a missing checkpoint is one clear error."""
    if not (Path(checkpoint_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"no checkpoint at {checkpoint_dir} (no config.json): set EPD_CHECKPOINT to a local Qwen3-VL "
            "checkpoint directory, or build the embedded tiny one with scripts/setup")
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

    def tensors(self, prefixes: tuple[str, ...], strip: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """(name with `strip` removed, host tensor) for each name starting with `prefixes`, one at a
        time. safetensors maps the file: opening it per tensor unmaps each tensor's pages once the
        caller has moved it on, so loading to a device holds one tensor's pages, not a shard's."""
        for name in self.names(prefixes):
            with safe_open(str(self.files[name]), framework="pt") as f:
                yield (name[len(strip):] if strip and name.startswith(strip) else name), f.get_tensor(name)


def load_module(module: torch.nn.Module, reader: CheckpointReader, prefix: str, dtype: torch.dtype,
                device: str | torch.device) -> torch.nn.Module:
    """Fill a module built on the meta device, tensor by tensor: each one goes to the device as it
    is read, and is converted and (experts) transposed there. Missing or unexpected names are a
    RuntimeError, as load_state_dict(strict=True) says them."""
    device = torch.device(device)
    expected = {name: t.shape for name, t in module.state_dict().items()}
    seen = set()
    for name, mapped in reader.tensors((prefix,), strip=prefix):
        if name not in expected:
            raise RuntimeError(f"unexpected tensor {prefix}{name} in {reader.dir}")
        t = mapped.to(device)
        if t.is_floating_point():
            t = t.to(dtype)
        if name.endswith(_EXPERT_SUFFIXES) and t.shape != expected[name]:
            t = t.transpose(1, 2).contiguous()
        if t.data_ptr() == mapped.data_ptr():
            # Still the file's mapping (CPU, no conversion): its pages would be read from disk at
            # first touch (an embedding row per new token, milliseconds each) and could be evicted.
            t = t.clone()
        if t.shape != expected[name]:
            raise RuntimeError(f"{prefix}{name}: shape {tuple(t.shape)} in the checkpoint, "
                               f"{tuple(expected[name])} expected")
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        if leaf in sub._parameters:
            sub._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        else:
            sub._buffers[leaf] = t
        seen.add(name)
    if missing := sorted(set(expected) - seen):
        raise RuntimeError(f"{reader.dir} lacks {len(missing)} tensors of {prefix}*: {', '.join(missing[:5])}")
    # Non-persistent buffers (rotary inv_freq) are not in checkpoints; rebuild them on the device.
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.is_meta:
                fresh = type(sub)(sub.config).to(device)
                sub.register_buffer(name, getattr(fresh, name), persistent=False)
    return module
