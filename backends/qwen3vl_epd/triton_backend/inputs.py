"""Request arrays → Python values; plain numpy, testable without Triton (the pb_utils side is
adapter.py)."""

from __future__ import annotations

import numpy as np

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.language.request import PromptInputs
from qwen3vl_epd.prompt.video_processing import VideoOptions
from qwen3vl_epd.wire import SAMPLING_INPUTS


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


def video_options(get) -> VideoOptions:
    """The request's frame sampling (video_fps or video_frames)."""
    return VideoOptions(fps=first(get("video_fps")), num_frames=first(get("video_frames")))


def prompt_inputs(get) -> PromptInputs:
    """The prompt fields of a request; InvalidInputError for text that is not UTF-8."""
    return PromptInputs(text_field(get, "text_input"), byte_items(get("image")), byte_items(get("video")),
                        video_options(get), bool(first(get("raw_prompt")) or False), text_field(get, "messages"),
                        text_field(get, "tools"))
