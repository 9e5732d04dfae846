"""The `messages` input: a conversation in the OpenAI chat layout → turns for the chat template
plus the images in the order the template places them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from qwen3vl_epd.errors import InvalidInputError

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn


def is_remote_url(value) -> bool:
    """An http(s) image URL: fetched only by the OpenAI server when enabled, never by the model."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


@dataclass
class Conversation:
    """Turns whose image parts are all {"type": "image"}, and the images they stand for, in order."""

    turns: list[dict]
    images: list[bytes]


def parse_messages(text: str, images: Sequence[bytes] = ()) -> Conversation:
    """JSON conversation + the request's `image` elements → Conversation; InvalidInputError naming
    the turn and part when something is wrong. An image part is {"type": "image", "image": N} (an
    element of `image`; without N: the next one in order), or carries a data: URL in "image" or
    OpenAI's {"type": "image_url", "image_url": {"url": ...}}."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"messages: not valid JSON: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages: must be a non-empty JSON array of turns")
    picked: list[bytes] = []
    used: set[int] = set()
    implicit = 0
    turns = []
    for t, turn in enumerate(messages):
        where = f"messages: turn {t}"
        if not isinstance(turn, dict):
            raise InvalidInputError(f"{where}: must be an object with role and content")
        role = turn.get("role")
        if role not in ROLES:
            raise InvalidInputError(f"{where}: unknown role {role!r} (one of {', '.join(ROLES)})")
        content = turn.get("content")
        if content is None and role == "assistant":
            content = ""
        calls = turn.get("tool_calls") if role == "assistant" else None
        extra = {"tool_calls": _tool_calls(calls, where)} if calls else {}
        if isinstance(content, str):
            turns.append({"role": role, "content": content, **extra})
            continue
        if not isinstance(content, list):
            raise InvalidInputError(f"{where} ({role}): content must be a string or a list of parts")
        parts = []
        for p, part in enumerate(content):
            at = f"{where} ({role}) part {p}"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise InvalidInputError(f"{at}: a text part needs a string 'text'")
                parts.append({"type": "text", "text": part["text"]})
                continue
            if kind not in ("image", "image_url"):
                raise InvalidInputError(f"{at}: unsupported part type {kind!r} (text, image, image_url)")
            ref = _image_ref(part, at)
            if ref is None:
                ref, implicit = implicit, implicit + 1
            if isinstance(ref, int):
                if not 0 <= ref < len(images):
                    raise InvalidInputError(f"{at}: image index {ref} is out of range ({len(images)} images sent)")
                used.add(ref)
                picked.append(images[ref])
            else:
                picked.append(ref)
            parts.append({"type": "image"})
        if role == "tool" and any(part["type"] != "text" for part in parts):
            raise InvalidInputError(f"{where} (tool): a tool result is text")
        turns.append({"role": role, "content": parts, **extra})
    if len(used) != len(images):
        unused = sorted(set(range(len(images))) - used)
        raise InvalidInputError(f"image: elements {unused} of {len(images)} are not used by any messages part")
    return Conversation(turns, picked)


def _tool_calls(calls, where: str) -> list[dict]:
    """An assistant turn's tool_calls (OpenAI's layout), for the chat template to render."""
    if not isinstance(calls, list):
        raise InvalidInputError(f"{where} (assistant): tool_calls must be a list")
    out = []
    for c, call in enumerate(calls):
        f = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), (str, dict))):
            raise InvalidInputError(f"{where} (assistant) tool call {c}: needs function.name and function.arguments")
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": f["name"], "arguments": f["arguments"]}})
    return out


def parse_tools(text: str | None) -> list[dict] | None:
    """The `tools` input (OpenAI's function tools, JSON) for the chat template; InvalidInputError naming it."""
    if text is None:
        return None
    try:
        tools = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"tools: not valid JSON: {e}") from None
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type") == "function" and isinstance((t.get("function") or {}).get("name"), str)
            for t in tools):
        raise InvalidInputError('tools: a list of {"type": "function", "function": {"name": ..., "parameters": ...}}')
    return tools


def _image_ref(part: dict, at: str) -> int | bytes | None:
    """An image part's reference: an index into `image`, data: URL bytes, or None (the next one)."""
    value = part.get("image")
    if part["type"] == "image_url":
        value = part.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise InvalidInputError(f"{at}: an image_url part needs image_url.url")
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith("data:"):
        return value.encode()
    if is_remote_url(value):
        raise InvalidInputError(f"{at}: remote image URLs are not fetched by the model; send the image "
                                "bytes in `image` or a data: URL (the OpenAI server can fetch them when enabled)")
    raise InvalidInputError(f"{at}: an image is an index into `image` or a data: URL")
