"""LanguageRequest: one client request from its arrival to its last response, with its state."""

from __future__ import annotations

import enum
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen3vl_epd.errors import EpdError, HandleExpiredError, PeerError
from qwen3vl_epd.language.sampling import SamplingParams
from qwen3vl_epd.prompt.video_processing import VideoOptions

# Encodes of one request, the first included: a pull that fails because its encoder died (before
# any token was sent) is encoded again, by another encoder of the pool.
ENCODE_ATTEMPTS = 3
_serial = itertools.count()


def new_request_id() -> str:
    """An id for a request that came without one: unique per process, readable in a log line."""
    return f"epd-{os.getpid()}-{next(_serial)}"


class Phase(enum.Enum):
    ENCODING = 1  # on the encoder pool, its handle not yet back
    ENGINE = 2  # queued or running in the engine
    DONE = 3  # its last piece was sent


@dataclass
class PromptInputs:
    """The prompt fields of a request: text_input (None: missing), images, videos, raw_prompt, messages."""

    text: str | None
    images: list[bytes] = field(default_factory=list)
    videos: list[bytes] = field(default_factory=list)
    video_options: VideoOptions = field(default_factory=VideoOptions)
    raw_prompt: bool = False
    messages: str | None = None  # a conversation (JSON, OpenAI chat layout) instead of text_input
    tools: str | None = None  # OpenAI function tools (JSON) the chat template renders with messages


@dataclass
class TokenLogprob:
    """One generated token's log-probability under the model's distribution (before temperature,
    top-k and top-p, as OpenAI gives it) and the most likely tokens there: (id, text, logprob)."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class Piece:
    """One streamed response: new text; the last one has finish_reason (or error)."""

    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    error: EpdError | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens since the last piece

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class LanguageRequest:
    """Owned by LanguageService from start() to its final piece; the engine holds it while it runs.
    `respond` is the Triton adapter's sink (any thread); `cancel` is a message, never a callback."""

    params: SamplingParams
    respond: Callable[[Piece], None]
    id: str = field(default_factory=new_request_id)
    arrived: float = field(default_factory=time.perf_counter)  # at the language model
    probe: bool = False  # a liveness probe (the supervisor's): one token at most, queued first
    inputs: PromptInputs | None = None  # kept while it may need another encode
    phase: Phase = Phase.ENGINE
    encodes: int = 0  # encodes sent so far (a lost encoder is retried up to ENCODE_ATTEMPTS)
    cancelled: bool = False

    def lost_encoder(self, piece: Piece) -> bool:
        """The pull failed because its encoder is gone, before any token: worth another encode."""
        lost = isinstance(piece.error, (PeerError, HandleExpiredError)) and piece.num_output_tokens == 0
        return bool(lost and self.phase is Phase.ENGINE and 0 < self.encodes < ENCODE_ATTEMPTS)

    def send(self, piece: Piece) -> None:
        if piece.final:
            self.phase, self.inputs = Phase.DONE, None
        self.respond(piece)
