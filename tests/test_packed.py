"""Packed linear layers and experts (language/packed.py): the same products as transformers' own
modules, used only where they apply; and the engine's thread alone computing in parallel."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

from qwen3vl_epd.cpu_threads import cores, idle_cores, mkl_threads, procs_running, set_thread_count, take_threads
from qwen3vl_epd.encoder.service import BlockPace, batch_threads
from qwen3vl_epd.encoder.vision import VisionEncoder
from qwen3vl_epd.language.encoder_pool import EncoderPool, on_this_host
from qwen3vl_epd.language.engine.threads import PARALLEL_HIDDEN, PARALLEL_TOKENS, CoreShare, engine_threads
from qwen3vl_epd.language.packed import DENSE_EXPERT_ROWS, PACKED_ROWS, PackedExperts, PackedLinear, packable
from qwen3vl_epd.prompt.video_processing import VideoOptions
from support.prompts import prompt_inputs

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_linear_equals_f_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 1000, bias=bias)
    packed = PackedLinear(linear)
    with torch.inference_mode():
        for shape in [(1, 96), (4, 96), (16, 96), (3, 7, 96), (200, 96)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    assert packed.weight is linear.weight  # the state dict and a tied lm_head keep the plain weight


def _experts(num_experts: int, top_k: int):
    config = Qwen3VLMoeTextConfig(hidden_size=64, moe_intermediate_size=48, num_experts=num_experts,
                                  num_experts_per_tok=top_k)
    torch.manual_seed(0)
    experts = Qwen3VLMoeTextExperts(config)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.1)
        experts.down_proj.normal_(0, 0.1)
    return experts


def _routing(tokens: int, num_experts: int, top_k: int):
    weights, index = torch.randn(tokens, num_experts).softmax(-1).topk(top_k)
    return index, weights / weights.sum(-1, keepdim=True)


@pytest.mark.parametrize("tokens", [1, 3, 4, 16, 32, 33, 300])
def test_packed_experts_equal_transformers_experts_on_both_paths(tokens):
    experts = _experts(8, 2)
    packed = PackedExperts(experts)
    hidden = torch.randn(tokens, 64)
    index, weights = _routing(tokens, 8, 2)
    with torch.inference_mode():
        expected = experts(hidden, index, weights)
        dense = (packed._dense,) if tokens <= PACKED_ROWS else ()  # it packs for small batches only
        for path in (*dense, packed._routed, packed):
            torch.testing.assert_close(path(hidden, index, weights), expected, atol=1e-5, rtol=1e-5)
    # the dense path is taken where the batch reaches most experts and stays small
    assert (tokens * 2 >= 8 and tokens * 8 <= DENSE_EXPERT_ROWS) == (4 <= tokens <= 32)


def test_packed_experts_run_only_the_experts_a_token_reaches():
    experts = _experts(16, 4)
    packed = PackedExperts(experts)
    packed.gate_up[3] = packed.down[3] = None  # an expert no token is routed to is never read
    index, weights = _routing(2, 16, 4)
    index[index == 3] = 5
    with torch.inference_mode():
        assert packed(torch.randn(2, 64), index, weights).shape == (2, 64)


def test_the_language_model_packs_only_float32_on_cpu(language):
    assert packable(torch.device("cpu"), torch.float32)
    assert not packable(torch.device("cpu"), torch.bfloat16) and not packable(torch.device("meta"), torch.float32)
    assert isinstance(language.lm_head, PackedLinear)
    attention = language.model.layers[0].self_attn
    assert all(isinstance(getattr(attention, n), PackedLinear) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(isinstance(layer.mlp.experts, PackedExperts) for layer in language.model.layers)


def test_loaded_weights_are_the_processes_own_memory_not_the_files_mapped_pages(language, checkpoint):
    # A weight left on safetensors' mapping is read from disk at first touch (an embedding row per
    # new token) and can be evicted; load_module copies what a conversion did not already copy.
    mapped = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) == 6 and Path(fields[5]).parent == Path(checkpoint).resolve():
            start, end = (int(x, 16) for x in fields[0].split("-"))
            mapped.append((start, end))
    params = [language.model.embed_tokens.weight, *language.model.parameters()]
    assert not [p for p in params for start, end in mapped if start <= p.data_ptr() < end]


def test_the_engine_thread_alone_keeps_its_torch_threads():
    # take_threads relies on torch fixing a thread's OpenMP count per thread: the default the
    # others get afterwards (1) does not reach the engine's thread.
    before, seen, go = torch.get_num_threads(), [], threading.Event()

    def engine():
        take_threads(2)
        seen.append((torch.get_num_threads(), mkl_threads()))
        go.wait()
        seen.append((torch.get_num_threads(), mkl_threads()))

    thread = threading.Thread(target=engine)
    thread.start()
    try:
        while not seen:
            threading.Event().wait(0.01)
        torch.set_num_threads(1)
        go.set()
        thread.join()
        # MKL too (F.linear above packed.PACKED_ROWS rows): its count is global but for this override
        assert seen == [(2, 2), (2, 2)] and torch.get_num_threads() == 1 and mkl_threads() == 1
    finally:
        torch.set_num_threads(before)


def on_a_thread_of_its_own(work) -> None:
    """`work` on a new thread (its OpenMP count is its own); torch's default restored after."""
    before = torch.get_num_threads()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    torch.set_num_threads(before)


