"""The Scheduler alone: admission by KV and max_running, the per-step token budget, and the
lifecycle it owns (chunks → decode → finish, the finish rule, freeing KV). No Mooncake peer."""

import pytest
import torch

from qwen3vl_epd.language.detokenizer import Detokenizer
from qwen3vl_epd.language.engine.kv_cache import PagedKVCache
from qwen3vl_epd.language.engine.scheduler import Scheduler
from qwen3vl_epd.language.engine.sequence import Sequence, Status
from qwen3vl_epd.language.sampling import SamplingParams
from qwen3vl_epd.settings import LanguageSettings

pytestmark = pytest.mark.unit

EOS = 151645
BLOCK = 16


def scheduler(kv_blocks=16, max_batched_tokens=64, max_running=8):
    kv = PagedKVCache(1, kv_blocks, BLOCK, 1, 4, torch.float32)
    config = LanguageSettings(max_batched_tokens=max_batched_tokens, max_running=max_running)
    return Scheduler(kv, config, {EOS})


def sequence(tokenizer, prompt_len, max_tokens=8, chunk_tokens=32, **params):
    return Sequence(SamplingParams(max_tokens=max_tokens, **params), prompt_len, 0, chunk_tokens,
                    Detokenizer(tokenizer, params.get("stop")))


def step(s: Scheduler):
    """admit, every admitted sequence's next chunk arrives (the rows are not used here), schedule."""
    s.admit()
    for seq in s.prefilling():
        seq.rows = object()
    return s.schedule()


def decoding(s: Scheduler, tokenizer, n: int) -> list[Sequence]:
    """n short sequences past their prompt (one chunk each, first token out), now decoding."""
    seqs = [sequence(tokenizer, 4) for _ in range(n)]
    for seq in seqs:
        s.add(seq)
    step(s)
    s.postprocess(seqs, seqs, [1] * n)
    assert all(q.status is Status.DECODE for q in seqs)
    return seqs


def test_admission_reserves_kv_for_prompt_plus_max_tokens_fcfs(processor):
    s = scheduler(kv_blocks=16)
    a = sequence(processor.tokenizer, 100, max_tokens=28)  # 128 tokens: 8 blocks
    big = sequence(processor.tokenizer, 120, max_tokens=8)  # 8 blocks: does not fit next to a and b
    b = sequence(processor.tokenizer, 40, max_tokens=8)
    for seq in (a, b, big):
        s.add(seq)
    step(s)
    assert (a.status, b.status, big.status) == (Status.PREFILL, Status.PREFILL, Status.WAITING)
    assert len(a.kv.blocks) == 8 and len(b.kv.blocks) == 3 and s.kv.in_use() == 11
    s.finish(a, "length")
    step(s)
    assert big.status is Status.PREFILL and s.kv.in_use() == 11


def test_waiting_head_blocks_those_behind_it(processor):
    s = scheduler(kv_blocks=8)
    first, head, small = (sequence(processor.tokenizer, n, max_tokens=8) for n in (56, 100, 8))
    for seq in (first, head, small):
        s.add(seq)
    step(s)
    # head needs 7 blocks, 4 are free: it waits, and FCFS keeps the small one behind it
    assert [q.status for q in (first, head, small)] == [Status.PREFILL, Status.WAITING, Status.WAITING]


def test_max_running(processor):
    s = scheduler(kv_blocks=64, max_running=2)
    seqs = [sequence(processor.tokenizer, 8) for _ in range(3)]
    for seq in seqs:
        s.add(seq)
    prefills, decodes = step(s)
    assert prefills == seqs[:2] and not decodes and len(s.waiting) == 1


def test_chunk_budget_decodes_first(processor):
    s = scheduler(kv_blocks=64, max_batched_tokens=40)
    running = decoding(s, processor.tokenizer, 6)
    long = sequence(processor.tokenizer, 100, chunk_tokens=32)  # chunks of 32, 32, 32, 4
    short = sequence(processor.tokenizer, 10)
    s.add(long)
    s.add(short)
    prefills, decodes = step(s)
    # 40 tokens: the 6 decode tokens first, then 32 of long's chunk; short's 10 do not fit
    assert decodes == running and prefills == [long]
    for seq in running:
        s.finish(seq, "cancelled")
    prefills, decodes = step(s)
    assert prefills == [long] and not decodes  # 32 + 10 > 40: short waits for the next step


