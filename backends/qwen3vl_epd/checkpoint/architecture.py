"""Which transformers classes serve a checkpoint, chosen from its config's model_type; a clear
refusal for checkpoints this server does not serve."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen3vl_epd.errors import EpdError


class UnsupportedCheckpointError(EpdError):
    """A checkpoint of a kind this server does not serve; raised once, at load."""

    code = "UNSUPPORTED"


@dataclass(frozen=True)
class Architecture:
    """The transformers classes of one Qwen3-VL family member (the halves build their parts from them)."""

    name: str
    text_model: type  # the decoder stack (model.language_model.*)
    vision_model: type  # the vision tower with its mergers (model.visual.*)
    model: type  # owner of get_rope_index (M-RoPE)
    apply_rotary_pos_emb: object
    for_generation: type  # the whole model (tests compare against it)


def _dense() -> Architecture:
    from transformers.models.qwen3_vl import modeling_qwen3_vl as m

    return Architecture("Qwen3-VL (dense)", m.Qwen3VLTextModel, m.Qwen3VLVisionModel, m.Qwen3VLModel,
                        m.apply_rotary_pos_emb, m.Qwen3VLForConditionalGeneration)


def _moe() -> Architecture:
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as m

    return Architecture("Qwen3-VL-MoE", m.Qwen3VLMoeTextModel, m.Qwen3VLMoeVisionModel, m.Qwen3VLMoeModel,
                        m.apply_rotary_pos_emb, m.Qwen3VLMoeForConditionalGeneration)


FAMILIES = {"qwen3_vl": _dense, "qwen3_vl_moe": _moe}


def architecture(config, checkpoint_dir: str | Path | None = None) -> Architecture:
    """The Architecture of a checkpoint's config; UnsupportedCheckpointError naming what is not served."""
    kind = getattr(config, "model_type", None)
    if kind not in FAMILIES:
        raise UnsupportedCheckpointError(
            f"checkpoint model_type {kind!r} is not served: this server serves Qwen3-VL checkpoints, model_type "
            f"{' or '.join(repr(k) for k in FAMILIES)}")
    quantized = getattr(config, "quantization_config", None) or getattr(config.text_config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        raise UnsupportedCheckpointError(
            f"quantized checkpoints ({method}) are not served: use the bf16/fp16/fp32 weights")
    if checkpoint_dir is not None and not (Path(checkpoint_dir) / "preprocessor_config.json").is_file():
        raise UnsupportedCheckpointError(
            f"{checkpoint_dir} has no image processor (preprocessor_config.json): video-only checkpoints are not "
            "served; this server takes images")
    return FAMILIES[kind]()
