"""Scheduler: the one owner of a sequence's lifecycle. Admission by KV capacity, a per-step token
budget with decodes first, and every status change: WAITING → PREFILL → DECODE → FINISHED."""

from __future__ import annotations

import time
from collections import deque

from qwen3vl_epd.errors import EpdError, InvalidInputError, UnavailableError
from qwen3vl_epd.language.engine.kv_cache import PagedKVCache
from qwen3vl_epd.language.engine.sequence import Sequence, Status
from qwen3vl_epd.language.request import Piece, TokenLogprob
from qwen3vl_epd.language.sampling import SamplingParams, finish_reason
from qwen3vl_epd.settings import Settings
from qwen3vl_epd.transfer.blocks import blocks_for


class Scheduler:
    """FCFS admission. A sequence reserves KV for its prompt plus max_tokens when admitted (less
    the blocks of its prefix already cached), so a running sequence never runs out of KV and
    nothing is ever preempted: preempting would mean recomputing the prompt, whose multimodal rows
    were already released to the encoder. When KV is full, new requests wait."""

    def __init__(self, kv: PagedKVCache, config: Settings, eos_ids: set[int]):
        self.kv, self.eos_ids = kv, eos_ids
        self.max_batched_tokens, self.max_running = max(config.max_batched_tokens, 1), config.max_running
        self.max_model_len, self.max_queued = config.max_model_len, config.max_queued_requests
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def check(self, params: SamplingParams, length: int, arriving: int = 0, probe: bool = False) -> None:
        """A prompt of `length` tokens against the limits and the queue (`arriving`: sequences on their
        way in); its max_tokens capped to what the model length leaves. EpdError if it cannot run."""
        queued = arriving + len(self.waiting)
        if queued >= self.max_queued and not probe:
            raise UnavailableError(f"language model is saturated: {queued} requests wait for the engine "
                                   f"(max_queued_requests {self.max_queued}); retry")
        if length >= self.max_model_len:
            raise InvalidInputError(f"prompt is {length} tokens, over the max model length of {self.max_model_len}")
        params.max_tokens = min(params.max_tokens, self.max_model_len - length)
        need = blocks_for(length + params.max_tokens, self.kv.block_size)
        if need > self.kv.num_blocks:
            raise InvalidInputError(
                f"max_tokens: prompt ({length}) + max_tokens ({params.max_tokens}) needs {need * self.kv.block_size} "
                f"KV tokens, over the KV cache capacity of {self.kv.num_blocks * self.kv.block_size}")

    def add(self, seq: Sequence) -> None:
        if seq.probe:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def all(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def admit(self) -> list[Sequence]:
        """WAITING → PREFILL, first come first served (probes first, beyond max_running), while KV and
        max_running allow; the admitted."""
        admitted = []
        while self.waiting and (len(self.running) < self.max_running or self.waiting[0].probe):
            head = self.waiting[0]
            kv = self.kv.allocate_sequence(head.kv_reservation, head.block_hashes, head.prompt_len)
            if kv is None:
                break
            seq = self.waiting.popleft()
            seq.kv, seq.status = kv, Status.PREFILL
            seq.prefilled = seq.cached_tokens = kv.length
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def overdue(self, submitted_before: float) -> list[Sequence]:
        """Waiting sequences submitted before this time (oldest first: only the head is looked at)."""
        out = []
        for seq in self.waiting:
            if seq.probe:
                continue
            if seq.submitted >= submitted_before:
                break
            out.append(seq)
        return out

    def prefilling(self) -> list[Sequence]:
        """Admitted sequences whose next prompt chunk has not arrived yet."""
        return [s for s in self.running if s.status is Status.PREFILL and s.rows is None]

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences that run their next prompt chunk, which has arrived, and sequences that decode
        one token) this step: decodes first, then chunks while the token budget lasts; the first
        chunk runs whatever its size, so decodes never starve a long prompt."""
        decodes = [s for s in self.running if s.status is Status.DECODE]
        budget = self.max_batched_tokens - len(decodes)
        prefills = []
        for s in self.running:
            if s.status is Status.PREFILL and s.rows is not None:
                n = s.next_chunk_tokens()
                if n <= budget or not prefills:
                    prefills.append(s)
                    budget -= n
        return prefills, decodes

    def postprocess(self, prefilled: list[Sequence], sampled: list[Sequence], tokens: list[int],
                    logprobs: dict[int, tuple] | None = None) -> list[tuple[Sequence, Piece]]:
        """After a forward: advance prompt chunks, append each sampled token (and, for row i in
        `logprobs`, its log-probabilities), apply the finish rule; the pieces to send, in order."""
        for seq in prefilled:
            seq.prefilled += seq.next_chunk_tokens()
            seq.rows = None
            self.kv.publish(seq.kv, seq.block_hashes)  # its full prompt blocks, for later requests
            if seq.prefilled == seq.prompt_len:
                seq.status = Status.DECODE
            if seq.source is not None:
                seq.source.release_chunk()
                if seq.status is Status.DECODE:
                    seq.source.close()  # prompt done: the encoder may reuse its blocks now
        out = []
        for i, (seq, token) in enumerate(zip(sampled, tokens)):
            if logprobs and i in logprobs:
                seq.logprobs.append(token_logprob(seq.detokenizer.tokenizer, token, *logprobs[i]))
            if not seq.tokens:
                seq.first_token_at = time.perf_counter()
            seq.tokens.append(token)
            if seq.grammar is not None and (error := seq.grammar.accept(token)):
                out.append((seq, self.finish(seq, None, EpdError(f"response_format: {error}"))))
                continue
            eos = token in self.eos_ids
            text = "" if eos and not seq.params.ignore_eos else seq.detokenizer.add(token)
            complete = seq.grammar is not None and seq.grammar.stopped  # nothing more is allowed
            reason = finish_reason(seq.params, eos, len(seq.tokens), seq.detokenizer.stopped or complete)
            if reason:
                out.append((seq, self.finish(seq, reason, text=text)))
            elif text:
                out.append((seq, seq.piece(text)))
        return out

    def answer_probes(self) -> list[tuple[Sequence, Piece]]:
        """After a forward: the probes still waiting (no KV free for them) end, answered by it. They
        are queued first, so only the head of the queue is looked at (this runs every step)."""
        out = []
        while self.waiting and self.waiting[0].probe:
            seq = self.waiting[0]
            out.append((seq, self.finish(seq, "probe")))
        return out

    def finish(self, seq: Sequence, reason: str | None, error: EpdError | None = None, text: str = "") -> Piece:
        """FINISHED: free the sequence's KV and its encoder slot; its last piece."""
        seq.status, seq.rows = Status.FINISHED, None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.kv is not None:
            seq.kv.free()
        if seq.source is not None:
            seq.source.close()
        if error is None and reason != "cancelled":
            text += seq.detokenizer.flush()
        return seq.piece(text, reason, error)


def token_logprob(tokenizer, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
    """A sampled token's log-probabilities with the text of each token (special tokens included)."""
    text = lambda t: tokenizer.decode([t])  # noqa: E731
    return TokenLogprob(token, text(token), logprob, [(t, text(t), lp) for t, lp in top])
