"""The OpenAI-compatible server that scripts/serve starts, through the official `openai` package:
equal to the Triton endpoint and to transformers, conversations, errors, cancellation."""

import base64
import http.client
import http.server
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Literal

import openai
import pydantic
import pytest
from reference import reference_greedy, reference_logprobs

from client import RequestError, data_url, generate, text_of
from support.prompts import image_bytes
from support.tritonserver import TritonServer, start_openai_server, wait_http_ok

pytestmark = pytest.mark.triton

MAX_TOKENS = 12
PORTRAIT, SMALL = "portrait_300x500.png", "small_64x64.webp"


def image_part(name: str) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image_bytes(name))}}


# Conversations: text only, one image, and several turns with an image in two of them.
CONVERSATIONS = {
    "text": [{"role": "user", "content": "Tell me about the sea."}],
    "image": [{"role": "user", "content": [image_part(SMALL), {"type": "text", "text": "Describe this image."}]}],
    "turns": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [image_part(PORTRAIT), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A portrait."},
        {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(SMALL)]},
    ],
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    s = TritonServer(tmp_path_factory.mktemp("openai") / "server.log", env={"EPD_CHECKPOINT": checkpoint},
                     supervised=True)
    wait_http_ok(s.openai_url.removesuffix("/v1") + "/health", 60, "the OpenAI server of scripts/serve")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(processor, reference):
    """Per conversation: transformers' greedy text, rendered by the checkpoint's chat template."""
    from qwen3vl_epd.prompt.messages import parse_messages

    out = {}
    for name, turns in CONVERSATIONS.items():
        c = parse_messages(json.dumps(turns))
        prompt = processor.process(processor.apply_chat_template(c.turns), c.images, raw_prompt=True)
        tokens = reference_greedy(reference, prompt, MAX_TOKENS)
        out[name] = processor.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), prompt.fill_ids.numel()
    return out


