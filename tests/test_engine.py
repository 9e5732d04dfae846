"""The continuous-batching engine, fed by a real encoder process over Mooncake, against transformers."""

import json
import re
import time

import pytest
import torch
from reference import reference_greedy

from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.sampling import SamplingParams
from qwen3vl_epd.settings import LanguageSettings
from qwen3vl_epd.transfer.blocks import blocks_for
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from qwen3vl_epd.transfer.puller import Puller
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.transport import MooncakeTransport
from support.peers import TEST_KEY, SilentPeer, resign
from support.prompts import ENGINE_CHUNK, Collector, prompt_inputs

pytestmark = pytest.mark.mooncake

CHUNK = ENGINE_CHUNK
MAX_TOKENS = {  # the prompts these tests send, and their max_tokens
    "hi": 12, "dragon": 20, "small_image": 16, "two_marked": 10, "cmyk_mid_text": 14,
    "landscape_in_detail": 12,  # over 3 chunks of CHUNK tokens
}


@pytest.fixture(scope="module")
def expected(processor, reference):
    out = {}
    for name, max_tokens in MAX_TOKENS.items():
        prompt = processor.process(*prompt_inputs(name))
        tokens = reference_greedy(reference, prompt, max_tokens)
        out[name] = (processor.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), prompt.fill_ids.numel())
    return out


def make_engine(language, puller, processor, **kw):
    kw = {"kv_cache_tokens": 16384, "max_batched_tokens": 256, **kw}
    return Engine(language, puller, processor.tokenizer, LanguageSettings(**kw))


def stage(peer, name) -> bytes:
    return peer.call("prompt", *prompt_inputs(name))


def submit(engine, peer, name, params=None, handle=None):
    c = Collector(params or SamplingParams(max_tokens=MAX_TOKENS[name]))
    engine.submit(handle or stage(peer, name), c.request)
    return c


def wait_all(collectors, timeout=300):
    for c in collectors:
        assert c.done.wait(timeout), "request did not finish"


def assert_all_free(engine, peer):
    deadline = time.monotonic() + 5
    while any(engine.in_use().values()) or any(peer.in_use().values()):
        peer.call("reclaim", 0)
        assert time.monotonic() < deadline, (engine.in_use(), peer.in_use())
        time.sleep(0.02)


def cancel_all(collectors, engine, peer):
    """Cancel the requests, wait for their ends, and check that nothing is left in use."""
    for c in collectors:
        engine.cancel(c.request)
    wait_all(collectors)
    assert_all_free(engine, peer)


def test_mixed_batch_equals_transformers(peer, puller, language, processor, expected):
    engine = make_engine(language, puller, processor)
    try:
        names = ["hi", "dragon", "small_image", "two_marked", "cmyk_mid_text", "landscape_in_detail", "small_image",
                 "hi"]
        collectors = [submit(engine, peer, n) for n in names]
        wait_all(collectors)
        for name, c in zip(names, collectors):
            want_text, want_n, _ = expected[name]
            assert (c.text, c.last.num_output_tokens) == (want_text, want_n), name
        assert engine.steps < sum(c.last.num_output_tokens for c in collectors)  # decode steps were shared
        assert_all_free(engine, peer)
    finally:
        engine.stop()


def test_long_prompt_chunks_interleave_with_decodes(peer, puller, language, processor, expected):
    engine = make_engine(language, puller, processor)
    try:
        assert expected["landscape_in_detail"][2] > 3 * CHUNK
        # long-running decodes (past EOS) that the long prompt's chunks must interleave with
        early = [submit(engine, peer, "dragon", SamplingParams(max_tokens=2000, ignore_eos=True)) for _ in range(3)]
        while not all(c.pieces for c in early):
            time.sleep(0.005)
        mixed_before = engine.mixed_steps
        long = submit(engine, peer, "landscape_in_detail")
        wait_all([long])
        assert all(not c.done.is_set() for c in early)
        assert engine.mixed_steps - mixed_before >= 4  # each of its prompt chunks ran beside decode tokens
        assert (long.text, long.last.num_output_tokens) == expected["landscape_in_detail"][:2]
        cancel_all(early, engine, peer)
    finally:
        engine.stop()


