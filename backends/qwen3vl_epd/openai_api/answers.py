"""What the OpenAI door answers: whole responses and streamed chunks of chat and text completions,
n choices each, log-probabilities in each endpoint's layout, tool calls parsed out of the text."""

from __future__ import annotations

import time
import uuid

from qwen3vl_epd.openai_api.tools import CallStream, parse_calls
from qwen3vl_epd.wire import Response

CHAT, TEXT = "chat.completion", "text_completion"


def completion_id(kind: str) -> str:
    return ("chatcmpl-" if kind == CHAT else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(entries: list[dict]) -> dict:
    """The model's `token_logprobs` → chat's choice.logprobs."""
    def item(e):
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}

    return {"content": [{**item(e), "top_logprobs": [item(t) for t in e["top_logprobs"]]} for e in entries],
            "refusal": None}


def text_logprobs(entries: list[dict], offset: int) -> dict:
    """The model's `token_logprobs` → the completions layout, text offsets counted from `offset`."""
    offsets, at = [], offset
    for e in entries:
        offsets.append(at)
        at += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


class Choice:
    """One choice as it streams: its text (held back from where a tool call may begin), its
    log-probabilities and its finish, in the endpoint's layout."""

    def __init__(self, kind: str, index: int, logprobs: bool, tools: bool):
        self.kind, self.index, self.logprobs = kind, index, logprobs
        self.calls = CallStream() if tools else None
        self.sent = 0  # characters sent, for text_offset

    def _entry(self, text: str | None, logprobs: list[dict], reason: str | None = None, **delta) -> dict:
        lp = None
        if self.logprobs:
            lp = chat_logprobs(logprobs) if self.kind == CHAT else text_logprobs(logprobs, self.sent)
        self.sent += len(text or "")
        if self.kind == TEXT:
            return {"index": self.index, "text": text or "", "logprobs": lp, "finish_reason": reason}
        content = {} if text is None else {"content": text}
        return {"index": self.index, "delta": {**content, **delta}, "logprobs": lp, "finish_reason": reason}

    def opening(self) -> list[dict]:
        return [self._entry("", [], role="assistant")] if self.kind == CHAT else []

    def stream(self, out: Response) -> list[dict]:
        """The chunk entries one response of the model makes."""
        text = self.calls.feed(out.text) if self.calls else out.text
        entries = [self._entry(text, out.logprobs)] if text or out.logprobs else []
        if out.finish_reason:
            reason = out.finish_reason
            if self.calls:
                rest, parsed = self.calls.finish()
                if rest:
                    entries.append(self._entry(rest, []))
                for i, call in enumerate(parsed):  # one delta per call, as the SDK assembles them
                    entries.append(self._entry(None, [], tool_calls=[{"index": i, **call}]))
                reason = "tool_calls" if parsed else reason
            entries.append(self._entry(None, [], reason) if self.kind == CHAT else self._entry("", [], reason))
        return entries

    def whole(self, out: Response) -> dict:
        """The choice of a response that is not streamed (`out` holds the whole text)."""
        text, calls = parse_calls(out.text) if self.calls else (out.text, [])
        reason = "tool_calls" if calls else out.finish_reason
        lp = None
        if self.logprobs:
            lp = chat_logprobs(out.logprobs) if self.kind == CHAT else text_logprobs(out.logprobs, 0)
        if self.kind == TEXT:
            return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": reason}
        message = {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}
        return {"index": self.index, "message": message, "logprobs": lp, "finish_reason": reason}


def whole(kind: str, cid: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": cid, "object": kind, "created": int(time.time()), "model": model, "choices": choices,
            "usage": usage_}


def chunk(kind: str, cid: str, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    """One streamed chunk; no choices and a usage: the usage chunk."""
    out = {"id": cid, "object": kind + (".chunk" if kind == CHAT else ""), "created": int(time.time()),
           "model": model, "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_object(served_model: str, created: int) -> dict:
    return {"id": served_model, "object": "model", "created": created, "owned_by": "qwen3vl-epd"}


def models(served_model: str, created: int) -> dict:
    return {"object": "list", "data": [model_object(served_model, created)]}
