"""Per-request sampling: greedy by default; temperature, top-k, top-p; seeded generators; penalties."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from qwen3vl_epd.errors import InvalidInputError
from qwen3vl_epd.language.penalties import Penalties
from qwen3vl_epd.wire import MAX_LOGPROBS


@dataclass
class SamplingParams:
    """Decoding settings of one request; temperature 0 means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks)
    logprobs: int | None = None  # None: off; k: each token's log-probability and the k most likely
    presence_penalty: float = 0.0  # OpenAI's: minus this for each token generated at least once
    frequency_penalty: float = 0.0  # OpenAI's: minus this times each token's count so far
    repetition_penalty: float = 1.0  # transformers': tokens of the prompt or the output, /p if > 0, *p if not
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id → added to its logit
    grammar: object = None  # a grammar.Grammar the output must follow (response_format), or None

    @property
    def penalised(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0)

    def validate(self, max_tokens_limit: int, vocab_size: int | None = None) -> SamplingParams:
        """InvalidInputError naming the field and its limit."""
        if not 0 < self.max_tokens <= max_tokens_limit:
            raise InvalidInputError(f"max_tokens: {self.max_tokens} is outside 1..{max_tokens_limit}")
        if not self.temperature >= 0:
            raise InvalidInputError(f"temperature: {self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k: {self.top_k} must be >= 0 (0 turns it off)")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidInputError(f"logprobs: {self.logprobs} is outside 0..{MAX_LOGPROBS}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise InvalidInputError(f"{name}: {getattr(self, name)} is outside -2..2")
        if not self.repetition_penalty > 0:
            raise InvalidInputError(f"repetition_penalty: {self.repetition_penalty} must be > 0")
        for token, bias in self.logit_bias.items():
            if vocab_size is not None and not 0 <= token < vocab_size:
                raise InvalidInputError(f"logit_bias: token {token} is outside 0..{vocab_size - 1}")
            if not -100 <= bias <= 100:
                raise InvalidInputError(f"logit_bias: bias {bias} of token {token} is outside -100..100")
        return self


def sampling_params(default_max_tokens: int, max_tokens_limit: int, max_tokens=None, temperature=None,
                    top_p=None, top_k=None, seed=None, stop=None, ignore_eos=None, logprobs=None,
                    presence_penalty=None, frequency_penalty=None, repetition_penalty=None, logit_bias=None,
                    response_format=None, vocab_size: int | None = None, grammars=None) -> SamplingParams:
    """Request fields (None: default; logit_bias a JSON object or a dict) → validated SamplingParams.
    `grammars` (grammar.Grammars) compiles response_format; without it (the encoder) it is not read."""
    return SamplingParams(
        max_tokens=default_max_tokens if max_tokens is None else int(max_tokens),
        temperature=0.0 if temperature is None else float(temperature),
        top_p=1.0 if top_p is None else float(top_p),
        top_k=0 if top_k is None else int(top_k),
        seed=None if seed is None else int(seed),
        stop=list(stop or []),
        ignore_eos=bool(ignore_eos),
        logprobs=None if logprobs is None else int(logprobs),
        presence_penalty=float(presence_penalty or 0.0),
        frequency_penalty=float(frequency_penalty or 0.0),
        repetition_penalty=1.0 if repetition_penalty is None else float(repetition_penalty),
        logit_bias=_logit_bias(logit_bias),
        grammar=grammars.compile(response_format) if grammars is not None and response_format else None,
    ).validate(max_tokens_limit, vocab_size)


def _logit_bias(value) -> dict[int, float]:
    """{token id: bias} from a dict or its JSON text (OpenAI sends the ids as strings)."""
    if value is None:
        return {}
    try:
        items = (json.loads(value) if isinstance(value, str) else value).items()
        return {int(k): float(v) for k, v in items}
    except (ValueError, TypeError, AttributeError):
        raise InvalidInputError("logit_bias: not an object of token id → bias") from None


def finish_reason(params: SamplingParams, eos: bool, num_tokens: int, stop_string: bool = False) -> str | None:
    """The finish rule, after a sequence's num_tokens-th output token: "stop" for EOS (unless
    ignore_eos) or a stop string, "length" at max_tokens, else None (it goes on)."""
    if (eos and not params.ignore_eos) or stop_string:
        return "stop"
    if num_tokens >= params.max_tokens:
        return "length"
    return None


def generator_on(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on the logits' device (CUDA sampling refuses a CPU one), seeded or from the OS."""
    g = torch.Generator(device=device)
    if seed is not None:
        g.manual_seed(seed)
    else:
        g.seed()
    return g


class Sampler:
    """Picks the next token of one sequence; its generator makes seeded runs reproducible."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator: torch.Generator | None = None  # made on the first logits' device
        self.penalties = Penalties(params.presence_penalty, params.frequency_penalty, params.repetition_penalty,
                                   params.logit_bias) if params.penalised else None

    def __call__(self, logits: torch.Tensor) -> int:
        """Next token id from a [vocab] logits row."""
        return int(self.sample(logits))

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token id from a [vocab] logits row, as a 0-dim tensor on its device (no host sync)."""
        p = self.params
        if self.penalties is not None:
            logits = self.penalties.apply(logits)
        if p.temperature <= 0:
            return torch.argmax(logits)
        if self.generator is None:
            self.generator = generator_on(logits.device, p.seed)
        logits = logits.float() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = torch.softmax(sorted_logits, -1)
            drop = probs.cumsum(-1) - probs >= p.top_p  # keep the token that crosses top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = torch.softmax(logits, -1)
        return torch.multinomial(probs, 1, generator=self.generator)[0]


def sample_rows(logits: torch.Tensor, samplers: list[Sampler], masked: dict | None = None) -> torch.Tensor:
    """Row i's next token by samplers[i], all on the logits' device: greedy rows in one max;
    `masked`: row i's logits with what its grammar forbids at -inf, to sample from instead."""
    tokens = logits.max(-1).indices  # the first maximum, as argmax gives, at a third of its time on CPU
    masked = masked or {}
    for i, s in enumerate(samplers):
        if s.params.temperature > 0 or s.penalties is not None or i in masked:
            tokens[i] = s.sample(masked[i] if i in masked else logits[i])
            if s.penalties is not None:
                s.penalties.observe(tokens[i])
    return tokens