def test_seeded_sampling_alone_and_in_batch(peer, puller, language, processor):
    engine = make_engine(language, puller, processor)
    params = lambda seed: SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=seed)  # noqa: E731
    try:
        alone = submit(engine, peer, "small_image", params(42))
        wait_all([alone])
        batch = [submit(engine, peer, n, params(s)) for n, s in
                 [("dragon", 1), ("small_image", 42), ("two_marked", 2), ("small_image", 43), ("hi", 3)]]
        wait_all(batch)
        assert batch[1].text == alone.text
        assert batch[3].text != alone.text
        assert_all_free(engine, peer)
    finally:
        engine.stop()


def test_64_requests_with_kv_for_8(peer, puller, language, processor, expected):
    names = ["hi", "small_image", "cmyk_mid_text", "dragon"]
    need = max(expected[n][2] + MAX_TOKENS[n] for n in names)
    engine = make_engine(language, puller, processor, kv_cache_tokens=8 * (need + 16))
    try:
        jobs = [names[i % len(names)] for i in range(64)]
        handles = [stage(peer, n) for n in jobs]  # all staged first, then submitted at once
        collectors = [submit(engine, peer, n, handle=h) for n, h in zip(jobs, handles)]
        peak_running = peak_waiting = 0
        while not all(c.done.is_set() for c in collectors):
            peak_running = max(peak_running, len(engine.scheduler.running))
            peak_waiting = max(peak_waiting, len(engine.scheduler.waiting))
            time.sleep(0.002)
        smallest = min(expected[n][2] + MAX_TOKENS[n] for n in names)
        assert peak_running <= engine.kv.num_blocks // blocks_for(smallest, engine.kv.block_size)  # admission by KV
        assert peak_waiting >= 32  # the rest queued instead of running out of memory
        for name, c in zip(jobs, collectors):
            assert (c.text, c.last.num_output_tokens) == expected[name][:2]
        assert_all_free(engine, peer)
    finally:
        engine.stop()


def test_cancel_10_of_20_streams(peer, puller, language, processor, expected):
    engine = make_engine(language, puller, processor, cancel_check_ms=0.0)  # checked every step
    try:
        jobs = [("dragon" if i % 2 else "small_image") for i in range(20)]
        long = SamplingParams(max_tokens=2000, ignore_eos=True)  # only a cancel ends these early
        collectors = [submit(engine, peer, n, long if i % 2 == 0 else SamplingParams(max_tokens=MAX_TOKENS[n]))
                      for i, n in enumerate(jobs)]
        for c in collectors[::2]:
            while not c.pieces:
                time.sleep(0.002)
            engine.cancel(c.request)
        wait_all(collectors)
        for i, (name, c) in enumerate(zip(jobs, collectors)):
            if i % 2 == 0:
                assert c.last.finish_reason == "cancelled" and c.last.num_output_tokens < 2000
            else:
                assert (c.text, c.last.num_output_tokens) == expected[name][:2]
        assert_all_free(engine, peer)
    finally:
        engine.stop()


def test_a_probe_is_answered_by_the_next_forward_when_the_queue_is_full(peer, puller, language, processor,
                                                                          expected):
    """The supervisor's liveness probe: on an idle engine a real one-token request; with KV taken
    and a queue waiting, it goes first and the others' next forward answers it."""
    need = blocks_for(expected["dragon"][2] + 500, 16) * 16
    # Room for two, and no block shared between the identical prompts.
    engine = make_engine(language, puller, processor, kv_cache_tokens=2 * need, prefix_cache=False)

    def probe():
        c = Collector(SamplingParams(max_tokens=12), probe=True)  # 12: held to 1
        engine.submit(stage(peer, "hi"), c.request)
        return c

    try:
        idle = probe()
        wait_all([idle], 60)
        assert (idle.last.finish_reason, idle.last.num_output_tokens, idle.last.error) == ("length", 1, None)
        long = SamplingParams(max_tokens=500, ignore_eos=True)
        collectors = [submit(engine, peer, "dragon", long) for _ in range(6)]
        while len(engine.scheduler.running) < 2 or not all(s.tokens for s in engine.scheduler.running):
            time.sleep(0.01)
        busy = probe()
        wait_all([busy], 30)
        assert (busy.last.finish_reason, busy.last.num_output_tokens, busy.last.error) == ("probe", 0, None)
        assert len(engine.scheduler.waiting) == 4 and not any(c.done.is_set() for c in collectors)
        cancel_all(collectors, engine, peer)
    finally:
        engine.stop()


