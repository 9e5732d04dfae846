"""Structured outputs in the engine: the random-weight tiny model, which never writes JSON unaided,
follows a JSON schema, a JSON object or a regex token by token (greedy and sampled, text and image
prompts), while an unconstrained request in the same batches keeps transformers' greedy tokens."""

import json
import re
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field
from reference import reference_greedy

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.grammar import Grammars
from qwen3vl_epd.language.sampling import SamplingParams, sampling_params
from qwen3vl_epd.settings import LanguageSettings
from support.prompts import prompt_inputs, run_local

pytestmark = pytest.mark.mooncake


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as OpenAI's strict mode wants

    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "dragon"]
    age: int = Field(ge=0, le=30)
    vaccinated: bool


def schema_format(model) -> dict:
    return {"type": "json_schema", "json_schema": {"name": model.__name__, "schema": model.model_json_schema(),
                                                   "strict": True}}


@pytest.fixture(scope="module")
def grammars(processor, language):
    return Grammars(processor.tokenizer, language.config.text_config.vocab_size)


def test_outputs_follow_their_grammar_beside_free_requests(language, puller, processor, encoder, reference, grammars):
    names = ["dragon", "small_image"]
    processed = {n: processor.process(*prompt_inputs(n)) for n in names}
    encoded = dict(zip(names, encoder.encode(list(processed.values()))))
    pet, regex = grammars.compile(schema_format(Pet)), r"[0-9]{3}-[a-z]{2,4}"
    asks = [("dragon", dict(grammar=pet), Pet.model_validate_json),
            ("small_image", dict(grammar=pet), Pet.model_validate_json),
            ("dragon", dict(grammar=pet, temperature=1.0, seed=3), Pet.model_validate_json),
            ("small_image", dict(grammar=grammars.compile({"type": "json_object"})), json.loads),
            ("dragon", dict(grammar=grammars.compile({"type": "regex", "regex": regex}), temperature=0.8, seed=5),
             lambda text: re.fullmatch(regex, text) or pytest.fail(f"{text!r} does not match {regex}")),
            ("dragon", {}, None)]
    engine = Engine(language, puller, processor.tokenizer, LanguageSettings(kv_cache_tokens=8192))
    try:
        collectors = run_local(engine, [(encoded[name], SamplingParams(max_tokens=120, **kw)) for name, kw, _ in asks])
    finally:
        engine.stop()
    for (name, kw, check), c in zip(asks, collectors):
        if check is None:
            assert c.text == processor.tokenizer.decode(reference_greedy(reference, processed[name], 120),
                                                        skip_special_tokens=True)
        else:
            assert c.last.finish_reason == "stop", (c.text, c.last)
            check(c.text)
    assert engine.in_use()["kv_blocks"] == 0


def test_a_schema_the_library_refuses_names_response_format(grammars):
    bad = [({"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}, "Invalid type: nonsense"),
           ({"type": "regex", "regex": "(["}, "unclosed character class"),
           ({"type": "xml"}, "type 'xml' is not text, json_object"),
           ("{not json", "not JSON")]
    for fmt, message in bad:
        with pytest.raises(InvalidInputError, match=re.escape("response_format: ") + ".*" + re.escape(message)):
            sampling_params(16, 4096, response_format=fmt if isinstance(fmt, str) else json.dumps(fmt),
                            grammars=grammars)
    assert sampling_params(16, 4096, response_format='{"type": "text"}', grammars=grammars).grammar is None
