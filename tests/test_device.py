"""Device discipline: whole engine steps with the model, KV cache and device-resident prompt rows
on a device other than the host's (PyTorch's `meta`, watched by support.discipline), so that a
host tensor left in a step fails here as it would on CUDA. Values on `meta` are shapes only:
exactness is the CPU tests' job; these check where every tensor lives and when the host waits."""

import dataclasses
import subprocess
import sys

import pytest
import torch

from qwen3vl_epd.devices import transfers_device_memory, visual_device
from qwen3vl_epd.language import sampling
from qwen3vl_epd.language.engine.attention import choose_backend
from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.model import LanguageModel
from qwen3vl_epd.language.sampling import SamplingParams
from qwen3vl_epd.prompt.source import LocalPrompt
from qwen3vl_epd.settings import LanguageSettings
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from support.discipline import DeviceDiscipline
from support.prompts import ENGINE_CHUNK, ROOT, Collector, prompt_inputs

pytestmark = pytest.mark.mooncake


def watched_engine(model, puller, tokenizer, monkeypatch, backend=None):
    """An Engine whose steps run under DeviceDiscipline; the one host read is counted and answered
    with token 0 (a meta tensor has no values)."""
    engine = Engine(model, puller, tokenizer, LanguageSettings(kv_cache_tokens=4096, max_batched_tokens=256))
    if backend:
        engine.runner.attention_backend = backend
    watch = DeviceDiscipline()
    watch.reads = watch.forwards = 0
    watch.generators = []
    step, forward = engine.step, model.hidden  # the decoder's forward (the lm_head follows it)

    def watched_step():
        watch.in_forward = False
        with watch:
            step()

    def watched_forward(*args, **kwargs):
        watch.in_forward, watch.forwards = True, watch.forwards + 1
        try:
            return forward(*args, **kwargs)
        finally:
            watch.in_forward = False

    def to_host(tokens):
        watch.reads += 1
        return [0] * len(tokens)

    def generator_on(device, seed):
        watch.generators.append(device)
        return None  # meta has no generator; multinomial checks shapes only

    monkeypatch.setattr(engine, "step", watched_step)
    monkeypatch.setattr(model, "hidden", watched_forward)
    monkeypatch.setattr(engine.runner, "to_host", to_host)
    monkeypatch.setattr(sampling, "generator_on", generator_on, raising=False)
    return engine, watch


def on_meta(prompt):
    """A prompt whose visual rows are device-resident, as pulled ones are with Mooncake's CUDA build."""
    return dataclasses.replace(prompt, embeddings=prompt.embeddings.to("meta"), deepstack=prompt.deepstack.to("meta"))


def submit(engine, prompt, **params):
    c = Collector(SamplingParams(ignore_eos=True, **params))
    engine.submit(LocalPrompt(prompt, ENGINE_CHUNK), c.request)
    return c


def finished(collectors, n_tokens):
    for c in collectors:
        assert c.done.wait(120), "request did not finish"
        assert c.last.error is None, c.last.error
        assert c.last.num_output_tokens == n_tokens


@pytest.fixture(scope="module")
def prompts(processor, encoder):
    names = ["dragon", "landscape_in_detail", "small_image"]
    return dict(zip(names, encoder.encode([processor.process(*prompt_inputs(n)) for n in names])))


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_mixed_steps_keep_every_tensor_on_the_device(checkpoint, processor, puller, prompts, monkeypatch, backend):
    """One forward holds a device-resident image chunk, a host-staged image, a text prompt and
    decodes; greedy and seeded sampled rows; then a prefix-cache hit. No op mixes host and device
    tensors, nothing is copied to the device once the forward has begun, and the host reads the
    device once per step (the sampled ids). "flash" runs the CUDA attention seam's shapes."""
    model = LanguageModel(checkpoint, torch.bfloat16, device="meta")  # bf16, as torch's grouped_mm wants on CUDA
    engine, watch = watched_engine(model, puller, processor.tokenizer, monkeypatch, backend)
    try:
        with engine._wake:  # all four reach the first step together
            collectors = [
                submit(engine, prompts["dragon"], max_tokens=4),
                submit(engine, on_meta(prompts["landscape_in_detail"]), max_tokens=4),  # several chunks
                submit(engine, prompts["small_image"], max_tokens=4, temperature=0.8, seed=1),
                submit(engine, prompts["dragon"], max_tokens=4, temperature=0.7, top_k=5, top_p=0.9),
            ]
        finished(collectors, 4)
        assert engine.mixed_steps >= 1, "no step mixed prompt chunks with decodes"
        again = submit(engine, prompts["dragon"], max_tokens=2)
        finished([again], 2)
        assert engine.prefix_hit_tokens > 0, "the repeated prompt found no cached prefix"
        assert watch.forwards == engine.steps and watch.reads == engine.steps
        assert watch.copies > 0 and watch.copies_in_forward == 0
        assert watch.generators and {d.type for d in watch.generators} == {"meta"}
        assert engine.in_use()["kv_blocks"] == 0
    finally:
        engine.stop()


