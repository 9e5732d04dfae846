"""Log-probabilities from the engine against transformers' log-softmax of the same positions:
greedy and sampled tokens, text and image prompts, beside a request that asks for none."""

import pytest
from reference import reference_greedy, reference_logprobs

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.sampling import SamplingParams, sampling_params
from qwen3vl_epd.settings import LanguageSettings
from support.prompts import prompt_inputs, run_local

pytestmark = pytest.mark.mooncake

TOL = 1e-4  # on log-probabilities; our logits equal transformers' within support.prompts.TOL


def check(entries, ref, tokenizer, k):
    """Each token's logprob and its k most likely against the reference log-softmax rows."""
    assert len(entries) == ref.shape[0]
    for row, e in zip(ref, entries):
        assert abs(e.logprob - row[e.token_id].item()) <= TOL
        assert e.token == tokenizer.decode([e.token_id])
        top = row.topk(k)
        assert [t for t, _, _ in e.top] == top.indices.tolist()
        assert max(abs(lp - v) for (_, _, lp), v in zip(e.top, top.values.tolist())) <= TOL
        assert all(text == tokenizer.decode([t]) for t, text, _ in e.top)


def test_logprobs_equal_transformers_log_softmax(language, puller, processor, encoder, reference):
    """The sampled token's logprob is under the model's distribution before temperature, top-k and
    top-p (as OpenAI gives it); a request that asks for none gets none and the same tokens."""
    engine = Engine(language, puller, processor.tokenizer, LanguageSettings(kv_cache_tokens=8192))
    names = ["dragon", "small_image"]
    processed = {n: processor.process(*prompt_inputs(n)) for n in names}
    encoded = dict(zip(names, encoder.encode(list(processed.values()))))
    asks = [("dragon", SamplingParams(max_tokens=8, logprobs=5)),
            ("small_image", SamplingParams(max_tokens=8, logprobs=3)),
            ("dragon", SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7, logprobs=2)),
            ("dragon", SamplingParams(max_tokens=8))]
    try:
        collectors = run_local(engine, [(encoded[name], params) for name, params in asks])
    finally:
        engine.stop()
    for (name, params), c in zip(asks, collectors):
        entries = [e for p in c.pieces for e in p.logprobs]
        if params.logprobs is None:
            assert entries == []
            greedy = reference_greedy(reference, processed[name], params.max_tokens)
            assert c.text == processor.tokenizer.decode(greedy, skip_special_tokens=True)
            continue
        tokens = [e.token_id for e in entries]
        assert len(tokens) == c.last.num_output_tokens
        if params.temperature == 0:
            assert tokens == reference_greedy(reference, processed[name], params.max_tokens)
        check(entries, reference_logprobs(reference, processed[name], tokens), processor.tokenizer, params.logprobs)
    assert engine.in_use()["kv_blocks"] == 0


def test_logprobs_beyond_20_are_refused():
    with pytest.raises(InvalidInputError, match="logprobs: 21 is outside 0..20"):
        sampling_params(16, 4096, logprobs=21)
    assert sampling_params(16, 4096, logprobs=0).logprobs == 0 and sampling_params(16, 4096).logprobs is None
