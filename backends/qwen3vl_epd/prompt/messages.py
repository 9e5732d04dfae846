"""The `messages` input: a conversation in the OpenAI chat layout → turns for the chat template
plus the images and videos in the order the template places them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from qwen3vl_epd.errors import InvalidInputError

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system turn


def is_remote_url(value) -> bool:
    """An http(s) image or video URL: fetched only by the OpenAI server when enabled, never by the model."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


@dataclass
class Conversation:
    """Turns whose image and video parts are all {"type": "image"} / {"type": "video"}, and the
    images and videos they stand for, each in order."""

    turns: list[dict]
    images: list[bytes]
    videos: list[bytes] = field(default_factory=list)


class _Media:
    """One kind of media part (image or video): the request's elements and those the parts pick."""

    def __init__(self, kind: str, sent: Sequence[bytes]):
        self.kind, self.sent, self.picked, self.used, self.implicit = kind, sent, [], set(), 0

    def pick(self, part: dict, at: str) -> None:
        ref = _media_ref(part, self.kind, at)
        if ref is None:
            ref, self.implicit = self.implicit, self.implicit + 1
        if isinstance(ref, int):
            if not 0 <= ref < len(self.sent):
                raise InvalidInputError(f"{at}: {self.kind} index {ref} is out of range ({len(self.sent)} "
                                        f"{self.kind}s sent)")
            self.used.add(ref)
            ref = self.sent[ref]
        self.picked.append(ref)

    def check_used(self) -> None:
        if len(self.used) != len(self.sent):
            unused = sorted(set(range(len(self.sent))) - self.used)
            raise InvalidInputError(f"{self.kind}: elements {unused} of {len(self.sent)} are not used by any "
                                    "messages part")


def parse_messages(text: str, images: Sequence[bytes] = (), videos: Sequence[bytes] = ()) -> Conversation:
    """JSON conversation + the request's `image` and `video` elements → Conversation;
    InvalidInputError naming the turn and part when something is wrong. An image part is {"type":
    "image", "image": N} (an element of `image`; without N: the next one in order), or carries a
    data: URL in "image" or OpenAI's {"type": "image_url", "image_url": {"url": ...}}; video parts
    are the same with "video" and "video_url"."""
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"messages: not valid JSON: {e}") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidInputError("messages: must be a non-empty JSON array of turns")
    media = {"image": _Media("image", images), "video": _Media("video", videos)}
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
            medium = kind.removesuffix("_url") if isinstance(kind, str) else None
            if medium not in media:
                raise InvalidInputError(f"{at}: unsupported part type {kind!r} (text, image, image_url, video, "
                                        "video_url)")
            media[medium].pick(part, at)
            parts.append({"type": medium})
        if role == "tool" and any(part["type"] != "text" for part in parts):
            raise InvalidInputError(f"{where} (tool): a tool result is text")
        turns.append({"role": role, "content": parts, **extra})
    for m in media.values():
        m.check_used()
    return Conversation(turns, media["image"].picked, media["video"].picked)


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


def _media_ref(part: dict, kind: str, at: str) -> int | bytes | None:
    """A media part's reference: an index into `image` / `video`, data: URL bytes, or None (the next one)."""
    value = part.get(kind)
    if part["type"] == f"{kind}_url":
        value = part.get(f"{kind}_url")
        value = value.get("url") if isinstance(value, dict) else value
        if not isinstance(value, str):
            raise InvalidInputError(f"{at}: a {kind}_url part needs {kind}_url.url")
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith("data:"):
        return value.encode()
    if is_remote_url(value):
        raise InvalidInputError(f"{at}: remote {kind} URLs are not fetched by the model; send the {kind} "
                                f"bytes in `{kind}` or a data: URL (the OpenAI server can fetch them when enabled)")
    raise InvalidInputError(f"{at}: {'an' if kind == 'image' else 'a'} {kind} is an index into `{kind}` or a data: URL")