def test_the_engine_step_fails_when_a_host_tensor_reaches_the_device(checkpoint, processor, puller, prompts,
                                                                      monkeypatch):
    """The watch itself: a decode position built on the host and added to device positions (the
    mistake this guards against) fails the request with the mix named."""
    model = LanguageModel(checkpoint, torch.bfloat16, device="meta")
    engine, watch = watched_engine(model, puller, processor.tokenizer, monkeypatch)
    forward = model.hidden
    monkeypatch.setattr(model, "hidden", lambda e, pos, *a, **k: forward(e, pos + torch.ones(pos.shape, dtype=torch.long), *a, **k))
    try:
        c = submit(engine, prompts["dragon"], max_tokens=2)
        assert c.done.wait(60)
        assert c.last.error is not None and "tensors on ['cpu', 'meta']" in str(c.last.error)
    finally:
        engine.stop()


def test_the_attention_backend_is_chosen_by_device():
    """auto: flash only where FlashAttention-2's paged kernel runs; asking for it elsewhere names why."""
    cuda = torch.device("cuda:0")
    assert choose_backend("auto", cuda, torch.bfloat16, 256, 128) == "flash"
    assert choose_backend("auto", torch.device("cpu"), torch.bfloat16, 256, 128) == "sdpa"
    assert choose_backend("auto", cuda, torch.float32, 256, 128) == "sdpa"
    assert choose_backend("auto", cuda, torch.bfloat16, 16, 128) == "sdpa"
    assert choose_backend("sdpa", cuda, torch.bfloat16, 256, 128) == "sdpa"
    with pytest.raises(ValueError, match="attention_backend: flash cannot run here: kv_block_size 16 is not a multiple of 256"):
        choose_backend("flash", cuda, torch.bfloat16, 16, 128)
    with pytest.raises(ValueError, match="attention_backend: 'xformers' is not one of auto, sdpa, flash"):
        choose_backend("xformers", cuda, torch.bfloat16, 256, 128)


def test_the_gpu_bench_runs_in_its_smoke_mode():
    """bench/gpu.py, ready for a lent device, runs end to end on the tiny model here: every figure
    and its goal line, the pull over a real Mooncake engine pair included."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for line in ("batch   2: step", "prefill 64 tokens:", "vision 128x128:", "MB: ", "goal: decode_b1_roofline_fraction",
                 "goal: decode_b2_roofline_fraction", "goal: prefill_roofline_fraction"):
        assert line in out.stdout, (line, out.stdout)
    assert "skipped" not in out.stdout


def test_control_rows_stay_on_the_host_and_visual_rows_follow_mooncake():
    """ids, positions, aux and release are read by the host: host memory always. Embeddings and
    DeepStack go on the device only where Mooncake can move device memory (its CUDA build)."""
    assert not transfers_device_memory()  # this machine has mooncake-transfer-engine-non-cuda
    assert visual_device("cuda:0") == torch.device("cpu") and visual_device("cpu") == torch.device("cpu")
    b = MultimodalDataBuffers(64, 3, torch.bfloat16, BufferConfig(num_token_blocks=4, num_visual_blocks=4, num_slots=2),
                              device="meta")
    assert {t.device.type for t in (b.fill_ids, b.mrope_positions, b.aux, b.release)} == {"cpu"}
    assert {t.device.type for t in (b.embeddings, b.deepstack)} == {"meta"}
