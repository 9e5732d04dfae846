"""Sequence: the state of one request inside the engine (only the Scheduler changes its status)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..detokenizer import Detokenizer
from ..encoder import EncodedPrompt
from ..errors import EpdError
from ..sampling import Sampler, SamplingParams
from ..transfer import PullSession
from .kv_cache import SequenceKV
from .local_prompt import LocalPrompt

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
    params: SamplingParams
    prompt_len: int
    mrope_delta: int
    chunk_tokens: int  # prompt tokens per chunk: the pull and prefill unit
    detokenizer: Detokenizer
    session: PullSession | LocalPrompt | None = None  # where the prompt's rows come from
    emit: Callable[[Piece], None] = lambda piece: None
    cancelled: Callable[[], bool] = lambda: False
    arrived: float = field(default_factory=time.perf_counter)  # at the door
    submitted: float = field(default_factory=time.perf_counter)  # at the engine, its prompt ready
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    kv: SequenceKV | None = None
    prefilled: int = 0  # prompt tokens whose KV is written (a cached prefix counts from admission)
    block_hashes: list[bytes] = field(default_factory=list)  # the prompt's prefix hash chain
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    rows: EncodedPrompt | None = None  # the next prompt chunk, once it has arrived
    tokens: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    probe: bool = False  # a liveness probe: queued first, answered by any forward (Engine.submit)

    def __post_init__(self):
        self.sampler = Sampler(self.params)

    @property
    def kv_reservation(self) -> int:
        """KV tokens reserved at admission: the prompt plus every token it may generate."""
        return self.prompt_len + self.params.max_tokens

    def next_chunk_tokens(self) -> int:
        return min(self.chunk_tokens, self.prompt_len - self.prefilled)

    def next_chunk_range(self) -> tuple[int, int]:
        """The prompt tokens [start, end) to pull and prefill next."""
        return self.prefilled, self.prefilled + self.next_chunk_tokens()

    def piece(self, text: str, reason: str | None = None, error: EpdError | None = None) -> Piece:
        return Piece(text, reason, self.prompt_len, len(self.tokens), error)
