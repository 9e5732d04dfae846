"""Sequence: the state of one request inside the engine."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from ..detokenizer import Detokenizer
from ..errors import EpdError
from ..sampling import Sampler, SamplingParams
from ..transfer import PullSession
from .kv_cache import SequenceKV

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = 1  # not admitted: no KV reserved yet
    PREFILL = 2  # admitted, prompt chunks still to run
    DECODE = 3
    FINISHED = 4


@dataclass
class Piece:
    """One streamed response: new text; the last one has finish_reason (or error)."""

    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    error: EpdError | None = None


@dataclass(eq=False)
class Sequence:
    session: PullSession
    params: SamplingParams
    detokenizer: Detokenizer
    emit: Callable[[Piece], None]
    cancelled: Callable[[], bool]
    arrived: float
    chunk_tokens: int
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    kv: SequenceKV | None = None
    next_chunk: int = 0
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    def __post_init__(self):
        self.sampler = Sampler(self.params)

    @property
    def prompt_len(self) -> int:
        return self.session.handle.length

    @property
    def mrope_delta(self) -> int:
        return self.session.handle.mrope_delta

    @property
    def num_chunks(self) -> int:
        return -(-self.prompt_len // self.chunk_tokens)

    @property
    def kv_tokens(self) -> int:
        """The whole reservation: prompt plus every token it may generate."""
        return self.prompt_len + self.params.max_tokens

    def next_chunk_tokens(self) -> int:
        start = self.next_chunk * self.chunk_tokens
        return min(self.chunk_tokens, self.prompt_len - start)
