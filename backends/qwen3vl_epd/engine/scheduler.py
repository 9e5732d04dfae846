"""Scheduler: admission by KV capacity, a per-step token budget, decode before prefill."""

from __future__ import annotations

from collections import deque

from .kv_cache import PagedKVCache
from .sequence import Sequence, Status


class Scheduler:
    """FCFS admission. A sequence reserves KV for its prompt plus max_tokens when admitted, so a
    running sequence never runs out of KV and nothing is ever preempted: preempting would mean
    recomputing the prompt, whose multimodal rows were already released to the encoder. When KV
    is full, new requests wait."""

    def __init__(self, kv: PagedKVCache, max_batched_tokens: int, max_running: int):
        self.kv, self.max_batched_tokens, self.max_running = kv, max_batched_tokens, max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def all(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def schedule(self) -> tuple[list[Sequence], list[Sequence]]:
        """(sequences that run their next prompt chunk, sequences that decode one token) this step."""
        while self.waiting and len(self.running) < self.max_running:
            kv = self.kv.sequence(self.waiting[0].kv_tokens)
            if kv is None:
                break
            seq = self.waiting.popleft()
            seq.kv, seq.status = kv, Status.PREFILL
            self.running.append(seq)
        decodes = [s for s in self.running if s.status is Status.DECODE]
        budget = self.max_batched_tokens - len(decodes)
        prefills = []
        for s in self.running:
            if s.status is Status.PREFILL:
                n = s.next_chunk_tokens()
                if n <= budget or not (prefills or decodes):  # a too-large chunk still runs alone
                    prefills.append(s)
                    budget -= n
        return prefills, decodes

    def finish(self, seq: Sequence) -> None:
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.kv is not None:
            seq.kv.free()