def test_stop_cancels_what_is_left(peer, puller, language, processor):
    engine = make_engine(language, puller, processor)
    collectors = [submit(engine, peer, "dragon", SamplingParams(max_tokens=4000)) for _ in range(3)]
    engine.stop(drain_timeout_s=0.2)
    assert not engine._thread.is_alive()
    assert all(c.done.is_set() and c.last.finish_reason == "cancelled" for c in collectors)
    assert_all_free(engine, peer)


def test_inconsistent_prompt_fails_alone(peer, puller, language, processor, expected):
    """A handle whose rows disagree with its tokens fails by itself; the batch around it goes on."""
    engine = make_engine(language, puller, processor)
    try:
        good = submit(engine, peer, "small_image")
        bad = submit(engine, peer, "small_image", handle=peer.stage(5, 100, 30, 1))  # random ids: no image pads
        wait_all([good, bad])
        assert bad.last.error is not None and re.search(r"tokens 0\.\.\d+: 0 image pads but \d+ embedding rows",
                                                        str(bad.last.error))
        assert (good.text, good.last.num_output_tokens) == expected["small_image"][:2]
        assert_all_free(engine, peer)
    finally:
        engine.stop()


def test_a_stalled_peer_stalls_only_its_own_request(peer, language, processor, expected):
    """A handle whose peer accepts and never answers, beside 8 live streams: it fails with
    UNAVAILABLE after transfer_timeout_s, and the streams kept getting tokens all that time."""
    cfg = BufferConfig(block_tokens=16, block_visual=16, num_token_blocks=64, num_visual_blocks=64, num_slots=64)
    puller = Puller(MultimodalDataBuffers(64, 3, torch.float32, cfg), MooncakeTransport(), HandleKeys(TEST_KEY),
                    chunk_tokens=CHUNK, timeout_s=1.5)
    engine = make_engine(language, puller, processor, kv_cache_tokens=8 * 4096)
    silent = SilentPeer()
    try:
        stalled = resign({**json.loads(stage(peer, "small_image")), "peer": silent.address})
        live = [submit(engine, peer, "dragon", SamplingParams(max_tokens=4000, ignore_eos=True)) for _ in range(8)]
        while not all(c.pieces for c in live):
            time.sleep(0.005)
        start = time.monotonic()
        bad = submit(engine, peer, "small_image", handle=stalled)
        assert bad.done.wait(30)
        failed_after = bad.times[-1] - start
        assert bad.last.error is not None and bad.last.error.code == "UNAVAILABLE"
        assert f"encoder peer {silent.address} did not answer within 1.5 s" in str(bad.last.error)
        assert 1.5 <= failed_after < 3.0
        for c in live:  # a blocked engine would show one gap as long as the stall
            during = [t for t in c.times if start <= t <= start + failed_after]
            gaps = [b - a for a, b in zip(during, during[1:])]
            assert len(during) >= 10 and max(gaps) < 0.5, (len(during), max(gaps, default=None))
            assert not c.done.is_set()
            engine.cancel(c.request)
        wait_all(live)
        good = submit(engine, peer, "small_image")  # still serving, the same peer as before
        wait_all([good])
        assert (good.text, good.last.num_output_tokens) == expected["small_image"][:2]
        peer.call("reclaim", 10_000)  # the slot behind the rerouted handle: its TTL
        assert_all_free(engine, peer)
    finally:
        engine.stop()
        silent.close()
        puller.close()


def test_an_engine_bug_fails_its_requests_naming_them_and_is_logged(peer, puller, language, processor, caplog):
    """A step that raises: every request in flight ends INTERNAL with its id, the traceback is
    logged with the same ids, nothing stays in use, and the engine serves the next request."""
    engine = make_engine(language, puller, processor)
    run = engine.runner.run
    try:
        engine.runner.run = lambda chunks, decodes: {}["induced"]
        broken = [submit(engine, peer, "hi"), submit(engine, peer, "small_image")]
        wait_all(broken)
        for c in broken:
            assert c.last.error.code == "INTERNAL" and f"(request {c.request.id}): KeyError" in str(c.last.error)
            logged = [r for r in caplog.records if c.request.id in r.getMessage()]
            assert logged and logged[0].exc_info[0] is KeyError, caplog.records
        assert_all_free(engine, peer)
        engine.runner.run = run
        good = submit(engine, peer, "hi")
        wait_all([good])
        assert good.last.error is None and good.last.finish_reason
    finally:
        engine.stop()
