"""Penalties and logit_bias in the engine against transformers: its RepetitionPenaltyLogitsProcessor
and SequenceBiasLogitsProcessor (through generate), and OpenAI's presence and frequency penalties
applied to transformers' own logits; beside a request with none, whose tokens stay as they were."""

import pytest
import torch
from reference import reference_greedy, reference_inputs

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.sampling import SamplingParams, sampling_params
from qwen3vl_epd.settings import LanguageSettings
from support.prompts import prompt_inputs, run_local

pytestmark = pytest.mark.mooncake
N = 10


@torch.no_grad()
def hf_generate(model, prompt, **kw) -> list[int]:
    inputs = reference_inputs(prompt)
    out = model.generate(**inputs, max_new_tokens=N, do_sample=False, **kw)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def openai_penalised_greedy(model, prompt, bias: dict[int, float], presence: float, frequency: float,
                            eos: set[int]) -> list[int]:
    """Greedy over transformers' logits plus the bias, minus presence·[count > 0] + frequency·count
    of the output (vLLM's order)."""
    inputs, tokens = reference_inputs(prompt), []
    for _ in range(N):
        ids = torch.cat([inputs["input_ids"], torch.tensor([tokens], dtype=torch.long)], 1)
        kw = {**inputs, "input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == 151655).int()}
        logits = model(**kw).logits[0, -1].float()
        for token, b in bias.items():
            logits[token] += b
        counts = torch.bincount(torch.tensor(tokens, dtype=torch.long), minlength=logits.numel()).float()
        tokens.append(int((logits - frequency * counts - presence * (counts > 0)).argmax()))
        if tokens[-1] in eos:
            break
    return tokens


def test_penalties_and_bias_equal_transformers(language, puller, processor, encoder, reference):
    names = ["dragon", "small_image"]
    processed = {n: processor.process(*prompt_inputs(n)) for n in names}
    encoded = dict(zip(names, encoder.encode(list(processed.values()))))
    # The random model never repeats a token unaided: a bias makes one (a prompt token) win, and
    # the penalties then have something to act on.
    x = processor.tokenizer.encode(" dragon")[0]
    assert x in processed["dragon"].fill_ids.tolist()
    asks = [("dragon", dict(logit_bias={x: 20.0})),
            ("dragon", dict(logit_bias={x: 20.0}, repetition_penalty=6.0)),
            ("small_image", dict(logit_bias={x: 10.0}, presence_penalty=1.5, frequency_penalty=2.0)),
            ("small_image", dict(repetition_penalty=0.5)),
            ("dragon", {})]
    expected = [hf_generate(reference, processed["dragon"], sequence_bias={(x,): 20.0}),
                hf_generate(reference, processed["dragon"], sequence_bias={(x,): 20.0}, repetition_penalty=6.0),
                openai_penalised_greedy(reference, processed["small_image"], {x: 10.0}, 1.5, 2.0, language.eos_ids),
                hf_generate(reference, processed["small_image"], repetition_penalty=0.5),
                reference_greedy(reference, processed["dragon"], N)]
    # each penalty changes what the request would give without it (else this would prove nothing)
    small_biased = hf_generate(reference, processed["small_image"], sequence_bias={(x,): 10.0})
    small = reference_greedy(reference, processed["small_image"], N)
    assert expected[0] != expected[4] and expected[1] != expected[0]
    assert expected[2] != small_biased and expected[3] != small
    engine = Engine(language, puller, processor.tokenizer, LanguageSettings(kv_cache_tokens=8192))
    try:
        run_local(engine, [(encoded["dragon"], SamplingParams(max_tokens=4))])  # cached: the penalty must not use it
        collectors = run_local(engine, [(encoded[n], SamplingParams(max_tokens=N, logprobs=0, **kw)) for n, kw in asks])
    finally:
        engine.stop()
    for c, want in zip(collectors, expected):
        assert [e.token_id for p in c.pieces for e in p.logprobs] == want
    assert engine.in_use()["kv_blocks"] == 0


def test_out_of_range_penalties_and_biases_name_the_field():
    for kw, message in [(dict(presence_penalty=3), "presence_penalty: 3.0 is outside -2..2"),
                        (dict(frequency_penalty=-2.5), "frequency_penalty: -2.5 is outside -2..2"),
                        (dict(repetition_penalty=0), "repetition_penalty: 0.0 must be > 0"),
                        (dict(logit_bias='{"151936": 1}'), "logit_bias: token 151936 is outside 0..151935"),
                        (dict(logit_bias='{"5": 101}'), "logit_bias: bias 101.0 of token 5 is outside -100..100"),
                        (dict(logit_bias="[1, 2]"), "logit_bias: not an object of token id → bias")]:
        with pytest.raises(InvalidInputError, match=message):
            sampling_params(16, 4096, vocab_size=151936, **kw)
    assert sampling_params(16, 4096, logit_bias='{"7": -100}').logit_bias == {7: -100.0}
