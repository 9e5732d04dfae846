"""Structured outputs: a response_format (OpenAI's json_object / json_schema, or a regex or Lark
grammar) compiled by llguidance, and a matcher per sequence that masks each step's logits to the
tokens its grammar allows. The masks are computed on the host while the forward runs."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

from qwen3vl_epd.errors import InvalidInputError

# Compact JSON: a model may not pad its output with whitespace without end.
JSON_OPTIONS = {"whitespace_flexible": False}


class Grammars:
    """One model's tokenizer as llguidance sees it (made on first use: about 2 s) and compiling."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one token bitmask
        self._ll = self._executor = None
        self._lock = threading.Lock()

    @property
    def ll_tokenizer(self):
        with self._lock:
            if self._ll is None:
                import llguidance.hf

                self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size)
            return self._ll

    @property
    def executor(self):
        """llguidance's pool that computes many matchers' masks in parallel."""
        with self._lock:
            if self._executor is None:
                from llguidance import LLExecutor

                self._executor = LLExecutor()
            return self._executor

    def compile(self, response_format: str | dict | None) -> Grammar | None:
        """The grammar a response_format asks for (None: plain text); InvalidInputError naming
        response_format when it is malformed or the grammar library refuses it."""
        from llguidance import LLMatcher

        try:
            f = json.loads(response_format) if isinstance(response_format, str) else response_format
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"response_format: not JSON ({e})") from None
        if f is None:
            return None
        kind = f.get("type") if isinstance(f, dict) else None
        try:
            if kind == "text":
                return None
            if kind == "json_object":
                text = LLMatcher.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
            elif kind == "json_schema":
                schema = (f.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise InvalidInputError("response_format: json_schema.schema must be a JSON schema object")
                text = LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
            elif kind == "regex" and isinstance(f.get("regex"), str):
                text = LLMatcher.grammar_from_regex(f["regex"])
            elif kind == "grammar" and isinstance(f.get("grammar"), str):
                text = LLMatcher.grammar_from_lark(f["grammar"])
            else:
                raise InvalidInputError(f"response_format: type {kind!r} is not text, json_object, json_schema, "
                                        "regex (with `regex`) or grammar (with a Lark `grammar`)")
        except (ValueError, TypeError) as e:
            raise InvalidInputError(f"response_format: {e}") from None
        error = LLMatcher.validate_grammar(text, self.ll_tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidInputError(f"response_format: the grammar library refused it: {' '.join(error.split())}")
        return Grammar(self, text)


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar; each sequence that follows it gets its own matcher."""

    grammars: Grammars
    text: str

    def matcher(self) -> Matcher:
        return Matcher(self.grammars, self.text)


class Matcher:
    """Where one sequence is in its grammar."""

    def __init__(self, grammars: Grammars, text: str):
        from llguidance import LLMatcher

        self.grammars, self.words = grammars, grammars.words
        self.m = LLMatcher(grammars.ll_tokenizer, text, log_level=0)

    def fill(self, row: torch.Tensor) -> None:
        """The allowed next tokens into a contiguous host int32 row of `words` (a bit per token)."""
        self.m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token: int) -> str | None:
        """Take the sampled token; an error message if the grammar could not."""
        return None if self.m.consume_token(token) else (self.m.get_error() or "token refused")

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self.m.is_stopped()


# Byte value → its 8 bits, lowest first: unpacks a bitmask with one gather.
_BITS = ((torch.arange(256, dtype=torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool()


def fill_masks(matchers: list[Matcher], out: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Row j of `out` (contiguous host int32 [len(matchers), words]) for matchers[j], the rows in
    parallel on llguidance's own threads. With `vocab`: unpacked here into what each row forbids,
    bool [k, vocab] (for CPU logits: this thread does it while the forward runs)."""
    matchers[0].grammars.executor.unsafe_compute_mask_ptr([(m.m, j) for j, m in enumerate(matchers)], out.data_ptr(),
                                      out.shape[1] * out.element_size(), out.shape[0])
    if vocab is None:
        return out
    return ~_BITS[out.view(torch.uint8).long()].view(out.shape[0], -1)[:, :vocab]


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """logits [k, vocab] with every token the bitmasks [k, words] (on the logits' device) forbid at
    -inf; `masks` may be fill_masks' unpacked bool [k, vocab] of what is forbidden."""
    if masks.dtype == torch.bool:
        return logits.masked_fill(masks, float("-inf"))
    bits = (masks[:, :, None] >> torch.arange(32, dtype=torch.int32, device=masks.device)) & 1
    return logits.masked_fill(bits.view(masks.shape[0], -1)[:, : logits.shape[-1]] == 0, float("-inf"))
