"""The embedded tiny checkpoint and per-half weight loading."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qwen3vl_epd.checkpoint.reader import LM_HEAD_PREFIX, TEXT_PREFIX, VISION_PREFIX, CheckpointReader, load_config
from qwen3vl_epd.checkpoint.tiny import build_tiny
from qwen3vl_epd.encoder.vision import VisionEncoder
from qwen3vl_epd.language.model import LanguageModel

pytestmark = pytest.mark.unit


def test_config_has_real_token_ids_and_architecture(checkpoint):
    cfg = load_config(checkpoint)
    tc, vc = cfg.text_config, cfg.vision_config
    assert (tc.vocab_size, cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151936, 151655, 151652, 151653)
    gen = json.loads((Path(checkpoint) / "generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == {151645, 151643}
    assert len(vc.deepstack_visual_indexes) == 3
    assert tc.num_hidden_layers >= 4 and tc.num_experts == 8 and tc.num_experts_per_tok == 2
    assert tc.rope_parameters["mrope_interleaved"] is True
    pp = json.loads((Path(checkpoint) / "preprocessor_config.json").read_text())
    assert (pp["patch_size"], pp["temporal_patch_size"], pp["merge_size"], pp["image_mean"], pp["image_std"]) == (
        16, 2, 2, [0.5] * 3, [0.5] * 3)


def test_tokenizer_and_chat_template(processor):
    tok = processor.tokenizer
    assert tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>"]) == [
        151655, 151652, 151653, 151645]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}])
    assert prompt == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n<|im_start|>assistant\n"


def test_same_seed_gives_identical_bytes(checkpoint, tmp_path):
    again = build_tiny(tmp_path / "tiny", seed=0)
    names = sorted(p.name for p in Path(checkpoint).iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (again / name).read_bytes() == (Path(checkpoint) / name).read_bytes(), name
    other = build_tiny(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_each_half_loads_exactly_its_own_weights(checkpoint, encoder, language):
    names = set(CheckpointReader(checkpoint).names(("",)))
    vision = {VISION_PREFIX + k for k in encoder.visual.state_dict()}
    text = {TEXT_PREFIX + k for k in language.model.state_dict()} | {
        LM_HEAD_PREFIX + k for k in language.lm_head.state_dict()}
    assert vision == {n for n in names if n.startswith(VISION_PREFIX)}
    assert text == {n for n in names if n.startswith((TEXT_PREFIX, LM_HEAD_PREFIX))}
    assert not vision & text
    assert vision | text == names


def _write_hub_layout(src: str, dst: Path) -> None:
    """Re-shard the checkpoint into 3 files with experts stored transposed, as hub checkpoints are."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    with safe_open(str(Path(src) / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, t in tensors.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensors[k] = t.transpose(1, 2).contiguous()
    keys = sorted(tensors)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: tensors[k] for k in keys[i::3]}
        save_file(part, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_hub_layout_loads_identically(checkpoint, encoder, language, tmp_path):
    hub = tmp_path / "hub"
    _write_hub_layout(checkpoint, hub)
    enc2, lm2 = VisionEncoder(str(hub)), LanguageModel(str(hub))
    for a, b in ((encoder.visual, enc2.visual), (language.model, lm2.model), (language.lm_head, lm2.lm_head)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
