"""Tool calls on the OpenAI door: `tools` and `tool_choice` checked, a grammar that forces a call
(`required`, a named function) for the structured-output machinery, and the model's
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks parsed back into `tool_calls`."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.DOTALL)


class ToolError(ValueError):
    """A bad `tools` / `tool_choice`: (message, param)."""


@dataclass
class Tools:
    """What a request asked of tools: the definitions the template renders, and the choice."""

    tools: list[dict]
    choice: str | dict  # "auto", "required" or {"type": "function", "function": {"name": ...}}

    def grammar(self) -> dict | None:
        """A response_format that forces one call (required: any tool; named: that one), else None."""
        if self.choice == "auto":
            return None
        named = self.choice["function"]["name"] if isinstance(self.choice, dict) else None
        calls = [_call_schema(t["function"]) for t in self.tools if named in (None, t["function"]["name"])]
        schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
        schema["x-guidance"] = {"whitespace_flexible": False}  # compact JSON, as for response_format
        # <tool_call> and </tool_call> are tokens of their own in Qwen's vocabulary: named as tokens here
        lark = f'start: {OPEN} "\\n" call "\\n" {CLOSE}\ncall: %json {json.dumps(schema)}'
        return {"type": "grammar", "grammar": lark}


def _call_schema(function: dict) -> dict:
    return {"type": "object", "properties": {"name": {"const": function["name"]},
                                             "arguments": function.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def tools_of(body: dict) -> Tools | None:
    """The request's tools, or None (none given, or tool_choice "none": then they are not rendered)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise ToolError("tool_choice: needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise ToolError('tools: a list of {"type": "function", "function": {"name": ..., "parameters": ...}}', "tools")
    choice = "auto" if choice is None else choice
    if choice == "none" or not tools:
        return None
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if choice.get("type") != "function" or name not in names:
            raise ToolError(f"tool_choice: a function of tools ({', '.join(names)})", "tool_choice")
    elif choice not in ("auto", "required"):
        raise ToolError("tool_choice: none, auto, required or {\"type\": \"function\", \"function\": {\"name\"}}",
                        "tool_choice")
    return Tools(tools, choice)


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """(content left, tool_calls) of a finished answer; a block that is not a call stays content."""
    calls, kept, at = [], [], 0
    for m in BLOCK.finditer(text):
        try:
            call = json.loads(m.group(1))
            name, arguments = call["name"], call.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        kept.append(text[at : m.start()])
        at = m.end()
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                                   else json.dumps(arguments)}})
    content = ("".join(kept) + text[at:]).strip() if calls else text
    return content or None, calls


class CallStream:
    """Streams content as it comes until a call may begin; what follows is held back and parsed at
    the end. feed(text) → the content delta to send now."""

    def __init__(self):
        self.text, self.sent = "", 0

    def feed(self, text: str) -> str:
        self.text += text
        start = self.text.find(OPEN, self.sent)
        if start == -1:  # hold back a tail that could be the start of OPEN
            start = len(self.text)
            for k in range(min(len(OPEN) - 1, len(self.text)), 0, -1):
                if self.text.endswith(OPEN[:k]):
                    start -= k
                    break
        out, self.sent = self.text[self.sent : max(start, self.sent)], max(start, self.sent)
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet sent, tool_calls) at the end of the answer."""
        held = self.text[self.sent :]
        content, calls = parse_calls(held)
        return (content or "") if calls else held, calls
