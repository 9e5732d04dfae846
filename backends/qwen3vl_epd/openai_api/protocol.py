"""OpenAI chat completions ↔ the language model's inputs and outputs: request checks, response and
chunk objects, error objects. Plain dicts, no I/O."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from qwen3vl_epd.openai_api.tools import ToolError, Tools, tools_of
from qwen3vl_epd.prompt import messages as chat
from qwen3vl_epd.wire import CODE_PREFIX, MAX_LOGPROBS, message_code

# Triton error code (the "[CODE] " prefix of every model error) → HTTP status and OpenAI error type.
STATUS = {"INVALID_ARG": (400, "invalid_request_error"), "UNAVAILABLE": (503, "service_unavailable"),
          "CANCELLED": (499, "cancelled"), "NOT_FOUND": (404, "not_found_error"),
          "UNSUPPORTED": (400, "invalid_request_error")}
ROLES = {**{role: role for role in chat.ROLES}, **chat.ROLE_ALIASES}
SAMPLING = ("temperature", "top_p", "top_k", "seed", "ignore_eos", "presence_penalty", "frequency_penalty",
            "repetition_penalty")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
MAX_CHOICES = 16  # n at most
PARAMS = (*SAMPLING, "max_tokens", "stop", "messages", "logit_bias", "response_format", "tools", "logprobs")
# Fields we cannot honour: refused rather than silently ignored (value that means "off" passes).
UNSUPPORTED = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
               "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}


class OpenAIError(Exception):
    """An error answered as OpenAI's {"error": {...}} with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_model(cls, message: str) -> OpenAIError:
        """A model's error ("[CODE] field: what is wrong") with the status of its code; the field
        named first is the parameter when it is one of the request's."""
        code = message_code(message)
        status, kind = STATUS.get(code or "", (500, "internal_error"))
        message = CODE_PREFIX.sub("", message, count=1)
        field_ = message.split(":", 1)[0]
        param = field_ if field_ in PARAMS else None
        return cls(status, message, kind, param, code)


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


@dataclass
class ChatRequest:
    """A checked /v1/chat/completions body: the conversation as the model's `messages` input and
    the sampling inputs; remote image and video URLs are listed for the server to fetch or refuse."""

    messages: list[dict]
    sampling: dict
    stream: bool
    include_usage: bool
    remote_media: list[tuple[str, dict, str]] = field(default_factory=list)  # (param, the part's url, image | video)
    logprobs: bool = False
    tools: Tools | None = None  # rendered by the chat template; the answer is parsed for calls
    n: int = 1

    def inputs(self, choice: int) -> tuple[str | None, dict]:
        """(text_input, the language model's other inputs) of one choice; a seed moves on per choice."""
        extra = {"tools": json.dumps(self.tools.tools)} if self.tools else {}
        return None, {**with_seed(self.sampling, choice), "messages": self.messages_json(), **extra}

    def messages_json(self) -> str:
        return json.dumps(self.messages)


def chat_request(body, served_model: str) -> ChatRequest:
    """Check a /v1/chat/completions body; OpenAIError naming the parameter when something is wrong."""
    check_common(body, served_model)
    messages, remote = _messages(body.get("messages"))
    sampling = {**sampling_of(body), **_video_options(body)}
    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict) or response_format.get("type") not in RESPONSE_FORMATS:
            raise invalid(f"response_format: an object with type {', '.join(RESPONSE_FORMATS)}", "response_format")
        if response_format["type"] != "text":
            sampling["response_format"] = json.dumps(response_format)  # the language model compiles it
    try:
        tools = tools_of(body)
    except ToolError as e:
        raise invalid(*e.args) from None
    if tools is not None and (forced := tools.grammar()) is not None:
        if "response_format" in sampling:
            raise invalid("response_format: cannot be combined with tool_choice required or a named function",
                          "response_format")
        sampling["response_format"] = json.dumps(forced)  # the call is enforced by its grammar
    want_logprobs = _logprobs(body, sampling)
    options = body.get("stream_options") or {}
    return ChatRequest(messages, sampling, bool(body.get("stream")), bool(options.get("include_usage")), remote,
                       want_logprobs, tools, choices_of(body))


@dataclass
class TextRequest:
    """A checked /v1/completions body: one prompt, sent as it is (no chat template)."""

    prompt: str
    sampling: dict
    stream: bool
    include_usage: bool
    logprobs: bool = False
    tools = None
    n: int = 1

    def inputs(self, choice: int) -> tuple[str | None, dict]:
        return self.prompt, {**with_seed(self.sampling, choice), "raw_prompt": True}


