"""Fixed-size block pools: the allocator shared by the multimodal buffers and the KV cache."""

from __future__ import annotations

import threading

from qwen3vl_epd.errors import EpdError


class BlockError(EpdError):
    """A block id that is not in use (double free) or not of this pool."""


def blocks_for(rows: int, block_size: int) -> int:
    """Blocks (or chunks) of `block_size` rows needed for `rows` rows: the ceiling division."""
    return -(-rows // block_size)


class BlockAllocator:
    """Hands out block ids of one fixed-size pool, first fit; thread-safe."""

    def __init__(self, name: str, num_blocks: int):
        self.name, self.num_blocks = name, num_blocks
        self._free = set(range(num_blocks))
        self._used: set[int] = set()
        self._lock = threading.Lock()

    def allocate(self, n: int) -> list[int] | None:
        """n block ids, or None when fewer than n are free (the caller decides how to wait).

        Prefers the lowest run of n consecutive blocks: one run is one transfer entry and a
        view instead of a copy on the reading side."""
        with self._lock:
            if n > len(self._free):
                return None
            ids = _first_run(sorted(self._free), n)
            self._free.difference_update(ids)
            self._used.update(ids)
            return ids

    def free(self, ids: list[int]) -> None:
        with self._lock:
            for i in ids:
                if not (isinstance(i, int) and 0 <= i < self.num_blocks):
                    raise BlockError(f"{self.name}: block {i!r} is not a block of this pool")
                if i not in self._used:
                    raise BlockError(f"{self.name}: block {i} is not in use (double free)")
            self._used.difference_update(ids)
            self._free.update(ids)

    def in_use(self) -> int:
        with self._lock:
            return len(self._used)


def _first_run(free: list[int], n: int) -> list[int]:
    """The lowest n consecutive ids in the sorted free list, else its lowest n."""
    run_start = 0
    for i in range(len(free)):
        if i and free[i] != free[i - 1] + 1:
            run_start = i
        if i - run_start + 1 == n:
            return free[run_start : i + 1]
    return free[:n]


def contiguous_runs(remote_blocks, remote_block, first, local_blocks, local_block, n):
    """(remote row, local row, count) runs contiguous on both sides: remote rows first.., local 0.."""
    out, r, l = [], first, 0
    while l < n:
        rp = remote_blocks[r // remote_block] * remote_block + r % remote_block
        lp = local_blocks[l // local_block] * local_block + l % local_block
        count = min(remote_block - r % remote_block, local_block - l % local_block, n - l)
        if out and out[-1][0] + out[-1][2] == rp and out[-1][1] + out[-1][2] == lp:
            out[-1][2] += count
        else:
            out.append([rp, lp, count])
        r, l = r + count, l + count
    return out
