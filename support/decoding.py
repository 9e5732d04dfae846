"""Decode batches for step-time benches: sequences as if prefilled (a dense step's cost does not
depend on the values; a MoE step's does, through the experts its tokens reach, so each sequence
gets its own last token) and the seconds per step of running them."""

import time
from types import SimpleNamespace

import torch

from qwen3vl_epd.language.sampling import Sampler, SamplingParams


def decode_batch(kv, batch: int, context: int, steps: int, grammars: list | None = None) -> list:
    """`batch` sequences at `context` tokens; `grammars[i]` constrains row i (None: free)."""
    seqs = []
    tokens = torch.randint(0, 100_000, (batch,), generator=torch.Generator().manual_seed(batch)).tolist()
    for i in range(batch):
        s = kv.allocate_sequence(context + steps + 4)
        s.length = context
        params = SamplingParams()
        grammar = grammars[i] if grammars and i < len(grammars) else None
        seqs.append(SimpleNamespace(kv=s, tokens=[tokens[i]], prompt_len=context, mrope_delta=0, params=params,
                                    sampler=Sampler(params), grammar=grammar))
    return seqs


def step_seconds(runner, seqs: list, steps: int) -> float:
    """Seconds per step over `steps` decode steps after two warm-up steps; the sequences are freed."""
    t0 = 0.0
    for n in range(steps + 2):
        if n == 2:
            t0 = time.perf_counter()
        tokens, _ = runner.sample(*runner.run([], seqs))
        for s, t in zip(seqs, tokens):
            s.tokens.append(t)
            if s.grammar is not None:
                assert s.grammar.accept(t) is None
    elapsed = (time.perf_counter() - t0) / steps
    for s in seqs:
        s.kv.free()
    return elapsed
