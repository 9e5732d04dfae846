"""Dense and MoE Qwen3-VL checkpoints written by transformers: both halves in-process (prompt logits)
and the whole server (greedy tokens) equal transformers; checkpoints we do not serve are refused
at load with one clear error."""

import json
import shutil

import pytest
import torch
from families import VARIANTS, build_variant
from reference import reference_greedy, reference_logits

from client import generate, text_of
from qwen3vl_epd.checkpoint.architecture import UnsupportedCheckpointError, architecture
from qwen3vl_epd.checkpoint.reader import load_config
from qwen3vl_epd.encoder.vision import VisionEncoder
from qwen3vl_epd.language.model import KVCache, LanguageModel
from qwen3vl_epd.prompt.processor import Processor
from support.prompts import TOL, prompt_inputs
from support.tritonserver import TritonServer

CASES = ["sea", "landscape", "two_marked_with"]  # text only, one image, two images
MAX_TOKENS = 12


@pytest.fixture(scope="session")
def variants_root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


def reference_model(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(checkpoint), dtype=torch.float32).eval()


@pytest.mark.unit
@pytest.mark.parametrize("name", list(VARIANTS))
def test_halves_equal_transformers(variants_root, name):
    ckpt = build_variant(name, variants_root)
    config = load_config(ckpt)
    dense = "dense" in name
    assert (config.model_type, type(reference_model(ckpt)).__name__) == (
        ("qwen3_vl", "Qwen3VLForConditionalGeneration") if dense else
        ("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration"))
    assert len(list(ckpt.glob("model-*.safetensors"))) > 1  # sharded
    processor, encoder, language = Processor(ckpt), VisionEncoder(str(ckpt)), LanguageModel(str(ckpt))
    reference = reference_model(ckpt)
    worst = 0.0
    for case in CASES:
        prompt = processor.process(*prompt_inputs(case))
        [encoded] = encoder.encode([prompt])
        got = language.prefill(encoded, KVCache(len(language.model.layers)), all_logits=True)
        worst = max(worst, (got - reference_logits(reference, prompt)).abs().max().item())
    print(f"{name}: max |Δlogit| {worst:.2e} over {', '.join(CASES)}")
    assert worst <= TOL


@pytest.mark.triton
@pytest.mark.parametrize("name", list(VARIANTS))
def test_server_equals_transformers(variants_root, tmp_path, name):
    ckpt = build_variant(name, variants_root)
    processor, reference = Processor(ckpt), reference_model(ckpt)
    server = TritonServer(tmp_path / "server.log", env={"EPD_CHECKPOINT": str(ckpt)})
    try:
        for case in CASES:
            want = reference_greedy(reference, processor.process(*prompt_inputs(case)), MAX_TOKENS)
            text, last = text_of(generate(server.grpc_url, *prompt_inputs(case), stream=True, max_tokens=MAX_TOKENS))
            assert (text, last.num_output_tokens) == (processor.tokenizer.decode(want, skip_special_tokens=True),
                                                      len(want)), case
    finally:
        server.stop()


def _edit_config(checkpoint, **fields):
    path = checkpoint / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.fixture(scope="module")
def refused(variants_root, checkpoint):
    """Copies of the tiny checkpoint this server must refuse: (directory, what the error names)."""
    out = {}
    for kind in ("model_type", "quantized", "video_only"):
        d = variants_root / f"refused_{kind}"
        if not d.exists():
            shutil.copytree(checkpoint, d)
        out[kind] = d
    quant = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
    _edit_config(out["quantized"], quantization_config=quant)
    (out["video_only"] / "preprocessor_config.json").unlink(missing_ok=True)
    return {"quantized": (out["quantized"], "quantized checkpoints (fp8) are not served"),
            "video_only": (out["video_only"], "video-only checkpoints are not served")}


@pytest.mark.unit
def test_other_checkpoints_are_refused_by_name(refused):
    from transformers import AutoConfig

    with pytest.raises(UnsupportedCheckpointError, match="model_type 'qwen2_vl' is not served"):
        architecture(AutoConfig.for_model("qwen2_vl"))
    for directory, message in refused.values():
        with pytest.raises(UnsupportedCheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
            architecture(load_config(directory), directory)


@pytest.mark.triton
def test_a_refused_checkpoint_fails_the_load_with_one_clear_error(refused, tmp_path):
    directory, message = refused["quantized"]
    with pytest.raises(RuntimeError, match="tritonserver exited"):
        TritonServer(tmp_path / "server.log", env={"EPD_CHECKPOINT": str(directory)})
    log = (tmp_path / "server.log").read_text()
    assert message in log and "Traceback" not in log, log[-3000:]