def sdk_text(sdk, stream: bool, **kw) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of one chat completion through the SDK."""
    if not stream:
        r = sdk.chat.completions.create(model="tiny", **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    chunks = list(sdk.chat.completions.create(model="tiny", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, finish[0], chunks[-1].usage


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_sdk_equals_triton_endpoint_and_transformers(server, sdk, expected, name, stream):
    want_text, want_n, prompt_tokens = expected[name]
    text, finish, usage = sdk_text(sdk, stream, messages=CONVERSATIONS[name], max_completion_tokens=MAX_TOKENS)
    assert text == want_text
    assert finish == ("stop" if want_n < MAX_TOKENS else "length")
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, want_n)
    triton_text, last = text_of(generate(server.grpc_url, None, messages=CONVERSATIONS[name], max_tokens=MAX_TOKENS))
    assert triton_text == text and last.num_input_tokens == prompt_tokens


def test_sampling_fields_match_the_triton_endpoint(server, sdk):
    fields = dict(temperature=0.8, top_p=0.9, seed=11)
    messages = CONVERSATIONS["image"]
    text, _, _ = sdk_text(sdk, False, messages=messages, max_tokens=8, extra_body={"top_k": 40}, **fields)
    triton, _ = text_of(generate(server.grpc_url, None, messages=messages, max_tokens=8, top_k=40, **fields))
    assert text == triton
    greedy, _, _ = sdk_text(sdk, True, messages=CONVERSATIONS["text"], max_tokens=MAX_TOKENS)
    stop = greedy[4:7]
    cut, finish, _ = sdk_text(sdk, True, messages=CONVERSATIONS["text"], max_tokens=MAX_TOKENS, stop=stop)
    assert finish == "stop" and cut == greedy[: greedy.index(stop)]


def status_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    return e.value.status_code, e.value.body


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_errors_are_openai_error_objects(server, sdk, stream):
    create = lambda **kw: sdk_text(sdk, stream, **{"messages": CONVERSATIONS["text"], **kw})  # noqa: E731
    status, body = status_of(lambda: create(max_tokens=0))
    assert status == 400 and body["param"] == "max_tokens" and body["code"] == "INVALID_ARG"
    assert body["message"] == "max_tokens: 0 is outside 1..4096"
    status, body = status_of(lambda: sdk.chat.completions.create(model="other", messages=CONVERSATIONS["text"]))
    assert status == 404 and body["code"] == "model_not_found"
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]
    status, body = status_of(lambda: create(messages=remote))
    assert status == 400 and "messages[0].content[0].image_url: remote image URLs are not fetched" in body["message"]
    status, body = status_of(lambda: create(messages=[{"role": "robot", "content": "x"}]))
    assert status == 400 and body["param"] == "messages[0]"
    status, body = status_of(lambda: create(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"junk").decode()}}]}]))
    assert status == 400 and "image 0: cannot decode image" in body["message"]
    status, body = status_of(lambda: create(n=17))
    assert status == 400 and body["param"] == "n"
    assert sdk_text(sdk, stream, messages=CONVERSATIONS["text"], max_tokens=2)[2].completion_tokens == 2


def test_dropped_stream_stops_the_engine(server):
    """A client that leaves mid-stream: its generation stops and its KV blocks are freed."""
    body = json.dumps({"model": "tiny", "messages": CONVERSATIONS["text"], "stream": True, "max_tokens": 4000,
                       "ignore_eos": True})
    conn = http.client.HTTPConnection("127.0.0.1", server.openai, timeout=60)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    lines = 0
    while lines < 4:  # role chunk and the first tokens
        lines += reply.readline().startswith(b"data: ")
    before = server.metric_values("epd_output_tokens_total")
    conn.sock.shutdown(socket.SHUT_RDWR)  # the reply's file holds the socket open past close()
    conn.sock.close()
    deadline = time.monotonic() + 10
    while server.metric_values("epd_buffer_blocks_in_use").get('{pool="kv_blocks",side="language"}', 1) > 0:
        assert time.monotonic() < deadline, "the dropped request kept its KV blocks"
        time.sleep(0.1)
    after = server.metric_values("epd_output_tokens_total")
    wasted = sum(after.values()) - sum(before.values())
    assert wasted < 50, wasted  # of 4000 (the supervisor's probes add a token a second)


def test_remote_images_when_enabled_and_api_key(server, expected, tmp_path):
    """An OpenAI server started by hand with --allow-remote-images and --api-key, fetching from loopback."""
    (tmp_path / SMALL).write_bytes(image_bytes(SMALL))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    images = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    frontend, base = start_openai_server(server.grpc_url, "--served-model-name", "tiny", "--allow-remote-images",
                                   "--api-key", "sesame")
    try:
        url = f"http://127.0.0.1:{images.server_port}/{SMALL}"
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "Describe this image."}]}]
        keyed = openai.OpenAI(base_url=base, api_key="sesame", max_retries=0)
        text, _, _ = sdk_text(keyed, False, messages=messages, max_tokens=MAX_TOKENS)
        assert text == expected["image"][0]
        missing = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url + ".gone"}}]}]
        status, body = status_of(lambda: sdk_text(keyed, False, messages=missing))
        assert status == 400 and "answered HTTP 404" in body["message"]
        status, body = status_of(lambda: sdk_text(openai.OpenAI(base_url=base, api_key="wrong", max_retries=0), False,
                                                  messages=CONVERSATIONS["text"]))
        assert status == 401 and body["code"] == "invalid_api_key"
    finally:
        frontend.terminate()
        frontend.wait(15)
        images.shutdown()


def test_conversations_through_triton_endpoints(server, expected):
    """The `messages` input on each client-facing model, gRPC and HTTP, and its errors."""
    turns = CONVERSATIONS["turns"]
    want = expected["turns"][0]
    for model, protocol in [("language", "http"), ("ensemble", "grpc")]:
        url = server.http_url if protocol == "http" else server.grpc_url
        assert text_of(generate(url, None, protocol=protocol, model=model, messages=turns,
                                max_tokens=MAX_TOKENS, stream=True))[0] == want
    # images by index into `image`, as a Triton client sends them
    by_index = [{**t, "content": [{"type": "image"} if p.get("type") == "image_url" else p for p in t["content"]]}
                if isinstance(t["content"], list) else t for t in turns]
    got, _ = text_of(generate(server.grpc_url, None, [image_bytes(PORTRAIT), image_bytes(SMALL)], messages=by_index,
                              max_tokens=MAX_TOKENS))
    assert got == want
    # `complete` over HTTP infer: the unary endpoint
    infer = {"inputs": [{"name": "messages", "shape": [1, 1], "datatype": "BYTES", "data": [json.dumps(turns)]},
                        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [MAX_TOKENS]}]}
    with urllib.request.urlopen(urllib.request.Request(f"http://{server.http_url}/v2/models/complete/infer",
                                                       data=json.dumps(infer).encode()), timeout=60) as r:
        outputs = {o["name"]: o["data"] for o in json.loads(r.read())["outputs"]}
    assert outputs["text_output"] == [want]
    bad = json.dumps({"messages": json.dumps([{"role": "user", "content": [{"type": "image", "image": 3}]}])}).encode()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(f"http://{server.http_url}/v2/models/language/generate",
                                                      data=bad), timeout=30)
    assert e.value.code == 400 and "turn 0 (user) part 0: image index 3 is out of range" in e.value.read().decode()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_logprobs_equal_transformers_log_softmax(server, sdk, processor, reference, stream):
    """logprobs / top_logprobs through the SDK: each token's log-probability and its most likely
    alternatives equal transformers' log-softmax within 1e-4, streamed and not."""
    from qwen3vl_epd.prompt.messages import parse_messages

    turns = CONVERSATIONS["image"]
    c = parse_messages(json.dumps(turns))
    prompt = processor.process(processor.apply_chat_template(c.turns), c.images, raw_prompt=True)
    tokens = reference_greedy(reference, prompt, 6)
    ref = reference_logprobs(reference, prompt, tokens)
    kw = dict(model="tiny", messages=turns, max_tokens=6, logprobs=True, top_logprobs=3)
    if stream:
        chunks = list(sdk.chat.completions.create(stream=True, **kw))
        content = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    else:
        content = sdk.chat.completions.create(**kw).choices[0].logprobs.content
    assert [e.token for e in content] == [processor.tokenizer.decode([t]) for t in tokens]
    for e, row, t in zip(content, ref, tokens):
        assert abs(e.logprob - row[t].item()) <= 1e-4 and e.bytes == list(e.token.encode())
        top = row.topk(3)
        assert [a.token for a in e.top_logprobs] == [processor.tokenizer.decode([i]) for i in top.indices.tolist()]
        assert max(abs(a.logprob - v) for a, v in zip(e.top_logprobs, top.values.tolist())) <= 1e-4
    plain = sdk.chat.completions.create(model="tiny", messages=turns, max_tokens=6)
    assert plain.choices[0].logprobs is None
    status, body = status_of(lambda: sdk.chat.completions.create(**{**kw, "top_logprobs": 21}))
    assert status == 400 and body["param"] == "top_logprobs" and "0..20" in body["message"]


