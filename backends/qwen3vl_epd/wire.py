"""The wire between clients and our models: input and output names, tritonclient tensors, result
parsing, and the error code every message carries. The client, the encoder pool, the supervisor's
probes and the OpenAI server all build and read requests here."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

PROMPT_INPUTS = ("text_input", "image", "video", "video_fps", "video_frames", "raw_prompt", "messages", "tools")
SAMPLING_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "stop", "logprobs",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "response_format")
MAX_LOGPROBS = 20  # most likely tokens per position a request may ask for, as OpenAI allows
# token_logprobs: JSON, per token generated since the last response {token_id, token, logprob,
# top_logprobs: [{token_id, token, logprob}]}; [] when the request's `logprobs` input is absent.
OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "token_logprobs")
# A language request whose id starts with this is a liveness probe (the supervisor's): one token at
# most, queued first, and answered by the engine's next forward (see Engine.submit).
PROBE_ID_PREFIX = "epd-probe-"

# Every error message starts with its code in brackets, "[INVALID_ARG] image 1: ...": gRPC stream
# errors reach clients as a message only (tritonserver 2.51 sends no status code on a stream),
# and BLS hands errors back as INTERNAL, so the code travels in the message itself.
CODES = ("INVALID_ARG", "UNAVAILABLE", "CANCELLED", "INTERNAL", "NOT_FOUND", "UNSUPPORTED", "UNKNOWN")
CODE_PREFIX = re.compile(r"\[(" + "|".join(CODES) + r")\] ")
# A transport's own status (HTTP, gRPC) → the code, for errors that carry none in their message.
STATUS_CODES = {"400": "INVALID_ARG", "503": "UNAVAILABLE", "499": "CANCELLED",
                "StatusCode.INVALID_ARGUMENT": "INVALID_ARG", "StatusCode.UNAVAILABLE": "UNAVAILABLE",
                "StatusCode.RESOURCE_EXHAUSTED": "UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED": "UNAVAILABLE",
                "StatusCode.CANCELLED": "CANCELLED"}
_DTYPES = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
           "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64), "raw_prompt": ("BOOL", np.bool_),
           "ignore_eos": ("BOOL", np.bool_), "stream": ("BOOL", np.bool_),
           "logprobs": ("INT32", np.int32), "presence_penalty": ("FP32", np.float32),
           "frequency_penalty": ("FP32", np.float32), "repetition_penalty": ("FP32", np.float32),
           "video_fps": ("FP32", np.float32), "video_frames": ("INT32", np.int32),
           "language_idle": ("BOOL", np.bool_)}


def coded_message(message: str, code: str) -> str:
    """The message with its code in front, unless it carries one already (passed on from a model)."""
    return message if CODE_PREFIX.search(message) else f"[{code}] {message}"


def message_code(message: str) -> str | None:
    """The code an error message carries, or None."""
    found = CODE_PREFIX.search(message or "")
    return found.group(1) if found else None


def error_code(status: object, message: str) -> str:
    """The code of an error answer: its message's, else tritonserver's word for a model process
    that is gone (UNAVAILABLE), else its transport status's, else INTERNAL."""
    if code := message_code(message):
        return code
    if "is not healthy" in (message or ""):
        return "UNAVAILABLE"
    return STATUS_CODES.get(str(status), "INTERNAL")


def tensor(name: str, array: np.ndarray, datatype: str):
    """A tritonclient gRPC input (the asyncio client takes the same)."""
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def bytes_input(name: str, items: list[bytes]):
    """A BYTES input of shape [1, N]."""
    return tensor(name, np.array([items], dtype=np.object_).reshape(1, len(items)), "BYTES")


def value_input(name: str, value):
    """A typed [1, 1] input (max_tokens, temperature, raw_prompt, stream, ...)."""
    datatype, np_type = _DTYPES[name]
    return tensor(name, np.array([[value]], dtype=np_type), datatype)


def request_inputs(prompt: str | None, images: list[bytes], stream: bool | None, fields: dict,
                   videos: list[bytes] = ()) -> list:
    """The tensors of one language (or encoder) request; `fields` by input name (stop: strings,
    messages, logit_bias and response_format: JSON text; None: left out); `stream` None leaves it out."""
    inputs = [] if stream is None else [value_input("stream", stream)]
    if prompt is not None:
        inputs.append(bytes_input("text_input", [prompt.encode()]))
    if images:
        inputs.append(bytes_input("image", list(images)))
    if videos:
        inputs.append(bytes_input("video", list(videos)))
    fields = {k: v for k, v in fields.items() if v is not None}
    for name, value in fields.items():
        if name == "stop":
            inputs.append(bytes_input("stop", [s.encode() for s in value]))
        elif name in ("messages", "tools", "logit_bias", "response_format"):
            inputs.append(bytes_input(name, [value.encode()]))
        else:
            inputs.append(value_input(name, value))
    return inputs


@dataclass
class Response:
    """One language response: new text (the whole text when not streaming); finish_reason on the last."""

    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    logprobs: list[dict] = field(default_factory=list)  # {token_id, token, logprob, top_logprobs: [...]}


def response_of(result) -> Response:
    """A tritonclient gRPC InferResult of the language model (sync or asyncio client alike)."""
    return Response(
        text=result.as_numpy("text_output").reshape(-1)[0].decode(),
        finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode(),
        num_input_tokens=int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
        num_output_tokens=int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
        logprobs=json.loads(logprobs.reshape(-1)[0]) if (logprobs := result.as_numpy("token_logprobs")) is not None else [],
    )
