"""Tool calls on the OpenAI door without a server: checking tools and tool_choice, the grammar
that forces a call, parsing <tool_call> blocks, streaming them; and tool turns in `messages`."""

import json

import pytest

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.openai_api.tools import CallStream, ToolError, parse_calls, tools_of
from qwen3vl_epd.prompt.messages import parse_messages, parse_tools

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def test_tool_choice_decides_what_is_forced():
    assert tools_of({}) is None and tools_of({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert tools_of({"tools": [WEATHER]}).grammar() is None  # auto
    required = tools_of({"tools": [WEATHER, TIME], "tool_choice": "required"}).grammar()["grammar"]
    assert '"anyOf"' in required and '"get_weather"' in required and '"get_time"' in required
    named = tools_of({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}})
    assert '"get_weather"' not in named.grammar()["grammar"]
    for body, param in [({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice"),
                        ({"tools": [{"type": "function"}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice")]:
        with pytest.raises(ToolError) as e:
            tools_of(body)
        assert e.value.args[1] == param


def test_calls_are_parsed_and_streamed():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    content, calls = parse_calls(text)
    assert content == "Let me look." and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    assert parse_calls("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    stream, sent = CallStream(), []
    for piece in ["Let me", " look.\n<tool", '_call>\n{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}\n</tool_call>']:
        sent.append(stream.feed(piece))
    assert "".join(sent) == "Let me look.\n" and "<" not in "".join(sent)
    rest, streamed = stream.finish()
    assert rest == "" and streamed[0]["function"] == calls[0]["function"]


def test_tool_turns_reach_the_template():
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    c = parse_messages(json.dumps(turns))
    assert c.turns[1]["tool_calls"][0]["function"]["name"] == "get_weather" and c.turns[2]["role"] == "tool"
    assert parse_tools(json.dumps([WEATHER])) == [WEATHER]
    with pytest.raises(InvalidInputError, match="tool call 0: needs function.name"):
        parse_messages(json.dumps([{"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}]))
    with pytest.raises(InvalidInputError, match="tools: a list of"):
        parse_tools('[{"type": "retrieval"}]')
