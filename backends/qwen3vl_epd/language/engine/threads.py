"""The engine thread's CPU threads: the only thread of the process that computes in parallel, and
one that leaves a core to an encoder on this host while that works for it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from qwen3vl_epd.cpu_threads import cores, set_thread_count, take_threads

# Below this hidden size a layer's products are too small to split: the embedded tiny checkpoint
# (64) served 10-20% fewer tokens/s on two threads than on one, the 325 M one (768) 20-35% more.
# Its lm_head and sampling, over the whole vocabulary, are not (CoreShare.head), nor a step of this
# many tokens (a 364-token image prompt: 24 ms on one thread, 19 on two; 80 tokens: 15.5 and 14.8).
PARALLEL_HIDDEN, PARALLEL_TOKENS = 512, 128


def engine_threads(setting: int, hidden_size: int) -> int:
    """The engine's threads: `setting`, or for 0 one per core (one for a model below PARALLEL_HIDDEN)."""
    if setting:
        return setting
    return cores() if hidden_size >= PARALLEL_HIDDEN else 1


class CoreShare:
    """`threads` for each step and `head_threads` for its float32 lm_head, its sampling and a step of
    PARALLEL_TOKENS or more, one fewer while `encoder_busy()`: both processes on every core would
    stall each parallel op on a thread the other holds (a 2-core host served images at 0.6 of the
    throughput that way)."""

    def __init__(self, threads: int, encoder_busy: Callable[[], bool] = lambda: False, head_threads: int = 0):
        self.threads, self.head_threads = threads, head_threads or threads
        self.encoder_busy, self.current, self.sharing = encoder_busy, self.threads, False

    @classmethod
    def of(cls, setting: int, hidden_size: int, encoder_busy: Callable[[], bool] = lambda: False) -> CoreShare:
        """For a model of `hidden_size` and the `torch_threads` setting (engine_threads)."""
        return cls(engine_threads(setting, hidden_size), encoder_busy, engine_threads(setting, PARALLEL_HIDDEN))

    def take(self) -> None:
        """On the engine's thread, before its first step."""
        take_threads(self.threads)

    def step(self, tokens: int = 1) -> None:
        """Before a step of `tokens` rows."""
        self.sharing = self.encoder_busy()
        threads = self.head_threads if tokens >= PARALLEL_TOKENS else self.threads
        want = max(1, threads - 1) if self.sharing else threads
        if want != self.current:
            set_thread_count(want)
            self.current = want

    @contextmanager
    def head(self) -> Iterator[None]:
        """Around the step's float32 lm_head and sampling (tiny checkpoint, text at 16: 780 -> 830
        tok/s). Not around the greedy head: 2-4 ms on one thread, and the second's spinning beside
        it took more from the door and the client than it gave (three alternating pairs: 617, 669,
        569 tok/s on two against 708, 693, 560 on one)."""
        want = max(1, self.head_threads - 1) if self.sharing else self.head_threads
        if want == self.current:
            yield
            return
        set_thread_count(want)
        try:
            yield
        finally:
            set_thread_count(self.current)
