"""The engine thread's CPU threads: the only thread of the process that computes in parallel, and
one that leaves a core to an encoder on this host while that works for it."""

from __future__ import annotations

from collections.abc import Callable

from qwen3vl_epd.cpu_threads import cores, set_thread_count, take_threads

# Below this hidden size a layer's products are too small to split: the embedded tiny checkpoint
# (64) served 10-20% fewer tokens/s on two threads than on one, the 325 M one (768) 20-35% more.
PARALLEL_HIDDEN = 512


def engine_threads(setting: int, hidden_size: int) -> int:
    """The engine's threads: `setting`, or for 0 one per core (one for a model below PARALLEL_HIDDEN)."""
    if setting:
        return setting
    return cores() if hidden_size >= PARALLEL_HIDDEN else 1


class CoreShare:
    """`threads` for each step, one fewer while `encoder_busy()`: both processes
    on every core would stall each parallel op on a thread the other holds (a 2-core host served
    images at 0.6 of the throughput that way)."""

    def __init__(self, threads: int, encoder_busy: Callable[[], bool] = lambda: False):
        self.threads = threads
        self.encoder_busy, self.current = encoder_busy, self.threads

    def take(self) -> None:
        """On the engine's thread, before its first step."""
        take_threads(self.threads)

    def step(self) -> None:
        want = max(1, self.threads - 1) if self.encoder_busy() else self.threads
        if want != self.current:
            set_thread_count(want)
            self.current = want
