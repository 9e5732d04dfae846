"""Prefix cache: a prompt that shares full KV blocks with an earlier one reuses them (neither
pulled nor prefilled) and still equals transformers token for token; images are part of the key."""

import pytest
import torch
from reference import reference_greedy, reference_logits

from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.engine.kv_cache import PagedKVCache
from qwen3vl_epd.language.engine.model_runner import ModelRunner
from qwen3vl_epd.language.sampling import Sampler, SamplingParams
from qwen3vl_epd.settings import LanguageSettings
from support.prompts import ENGINE_CHUNK, TOL, Collector, image_bytes, noise_jpeg

pytestmark = pytest.mark.mooncake

CHUNK, MAX_TOKENS = ENGINE_CHUNK, 10
X, Y = image_bytes("landscape_640x480.jpg"), image_bytes("small_64x64.webp")
N1, N2 = noise_jpeg(256, seed=1), noise_jpeg(256, seed=2)  # two different images of one size


def engine_for(language, puller, processor, **kw):
    return Engine(language, puller, processor.tokenizer,
                  LanguageSettings(**{"kv_cache_tokens": 16384, "max_batched_tokens": 256, **kw}))


def run(engine, peer, processor, reference, text, images, raw=False):
    """Send one prompt; assert it equals transformers; the prompt tokens it found cached."""
    before = engine.prefix_hit_tokens
    c = Collector(SamplingParams(max_tokens=MAX_TOKENS))
    engine.submit(peer.call("prompt", text, images, raw), c.request)
    assert c.done.wait(300)
    want = reference_greedy(reference, processor.process(text, images, raw), MAX_TOKENS)
    assert (c.text, c.last.num_output_tokens) == (processor.tokenizer.decode(want, skip_special_tokens=True),
                                                  len(want)), text
    return engine.prefix_hit_tokens - before


def test_hits_equal_transformers_and_end_inside_an_image(peer, puller, language, processor, reference):
    engine = engine_for(language, puller, processor)
    try:
        assert run(engine, peer, processor, reference, "<image> What is it?", [Y]) == 0
        # the same image, then another: the shared prefix ends after the first image's pads
        b = processor.process("<image><image> Compare them.", [Y, X])
        hit = run(engine, peer, processor, reference, "<image><image> Compare them.", [Y, X])
        (first, n), _ = b.visual_spans
        assert hit == (first + n + 1) // 16 * 16 and first < hit < first + n, (hit, b.visual_spans)  # inside it
        # the whole prompt again: everything but the last block is reused
        again = run(engine, peer, processor, reference, "<image><image> Compare them.", [Y, X])
        assert again == (b.fill_ids.numel() - 1) // 16 * 16
    finally:
        engine.stop()


def test_images_are_part_of_the_key(peer, puller, language, processor, reference):
    engine = engine_for(language, puller, processor)
    try:
        run(engine, peer, processor, reference, "<image> Describe it.", [N1])
        start = processor.process("<image> Describe it.", [N2]).visual_spans[0][0]
        # another image of the same size: nothing from the first image's pads on
        assert run(engine, peer, processor, reference, "<image> Describe it.", [N2]) <= start
        # the same image at another place: the prefix differs before it
        assert run(engine, peer, processor, reference, "Look here: <image> Describe it.", [N1]) <= start
    finally:
        engine.stop()


def test_a_conversation_turn_reuses_the_turn_before_over_several_chunks(peer, puller, language, processor,
                                                                          reference):
    engine = engine_for(language, puller, processor)
    try:
        turn1 = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        first = processor.apply_chat_template(turn1)
        run(engine, peer, processor, reference, first, [X], raw=True)
        answer = "It is a landscape with hills, trees, a river and a wide sky. " * 12
        turn2 = turn1 + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Any people?"}]
        second = processor.apply_chat_template(turn2)
        hit = run(engine, peer, processor, reference, second, [X], raw=True)
        length = processor.process(second, [X], True).fill_ids.numel()
        assert hit >= processor.process(first, [X], True).fill_ids.numel() - 16 and length - hit > 2 * CHUNK
    finally:
        engine.stop()


def test_eviction_under_pressure_keeps_answers_exact(peer, puller, language, processor, reference):
    # room for about two of these prompts at a time: each new one evicts older cached blocks
    engine = engine_for(language, puller, processor, kv_cache_tokens=1024)
    try:
        prompts = [(f"Story {i}: <image>", [X]) for i in range(4)]  # each its own prefix from token 3 on
        for text, images in prompts:
            run(engine, peer, processor, reference, text, images)
        assert engine.kv.evictions > 0 and engine.kv.in_use() == 0
        run(engine, peer, processor, reference, *prompts[0])  # its blocks were evicted: computed again
        assert run(engine, peer, processor, reference, *prompts[0]) > 0  # and cached again
        assert len(engine.kv.evictable) == engine.kv.cached_blocks()  # every cached block is free to take
    finally:
        engine.stop()


def test_prefix_cache_off_reuses_nothing(peer, puller, language, processor, reference):
    engine = engine_for(language, puller, processor, prefix_cache=False)
    try:
        for _ in range(2):
            assert run(engine, peer, processor, reference, "<image> What is it?", [X]) == 0
        assert engine.kv.cached_blocks() == 0
    finally:
        engine.stop()


@torch.no_grad()
def test_prompt_logits_after_a_cached_prefix(processor, encoder, language, reference):
    """The model runner alone: logits of a prompt whose first blocks come from another prompt's
    KV, against transformers on the whole prompt."""
    kv = PagedKVCache(language.config.text_config.num_hidden_layers, 256, 16,
                      language.config.text_config.num_key_value_heads, language.config.text_config.head_dim,
                      torch.float32, prefix_caching=True)
    runner = ModelRunner(language)
    a, b = (processor.process(t, i) for t, i in [("<image> What is it?", [Y]), ("<image><image> Compare.", [Y, X])])
    ea, eb = encoder.encode([a, b])

    def prefill(e):
        from types import SimpleNamespace

        seq = SimpleNamespace(kv=kv.allocate_sequence(e.length + 1, e.block_hashes(), e.length), prompt_len=e.length,
                              mrope_delta=e.mrope_delta, tokens=[], sampler=Sampler(SamplingParams()), grammar=None)
        seq.prefilled = seq.kv.length
        _, hidden = runner.run([runner.prepare(seq, e.slice(seq.prefilled, e.length))], [])
        kv.publish(seq.kv, e.block_hashes())
        return seq, language.lm_head(hidden)[0]

    sa, la = prefill(ea)
    sb, lb = prefill(eb)
    assert sa.prefilled == 0 and sb.prefilled > 0
    assert (lb - reference_logits(reference, b)[-1]).abs().max().item() <= TOL
    sa.kv.free()
    sb.kv.free()
    assert kv.in_use() == 0 and kv.cached_blocks() > 0