def test_logprobs_on_the_triton_endpoints(server, processor, reference):
    """The `logprobs` input and `token_logprobs` output on `ensemble` (gRPC stream) and `complete`
    (HTTP infer): the same entries, equal to transformers' log-softmax."""
    text = "Tell me about the sea."
    prompt = processor.process(text)
    tokens = reference_greedy(reference, prompt, 5)
    ref = reference_logprobs(reference, prompt, tokens)
    streamed = [e for r in generate(server.grpc_url, text, model="ensemble", stream=True, max_tokens=5, logprobs=2)
                for e in r.logprobs]
    assert [e["token_id"] for e in streamed] == tokens
    for e, row, t in zip(streamed, ref, tokens):
        assert abs(e["logprob"] - row[t].item()) <= 1e-4
        assert [a["token_id"] for a in e["top_logprobs"]] == row.topk(2).indices.tolist()
    infer = {"inputs": [{"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [text]},
                        {"name": "max_tokens", "shape": [1, 1], "datatype": "INT32", "data": [5]},
                        {"name": "logprobs", "shape": [1, 1], "datatype": "INT32", "data": [2]}]}
    with urllib.request.urlopen(urllib.request.Request(f"http://{server.http_url}/v2/models/complete/infer",
                                                       data=json.dumps(infer).encode()), timeout=60) as r:
        outputs = {o["name"]: o["data"] for o in json.loads(r.read())["outputs"]}
    whole = json.loads(outputs["token_logprobs"][0])
    assert [e["token_id"] for e in whole] == tokens
    assert max(abs(a["logprob"] - b["logprob"]) for a, b in zip(whole, streamed)) <= 1e-5


def test_penalties_and_logit_bias_reach_the_engine(server, sdk, processor):
    """logit_bias (ids as strings, as the SDK sends them) and the penalties go through; a bias of
    100 makes one token every token, and presence/frequency penalties then break the run."""
    x = processor.tokenizer.encode(" sea")[0]
    kw = dict(model="tiny", messages=CONVERSATIONS["text"], max_tokens=6, logprobs=True)
    forced = sdk.chat.completions.create(logit_bias={str(x): 100}, **kw).choices[0].logprobs.content
    assert [e.token for e in forced] == [processor.tokenizer.decode([x])] * 6
    broken = sdk.chat.completions.create(logit_bias={str(x): 10}, presence_penalty=2, frequency_penalty=2,
                                         **kw).choices[0].logprobs.content
    assert [e.token for e in broken] != [processor.tokenizer.decode([x])] * 6
    status, body = status_of(lambda: sdk.chat.completions.create(presence_penalty=2.5, **kw))
    assert status == 400 and body["param"] == "presence_penalty" and "-2..2" in body["message"]
    status, body = status_of(lambda: sdk.chat.completions.create(logit_bias={"x": 1}, **kw))
    assert status == 400 and body["param"] == "logit_bias"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    kind: Literal["cat", "dog", "dragon"]
    age: int = pydantic.Field(ge=0, le=30)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_structured_outputs_parse_through_the_sdk(server, sdk, stream):
    """The SDK's own parse() with a pydantic model (it sends a strict json_schema), json_object, and
    a schema the grammar library refuses; the random tiny model never writes JSON unaided."""
    messages = CONVERSATIONS["image"]
    if stream:
        with sdk.chat.completions.stream(model="tiny", messages=messages, max_tokens=80, response_format=Pet) as s:
            final = s.get_final_completion()
    else:
        final = sdk.chat.completions.parse(model="tiny", messages=messages, max_tokens=80, response_format=Pet)
    assert final.choices[0].finish_reason == "stop" and isinstance(final.choices[0].message.parsed, Pet)
    text, reason, _ = sdk_text(sdk, stream, messages=messages, max_tokens=120,
                               response_format={"type": "json_object"})
    assert reason == "stop" and isinstance(json.loads(text), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    status, body = status_of(lambda: sdk_text(sdk, stream, messages=CONVERSATIONS["text"], response_format=bad))
    assert status == 400 and body["param"] == "response_format" and "Invalid type: nonsense" in body["message"]


class Weather(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    city: str = pydantic.Field(max_length=8)
    unit: Literal["celsius", "fahrenheit"]


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                                 "parameters": Weather.model_json_schema()}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


def sdk_calls(sdk, stream: bool, **kw):
    """(content, tool_calls as (name, arguments), finish_reason) through the SDK, streamed and assembled or not."""
    if not stream:
        choice = sdk.chat.completions.create(model="tiny", **kw).choices[0]
        calls = choice.message.tool_calls or []
        return choice.message.content, [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason
    with sdk.chat.completions.stream(model="tiny", **kw) as s:
        final = s.get_final_completion()
    choice = final.choices[0]
    calls = choice.message.tool_calls or []
    return choice.message.content, [(c.function.name, c.function.arguments) for c in calls], choice.finish_reason


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_tool_calls_forced_by_tool_choice(server, sdk, stream):
    """required and a named function are enforced by the structured-output grammar: the random
    tiny model calls a tool, its arguments valid for the tool's parameters; finish_reason tool_calls."""
    messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
    _, calls, reason = sdk_calls(sdk, stream, messages=messages, tools=[WEATHER_TOOL], tool_choice="required",
                                 max_tokens=80)
    assert reason == "tool_calls" and len(calls) == 1 and calls[0][0] == "get_weather"
    Weather.model_validate_json(calls[0][1])
    named = {"type": "function", "function": {"name": "get_time"}}
    _, calls, reason = sdk_calls(sdk, stream, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=named,
                                 max_tokens=80)
    assert reason == "tool_calls" and calls[0][0] == "get_time" and json.loads(calls[0][1])["zone"] in ("UTC", "CET")


def test_tools_are_rendered_by_the_template_and_tool_turns_go_back(server, sdk, processor, reference):
    """auto: the prompt carries the tools as the chat template renders them (the answer equals
    transformers' greedy over that prompt); a tool round trip (assistant tool_calls, tool turn) too."""
    from qwen3vl_epd.prompt.messages import parse_messages

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Oslo", "unit": "celsius"}'}}
    conversations = [[{"role": "user", "content": "What is the weather in Oslo?"}],
                     [{"role": "user", "content": "What is the weather in Oslo?"},
                      {"role": "assistant", "content": None, "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees, rain"}]]
    for turns in conversations:
        c = parse_messages(json.dumps(turns))
        prompt = processor.process(processor.apply_chat_template(c.turns, [WEATHER_TOOL]), raw_prompt=True)
        want = processor.tokenizer.decode(reference_greedy(reference, prompt, MAX_TOKENS), skip_special_tokens=True)
        r = sdk.chat.completions.create(model="tiny", messages=turns, tools=[WEATHER_TOOL], max_tokens=MAX_TOKENS)
        assert r.choices[0].message.content == want and r.usage.prompt_tokens == prompt.fill_ids.numel()
    status, body = status_of(lambda: sdk.chat.completions.create(
        model="tiny", messages=conversations[0], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert status == 400 and body["param"] == "tool_choice"


def hits(server) -> float:
    return sum(server.metric_values("epd_prefix_cache_hit_tokens_total").values())


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_n_choices_share_the_prompt_kv(server, sdk, stream):
    """n = 3: choice i is what one request with seed + i gives; choices 1 and 2 start after choice 0
    has answered and reuse its prompt's KV blocks from the prefix cache."""
    messages = [{"role": "user", "content": "Write a long story about a dragon who paints. " * 4}]
    kw = dict(model="tiny", messages=messages, max_tokens=6, temperature=0.9, seed=11)
    before = hits(server)
    if stream:
        texts = ["", "", ""]
        for c in sdk.chat.completions.create(n=3, stream=True, **kw):
            for choice in c.choices:
                texts[choice.index] += choice.delta.content or ""
    else:
        r = sdk.chat.completions.create(n=3, **kw)
        texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
        assert r.usage.completion_tokens == 18
    assert hits(server) - before >= 2 * 32  # two choices' prompt blocks (all full ones but the last) from the cache
    alone = [sdk.chat.completions.create(**{**kw, "seed": 11 + i}).choices[0].message.content for i in range(3)]
    assert texts == alone and len(set(texts)) > 1


def test_text_completions_models_and_door_metrics(server, sdk, processor, reference):
    """/v1/completions takes the prompt as it is (no chat template), streamed or not, with logprobs;
    /v1/models/{id}; the door's own counters on its /metrics."""
    prompt = "The sea is"
    tokens = reference_greedy(reference, processor.process(prompt, raw_prompt=True), 8)
    want = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    r = sdk.completions.create(model="tiny", prompt=prompt, max_tokens=8, logprobs=2)
    assert r.choices[0].text == want and r.usage.completion_tokens == len(tokens)
    assert len(r.choices[0].logprobs.tokens) == len(tokens) and len(r.choices[0].logprobs.top_logprobs[0]) == 2
    streamed = "".join(c.choices[0].text for c in sdk.completions.create(model="tiny", prompt=prompt, max_tokens=8,
                                                                           stream=True) if c.choices)
    assert streamed == want
    status, body = status_of(lambda: sdk.completions.create(model="tiny", prompt=prompt, echo=True))
    assert status == 400 and body["param"] == "echo"
    assert sdk.models.retrieve("tiny").id == "tiny"
    status, body = status_of(lambda: sdk.models.retrieve("other"))
    assert status == 404 and body["code"] == "model_not_found"
    base = server.openai_url.removesuffix("/v1")
    with urllib.request.urlopen(base + "/metrics", timeout=10) as m:
        text = m.read().decode()
    assert 'epd_openai_requests_total{endpoint="/v1/completions",status="200"} 2' in text
    assert 'epd_openai_requests_total{endpoint="/v1/completions",status="400"} 1' in text
    tokens_out = float(re.search(r"^epd_openai_completion_tokens_total (\S+)$", text, re.M).group(1))
    assert tokens_out >= 2 * len(tokens)


LANGCHAIN = """
import json, sys
from typing import Literal
from pydantic import BaseModel, ConfigDict, Field
from langchain_openai import ChatOpenAI

class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=6)
    kind: Literal["cat", "dog", "dragon"]
    age: int = Field(ge=0, le=30)

class get_weather(BaseModel):  # a tool as a pydantic model: bounded, so the random model finishes its call
    '''The weather in a city.'''
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=8)

llm = ChatOpenAI(base_url=sys.argv[1], api_key="unused", model="tiny", max_tokens=80, max_retries=0)
pet = llm.with_structured_output(Pet, method="json_schema", strict=True).invoke("Describe a pet.")
call = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?").tool_calls[0]
print(json.dumps({"pet": pet.model_dump(), "call": call["name"], "args": call["args"]}))
"""


def test_langchain_structured_output_and_tools(server):
    """langchain-openai (its own venv, support/clients.py) against the door: with_structured_output
    with a pydantic model, and bind_tools with a forced tool, as agents use them."""
    from support import clients

    out = subprocess.run([str(clients.python()), "-c", LANGCHAIN, server.openai_url], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    Pet.model_validate(result["pet"])
    assert result["call"] == "get_weather" and isinstance(result["args"].get("city"), str)


def test_response_format_and_tools_on_the_triton_door(server):
    """The `response_format` input (here a regex) and `tools` (rendered with `messages`) on ensemble
    and language; tools without messages are refused naming the field."""
    text, last = text_of(generate(server.grpc_url, "Give a code.", model="ensemble", max_tokens=40,
                                  response_format=json.dumps({"type": "regex", "regex": "[A-Z]{2}-[0-9]{3}"})))
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", text) and last.finish_reason == "stop"
    turns = [{"role": "user", "content": "Weather in Oslo?"}]
    forced = {"type": "grammar", "grammar": 'start: <tool_call> "\\n" call "\\n" </tool_call>\ncall: %json '
              + json.dumps({"type": "object", "properties": {"name": {"const": "get_time"}, "arguments": {
                  "type": "object", "properties": {"zone": {"enum": ["UTC"]}}, "required": ["zone"],
                  "additionalProperties": False}}, "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": {"whitespace_flexible": False}})}
    text, _ = text_of(generate(server.http_url, None, protocol="http", messages=turns, tools=json.dumps([TIME_TOOL]),
                               max_tokens=40, response_format=json.dumps(forced)))
    assert json.loads(text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))["name"] == "get_time"
    with pytest.raises(RequestError, match="tools: needs messages"):
        text_of(generate(server.grpc_url, "hi", tools=json.dumps([TIME_TOOL])))
