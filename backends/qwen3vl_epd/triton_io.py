"""The Triton interface's names, and request arrays → Python values; plain numpy, testable without
Triton (the pb_utils side is triton_adapter.py)."""

from __future__ import annotations

import re

import numpy as np

from .errors import EpdError, InvalidInputError

PROMPT_INPUTS = ("text_input", "image", "raw_prompt", "messages")
SAMPLING_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "stop")
OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens")
# A language request whose id starts with this is a liveness probe (the supervisor's): one token at
# most, queued first, and answered by the engine's next forward (see Engine.submit).
PROBE_ID_PREFIX = "epd-probe-"


def first(array: np.ndarray | None, kind=None):
    """The single value of an optional [1] / [1, 1] input, or None when absent."""
    if array is None or array.size == 0:
        return None
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        return value if kind is bytes else value.decode("utf-8")
    return kind(value) if kind else value.item()


def byte_items(array: np.ndarray | None) -> list[bytes]:
    """All elements of an optional BYTES input, as raw bytes."""
    if array is None:
        return []
    return [bytes(x) for x in array.reshape(-1)]


# Every error message starts with its code in brackets, "[INVALID_ARG] image 1: ...": gRPC stream
# errors reach clients as a message only (tritonserver 2.51 sends no status code on a stream),
# and BLS hands errors back as INTERNAL, so the code travels in the message itself.
CODE_PREFIX = re.compile(r"\[(INVALID_ARG|UNAVAILABLE|CANCELLED|INTERNAL|NOT_FOUND|UNSUPPORTED|UNKNOWN)\] ")


def coded_message(message: str, code: str) -> str:
    """The message with its code in front, unless it carries one already (passed on from a model)."""
    return message if CODE_PREFIX.search(message) else f"[{code}] {message}"


def message_code(message: str) -> str | None:
    """The code an error message carries, or None."""
    found = CODE_PREFIX.search(message)
    return found.group(1) if found else None


def error_code(exc: BaseException) -> str:
    """TritonError code name for an exception: typed errors carry theirs, the rest are INTERNAL."""
    return exc.code if isinstance(exc, EpdError) else "INTERNAL"


def sampling_fields(get) -> dict:
    """The optional sampling inputs of a request; `get(name)` returns an input array or None."""
    fields = {name: first(get(name)) for name in SAMPLING_INPUTS if name != "stop"}
    fields["stop"] = [s.decode(errors="replace") for s in byte_items(get("stop"))]
    return fields


def text_field(get, name: str) -> str | None:
    """A string input's value, or None; InvalidInputError naming it when it is not UTF-8."""
    try:
        return first(get(name))
    except UnicodeDecodeError:
        raise InvalidInputError(f"{name}: not valid UTF-8") from None


def prompt_fields(get) -> tuple[str | None, list[bytes], bool]:
    """(text_input, images, raw_prompt) of a request; InvalidInputError for text that is not UTF-8."""
    return text_field(get, "text_input"), byte_items(get("image")), bool(first(get("raw_prompt")) or False)