def test_a_step_leaves_a_core_to_an_encoder_on_this_host_while_it_works():
    busy, seen = [False], []
    cores = CoreShare(2, lambda: busy[0])

    def steps():
        cores.take()
        for b in (False, True, True, False):
            busy[0] = b
            cores.step()
            seen.append((torch.get_num_threads(), mkl_threads()))

    on_a_thread_of_its_own(steps)
    assert seen == [(2, 2), (1, 1), (1, 1), (2, 2)]


def test_the_head_of_a_step_too_small_to_split_takes_every_core_but_one_an_encoder_uses():
    busy, seen = [False], []
    cores = CoreShare(1, lambda: busy[0], head_threads=2)

    def steps():
        cores.take()
        for b in (False, True):
            busy[0] = b
            cores.step()
            with cores.head():
                seen.append((torch.get_num_threads(), mkl_threads()))
            seen.append((torch.get_num_threads(), mkl_threads()))

    on_a_thread_of_its_own(steps)
    assert seen == [(2, 2), (1, 1), (1, 1), (1, 1)]
    assert engine_threads(0, 64) == 1 and engine_threads(0, PARALLEL_HIDDEN) == len(os.sched_getaffinity(0))


def test_a_long_prompt_chunk_of_a_model_too_small_to_split_takes_every_core_but_one_an_encoder_uses():
    busy, seen = [False], []
    cores = CoreShare(1, lambda: busy[0], head_threads=2)

    def steps():
        cores.take()
        for b, tokens in ((False, PARALLEL_TOKENS - 1), (False, PARALLEL_TOKENS), (True, 364), (False, 16)):
            busy[0] = b
            cores.step(tokens)
            seen.append((torch.get_num_threads(), mkl_threads()))

    on_a_thread_of_its_own(steps)
    assert seen == [(1, 1), (2, 2), (1, 1), (1, 1)]


def test_which_encoder_pools_share_this_host():
    assert all(on_this_host(t) for t in ("127.0.0.1:8001", "localhost:8001", "ipv4:127.0.0.1:8001,127.0.0.2:9001",
                                         "ipv6:[::1]:8001", "dns:///localhost:8001", "unix:/tmp/enc.sock"))
    assert not any(on_this_host(t) for t in ("10.0.1.2:8001", "ipv4:127.0.0.1:8001,10.0.2.2:8001", "dns:///enc:8001",
                                             "[2001:db8::1]:8001"))


def test_the_engine_splits_only_layers_large_enough_and_a_setting_wins():
    cores = len(os.sched_getaffinity(0))
    assert engine_threads(0, PARALLEL_HIDDEN) == cores and engine_threads(0, 64) == 1
    assert engine_threads(3, 64) == 3


def test_an_encoder_batch_takes_the_cores_the_host_leaves_idle():
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores())]
    try:
        deadline = time.monotonic() + 30
        while procs_running() - 1 < cores() and time.monotonic() < deadline:  # until they all spin
            time.sleep(0.05)
        assert idle_cores() == 0 and batch_threads(0) == 1
        assert batch_threads(0, language_idle=True) == cores()  # its own language server's word
        assert batch_threads(0, language_idle=True, staged=1) == 1  # unless it is about to prefill
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert batch_threads(3) == 3


def test_an_encoder_batch_whose_blocks_slow_down_gives_a_core_back():
    seen, now = [], [0.0]
    pace = BlockPace(clock=lambda: now[0])

    def batch(block_seconds: list[float]) -> int:
        set_thread_count(2)
        pace.start(1200)
        pace()  # before the first block
        for s in block_seconds:
            now[0] += s
            pace()
        return torch.get_num_threads()

    def batches():
        seen.append(batch([1.0, 1.1, 1.2]))  # the first batch: nothing to compare with
        seen.append(batch([1.0, 1.5]))  # within SLOWER of the fastest
        seen.append(batch([0.001, 0.003]))  # blocks too short to judge
        seen.append(batch([1.0, 2.0, 2.0]))  # another task took a core after the second block
        seen.append(batch([2.0]))  # from its start
        set_thread_count(1)
        pace.start(600)
        pace()
        now[0] += 5.0
        pace()
        seen.append(torch.get_num_threads())  # one thread: nothing to give back

    on_a_thread_of_its_own(batches)
    assert seen == [2, 2, 2, 1, 1, 1]
    assert pace.fastest[(2, (1200).bit_length())] == 1.0 / 1200


def test_the_vision_tower_calls_back_before_each_block(checkpoint, processor):
    calls = []
    encoder = VisionEncoder(checkpoint, between_blocks=lambda: calls.append(1))
    encoder.encode([processor.process(*prompt_inputs("landscape"))])
    assert len(calls) == len(encoder.visual.blocks) > 0


def test_a_language_server_tells_only_an_encoder_on_its_host_that_it_is_idle():
    def sent(target: str, idle: bool) -> dict:
        pool = EncoderPool(target)  # no request is sent: the inputs are only built
        try:
            return {t.name(): t for t in pool.inputs("hi", [], False, [], VideoOptions(), idle)}
        finally:
            pool.close()

    assert bool(sent("127.0.0.1:8001", True)["language_idle"]._raw_content[0])
    assert not bool(sent("127.0.0.1:8001", False)["language_idle"]._raw_content[0])
    assert "language_idle" not in sent("192.0.2.1:8001", True)  # TEST-NET: another host's encoders
