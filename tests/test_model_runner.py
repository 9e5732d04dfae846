"""ModelRunner: one flat forward of several sequences equals each sequence alone."""

from types import SimpleNamespace

import pytest
import torch
from reference import reference_logits

from qwen3vl_epd.language.engine.kv_cache import PagedKVCache
from qwen3vl_epd.language.engine.model_runner import ModelRunner
from qwen3vl_epd.language.model import KVCache
from qwen3vl_epd.language.sampling import Sampler, SamplingParams
from support.prompts import TOL, prompt_inputs

pytestmark = pytest.mark.unit


def test_batched_step_logits_equal_single(processor, encoder, language, reference):
    """One flat forward of three prompts, then one shared decode step, against each alone."""
    names = ["dragon", "small_image", "two_marked"]
    prompts = [processor.process(*prompt_inputs(n)) for n in names]
    encoded = encoder.encode(prompts)
    kv = PagedKVCache(4, 256, 16, 2, 16, torch.float32)
    seqs = [SimpleNamespace(kv=kv.allocate_sequence(e.length + 4), prefilled=0, tokens=[], prompt_len=e.length,
                            mrope_delta=e.mrope_delta, sampler=Sampler(SamplingParams()), grammar=None)
            for e in encoded]
    runner = ModelRunner(language)
    sampled, hidden = runner.run([runner.prepare(s, e) for s, e in zip(seqs, encoded)], [])
    prefill = language.lm_head(hidden)
    assert sampled == seqs
    for seq, logits, prompt in zip(seqs, prefill, prompts):
        assert (logits - reference_logits(reference, prompt)[-1]).abs().max().item() <= TOL
        seq.tokens.append(int(logits.argmax()))
    sampled, hidden = runner.run([], seqs)
    decoded = language.lm_head(hidden)
    for seq, logits, e in zip(sampled, decoded, encoded):
        single = KVCache(4)
        language.prefill(e, single)
        alone = language.decode_step(seq.tokens[0], e.length + e.mrope_delta, single)[0]
        assert (logits - alone).abs().max().item() <= TOL
