"""Sequence: the state of one request inside the engine (only the Scheduler changes its status)."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.language.detokenizer import Detokenizer
from qwen3vl_epd.language.engine.kv_cache import SequenceKV
from qwen3vl_epd.language.request import LanguageRequest, Piece, TokenLogprob
from qwen3vl_epd.language.sampling import Sampler, SamplingParams
from qwen3vl_epd.prompt.encoded import EncodedPrompt
from qwen3vl_epd.prompt.source import PromptSource

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = 1  # not admitted: no KV reserved yet
    PREFILL = 2  # admitted, prompt chunks still to run
    DECODE = 3
    FINISHED = 4


@dataclass(eq=False)
class Sequence:
    params: SamplingParams
    prompt_len: int
    mrope_delta: int
    chunk_tokens: int  # prompt tokens per chunk: the pull and prefill unit
    detokenizer: Detokenizer
    source: PromptSource | None = None  # where the prompt's rows come from: pulled, or local
    request: LanguageRequest | None = None  # whose tokens these are (None: scheduler tests)
    submitted: float = field(default_factory=time.perf_counter)  # at the engine, its prompt ready
    id: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    kv: SequenceKV | None = None
    prefilled: int = 0  # prompt tokens whose KV is written (a cached prefix counts from admission)
    block_hashes: list[bytes] = field(default_factory=list)  # the prompt's prefix hash chain
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    rows: EncodedPrompt | None = None  # the next prompt chunk, once it has arrived
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens not yet in a piece
    first_token_at: float | None = None

    def __post_init__(self):
        self.sampler = Sampler(self.params)
        self.grammar = self.params.grammar.matcher() if self.params.grammar is not None else None

    @property
    def probe(self) -> bool:
        """A liveness probe: queued first, answered by any forward (Engine.submit)."""
        return self.request is not None and self.request.probe

    @property
    def arrived(self) -> float:
        return self.request.arrived if self.request is not None else self.submitted

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
        """The next piece to send; it carries the log-probabilities gathered since the last one."""
        logprobs, self.logprobs = self.logprobs, []
        return Piece(text, reason, self.prompt_len, len(self.tokens), error, logprobs)