def text_request(body, served_model: str) -> TextRequest:
    """Check a /v1/completions body (one prompt; `logprobs` the number of alternatives, 0..20)."""
    check_common(body, served_model)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt: one non-empty string per request", "prompt")
    sampling = sampling_of(body)
    top = body.get("logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise invalid(f"logprobs: {top!r} is not an integer in 0..{MAX_LOGPROBS}", "logprobs")
        sampling["logprobs"] = top
    options = body.get("stream_options") or {}
    return TextRequest(prompt, sampling, bool(body.get("stream")), bool(options.get("include_usage")), top is not None,
                       choices_of(body))


def check_common(body, served_model: str) -> None:
    """The body is an object for the served model and asks nothing we cannot honour."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served_model:
        raise OpenAIError(404, f"The model '{model}' does not exist; this server serves '{served_model}'",
                          "invalid_request_error", "model", "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if body.get(name) not in allowed:
            raise invalid(f"{name}: not supported by this server (allowed: {allowed[-1]!r})", name)


def choices_of(body: dict) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise invalid(f"n: {n!r} is not an integer in 1..{MAX_CHOICES}", "n")
    return n


def sampling_of(body: dict) -> dict:
    """The sampling fields both endpoints take, checked, as the language model's inputs."""
    sampling = {k: body[k] for k in SAMPLING if body.get(k) is not None}
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        sampling["max_tokens"] = limit
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise invalid("stop: a string or a list of strings", "stop")
        sampling["stop"] = stop
    for name, value in sampling.items():
        if name == "ignore_eos" and not isinstance(value, bool):
            raise invalid(f"{name}: {value!r} is not a boolean", name)
        if name not in ("ignore_eos", "stop") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise invalid(f"{name}: {value!r} is not a number", name)
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise invalid("logit_bias: an object of token id → bias", "logit_bias")
        sampling["logit_bias"] = json.dumps(bias)
    return sampling


def _logprobs(body: dict, sampling: dict) -> bool:
    """`logprobs` (bool) and `top_logprobs` (0..20, with logprobs) → the model's `logprobs` input."""
    want, top = body.get("logprobs"), body.get("top_logprobs")
    if want is not None and not isinstance(want, bool):
        raise invalid(f"logprobs: {want!r} is not a boolean", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise invalid(f"top_logprobs: {top!r} is not an integer in 0..{MAX_LOGPROBS}", "top_logprobs")
        if not want:
            raise invalid("top_logprobs: needs logprobs set to true", "top_logprobs")
    if want:
        sampling["logprobs"] = top or 0
    return bool(want)


def _messages(messages) -> tuple[list[dict], list[tuple[str, dict]]]:
    """OpenAI turns → the model's layout (role and content only; `developer` is `system`)."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: a non-empty list of turns is required", "messages")
    out, remote = [], []
    for t, turn in enumerate(messages):
        param = f"messages[{t}]"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise invalid(f"{param}.role: {role!r} is not supported ({', '.join(ROLES)})", param)
        content = turn.get("content")
        if isinstance(content, list):
            for p, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                url = part.get(kind) if kind in ("image_url", "video_url") else None
                if isinstance(url, dict) and chat.is_remote_url(url.get("url")):
                    remote.append((f"{param}.content[{p}].{kind}", url, kind.removesuffix("_url")))
        passed = {k: turn[k] for k in ("tool_calls", "tool_call_id") if turn.get(k) is not None}
        out.append({"role": ROLES[role], "content": content, **passed})
    return out, remote


def _video_options(body: dict) -> dict:
    """vLLM's `mm_processor_kwargs` {"fps": F} or {"num_frames": N} → the video_fps / video_frames inputs."""
    kwargs = body.get("mm_processor_kwargs")
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict) or not set(kwargs) <= {"fps", "num_frames"}:
        raise invalid("mm_processor_kwargs: an object with fps or num_frames (video frame sampling)",
                      "mm_processor_kwargs")
    fps, frames = kwargs.get("fps"), kwargs.get("num_frames")
    if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float))):
        raise invalid(f"mm_processor_kwargs.fps: {fps!r} is not a number", "mm_processor_kwargs")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)):
        raise invalid(f"mm_processor_kwargs.num_frames: {frames!r} is not an integer", "mm_processor_kwargs")
    return {k: v for k, v in (("video_fps", fps), ("video_frames", frames)) if v is not None}


def with_seed(sampling: dict, choice: int) -> dict:
    """Choice i of n samples with seed + i, so seeded choices differ yet stay reproducible."""
    return {**sampling, "seed": sampling["seed"] + choice} if "seed" in sampling and choice else sampling