def test_a_chunk_over_the_budget_runs_beside_decodes_but_with_no_other_chunk(processor):
    s = scheduler(kv_blocks=64, max_batched_tokens=16)
    running = decoding(s, processor.tokenizer, 2)
    big, small = sequence(processor.tokenizer, 64, chunk_tokens=64), sequence(processor.tokenizer, 4)
    s.add(big)
    s.add(small)
    assert step(s) == ([big], running)  # never starved by decodes; small waits for the next step
    s.postprocess([big], [big, *running], [1] * 3)
    prefills, decodes = step(s)
    assert prefills == [small] and sorted(q.id for q in decodes) == sorted(q.id for q in (big, *running))


def test_postprocess_walks_chunks_then_decodes(processor):
    s = scheduler()
    seq = sequence(processor.tokenizer, 70, chunk_tokens=32, max_tokens=3, ignore_eos=True)
    s.add(seq)
    for k in range(2):
        prefills, _ = step(s)
        assert prefills == [seq] and seq.next_chunk_tokens() == 32
        assert s.postprocess([seq], [], []) == [] and seq.status is Status.PREFILL
    assert seq.next_chunk_tokens() == 6
    step(s)
    s.postprocess([seq], [seq], [EOS])  # the last chunk samples the first token
    assert seq.status is Status.DECODE and seq.first_token_at is not None and seq.tokens == [EOS]
    out = s.postprocess([], [seq], [11])
    assert seq.status is Status.DECODE and out and out[-1][1].finish_reason is None
    out = s.postprocess([], [seq], [12])
    assert seq.status is Status.FINISHED and out[-1][1].finish_reason == "length"
    assert out[-1][1].num_output_tokens == 3 and s.kv.in_use() == 0 and not s.has_work()


@pytest.mark.parametrize("how", ["eos", "stop_string", "length"])
def test_the_finish_rule(processor, how):
    tok = processor.tokenizer
    ids = tok("alpha beta gamma", add_special_tokens=False)["input_ids"]
    s = scheduler()
    seq = sequence(tok, 4, max_tokens=len(ids) + (how != "length"), stop=["gamma"] if how == "stop_string" else [])
    s.add(seq)
    step(s)
    tokens = ids + [EOS] if how == "eos" else ids
    pieces = []
    pieces += s.postprocess([seq], [seq], tokens[:1])
    for t in tokens[1:]:
        assert seq.status is Status.DECODE
        pieces += s.postprocess([], [seq], [t])
    last = pieces[-1][1]
    assert seq.status is Status.FINISHED and s.kv.in_use() == 0
    assert last.finish_reason == ("length" if how == "length" else "stop")
    text = "".join(p.text for _, p in pieces)
    assert text == ("alpha beta " if how == "stop_string" else "alpha beta gamma")
    assert last.num_output_tokens == len(tokens)


def test_finish_of_a_waiting_sequence(processor):
    s = scheduler(kv_blocks=1)
    seq = sequence(processor.tokenizer, 40)
    s.add(seq)
    step(s)
    assert seq.status is Status.WAITING
    piece = s.finish(seq, "cancelled")
    assert piece.finish_reason == "cancelled" and not s.has_work() and s.kv.in_use() == 0


def test_only_arrived_chunks_run(processor):
    s = scheduler()
    a, b = sequence(processor.tokenizer, 10), sequence(processor.tokenizer, 10)
    s.add(a)
    s.add(b)
    s.admit()
    assert s.prefilling() == [a, b] and s.schedule() == ([], [])  # both chunks still on their way
    b.rows = object()
    assert s.schedule() == ([b], []) and s.prefilling() == [a]
