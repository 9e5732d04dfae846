"""Block allocator and MultimodalDataBuffers: the five per-request buffers in pre-allocated memory."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from .errors import EpdError

AUX_WIDTH = 16  # int64 fields per aux row (DESIGN §3)


class BlockError(EpdError):
    """A block id that is not in use (double free) or not of this pool."""


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


@dataclass
class BufferConfig:
    """Pool sizes. Token blocks hold fill_ids + M-RoPE rows; visual blocks hold embeddings + DeepStack."""

    block_tokens: int = 64
    block_visual: int = 64
    num_token_blocks: int = 512
    num_visual_blocks: int = 256
    num_slots: int = 64


def blocks_for(rows: int, block_rows: int) -> int:
    return -(-rows // block_rows)


class MultimodalDataBuffers:
    """The five buffers of DESIGN §3 as block pools in one registrable memory region each.

    fill_ids [T, 1] int32 and mrope_positions [T, 3] int32 share token block ids; embeddings
    [R, H] and deepstack [R, D*H] (model dtype) share visual block ids, so their memory scales
    with the number of visual tokens V, not the prompt length L. aux [S, 16] int64 holds one
    header per slot, and release [S] int64 is where a reader writes a slot's nonce to free it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_deepstack: int,
        dtype: torch.dtype,
        config: BufferConfig | None = None,
        device: str | torch.device = "cpu",
    ):
        self.config = c = config or BufferConfig()
        self.hidden_size, self.num_deepstack, self.dtype = hidden_size, num_deepstack, dtype
        self.device = torch.device(device)
        t_rows, v_rows = c.num_token_blocks * c.block_tokens, c.num_visual_blocks * c.block_visual
        alloc = dict(device=self.device)
        self.fill_ids = torch.zeros(t_rows, 1, dtype=torch.int32, **alloc)
        self.mrope_positions = torch.zeros(t_rows, 3, dtype=torch.int32, **alloc)
        self.embeddings = torch.zeros(v_rows, hidden_size, dtype=dtype, **alloc)
        self.deepstack = torch.zeros(v_rows, num_deepstack * hidden_size, dtype=dtype, **alloc)
        self.aux = torch.zeros(c.num_slots, AUX_WIDTH, dtype=torch.int64, **alloc)
        self.release = torch.zeros(c.num_slots, dtype=torch.int64, **alloc)
        self.token_pool = BlockAllocator("token blocks", c.num_token_blocks)
        self.visual_pool = BlockAllocator("visual blocks", c.num_visual_blocks)
        self.slot_pool = BlockAllocator("slots", c.num_slots)

    def regions(self) -> dict[str, torch.Tensor]:
        """Every tensor to register with the transfer engine, by buffer name."""
        out = {
            "fill_ids": self.fill_ids,
            "mrope_positions": self.mrope_positions,
            "embeddings": self.embeddings,
            "aux": self.aux,
            "release": self.release,
        }
        if self.num_deepstack:
            out["deepstack"] = self.deepstack
        return out

    def in_use(self) -> dict[str, int]:
        return {
            "slots": self.slot_pool.in_use(),
            "token_blocks": self.token_pool.in_use(),
            "visual_blocks": self.visual_pool.in_use(),
        }

    def total_in_use(self) -> int:
        return sum(self.in_use().values())

    def allocate(self, tokens: int, visual: int, slot: bool = True) -> tuple[int | None, list, list] | None:
        """(slot, token blocks, visual blocks) for the rows, all or nothing; None when a pool is short."""
        c = self.config
        taken = []
        for pool, n in ((self.slot_pool, int(slot)), (self.token_pool, blocks_for(tokens, c.block_tokens)),
                        (self.visual_pool, blocks_for(visual, c.block_visual))):
            ids = pool.allocate(n)
            if ids is None:
                for p, got in zip((self.slot_pool, self.token_pool), taken):
                    p.free(got)
                return None
            taken.append(ids)
        slots, tok, vis = taken
        return (slots[0] if slots else None), tok, vis

    def free(self, slot: int | None, token_blocks: list[int], visual_blocks: list[int]) -> None:
        self.token_pool.free(token_blocks)
        self.visual_pool.free(visual_blocks)
        if slot is not None:
            self.slot_pool.free([slot])

    def token_rows(self, blocks: list[int], start: int = 0, n: int | None = None) -> torch.Tensor:
        """Physical row indices of logical token rows [start, start + n) held in `blocks`."""
        return block_rows(blocks, self.config.block_tokens, start, n)

    def visual_rows(self, blocks: list[int], start: int = 0, n: int | None = None) -> torch.Tensor:
        return block_rows(blocks, self.config.block_visual, start, n)

    def scatter(self, token_blocks, visual_blocks, fill_ids, mrope_positions, embeddings, deepstack) -> None:
        """Write one request's rows into its blocks."""
        t = self.token_rows(token_blocks, 0, fill_ids.shape[0])
        v = self.visual_rows(visual_blocks, 0, embeddings.shape[0])
        self.fill_ids[t] = fill_ids.reshape(-1, 1).to(self.device, torch.int32)
        self.mrope_positions[t] = mrope_positions.to(self.device, torch.int32)
        self.embeddings[v] = embeddings.to(self.device, self.dtype)
        if self.num_deepstack:
            self.deepstack[v] = deepstack.to(self.device, self.dtype)

    def gather(self, token_blocks, visual_blocks, tokens: int, visual: int) -> tuple[torch.Tensor, ...]:
        """(fill_ids [L], mrope_positions [L, 3], embeddings [V, H], deepstack [V, D*H]) of one request:
        views while its blocks are consecutive (the usual case), copies otherwise."""
        t = _rows_or_slice(token_blocks, self.config.block_tokens, tokens)
        v = _rows_or_slice(visual_blocks, self.config.block_visual, visual)
        return self.fill_ids[t, 0], self.mrope_positions[t], self.embeddings[v], self.deepstack[v]


def _rows_or_slice(blocks: list[int], block_size: int, n: int) -> slice | torch.Tensor:
    if all(b == a + 1 for a, b in zip(blocks, blocks[1:])):
        first = blocks[0] * block_size if blocks else 0
        return slice(first, first + n)
    return block_rows(blocks, block_size, 0, n)


def block_rows(blocks: list[int], block_size: int, start: int = 0, n: int | None = None) -> torch.Tensor:
    """Physical row indices of logical rows [start, start + n) of a block list."""
    n = len(blocks) * block_size - start if n is None else n
    logical = torch.arange(start, start + n)
    return torch.tensor(blocks, dtype=torch.long)[logical // block_size] * block_size + logical % block_size
