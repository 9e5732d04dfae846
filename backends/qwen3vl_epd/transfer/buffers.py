"""MultimodalDataBuffers: the five per-request buffers in pre-allocated, block-allocated memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from qwen3vl_epd.devices import host_zeros, visual_device
from qwen3vl_epd.errors import PoolFullError
from qwen3vl_epd.settings import EncoderSettings
from qwen3vl_epd.transfer.blocks import BlockAllocator, blocks_for

AUX_WIDTH = 16  # int64 fields per aux row (docs/design.md)


@dataclass
class BufferConfig:
    """Pool sizes. Token blocks hold fill_ids + M-RoPE rows; visual blocks hold embeddings + DeepStack."""

    block_tokens: int = EncoderSettings.block_tokens
    block_visual: int = EncoderSettings.block_visual
    num_token_blocks: int = EncoderSettings.num_token_blocks
    num_visual_blocks: int = EncoderSettings.num_visual_blocks
    num_slots: int = EncoderSettings.num_slots

    @classmethod
    def of(cls, s: EncoderSettings) -> BufferConfig:
        return cls(s.block_tokens, s.block_visual, s.num_token_blocks, s.num_visual_blocks, s.num_slots)


class MultimodalDataBuffers:
    """The five buffers (docs/design.md) as block pools in one registrable memory region each.

    fill_ids [T, 1] int32 and mrope_positions [T, 3] int32 share token block ids; embeddings
    [R, H] and deepstack [R, D*H] (model dtype) share visual block ids, so their memory scales
    with the number of visual tokens V, not the prompt length L. aux [S, 16] int64 holds one
    header per slot, and release [S] int64 is where a reader writes a slot's nonce to free it.
    The host reads ids, positions, aux and release: they stay in host memory (pinned for a GPU).
    Embeddings and DeepStack live on `device` when Mooncake can move its memory, else in host
    memory too (devices.visual_device).
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
        self.device, self.visual_device = torch.device(device), visual_device(device)
        t_rows, v_rows = c.num_token_blocks * c.block_tokens, c.num_visual_blocks * c.block_visual
        self.fill_ids = host_zeros(t_rows, 1, dtype=torch.int32, device=device)
        self.mrope_positions = host_zeros(t_rows, 3, dtype=torch.int32, device=device)
        self.aux = host_zeros(c.num_slots, AUX_WIDTH, dtype=torch.int64, device=device)
        self.release = host_zeros(c.num_slots, dtype=torch.int64, device=device)
        if self.visual_device.type == "cpu":
            self.embeddings = host_zeros(v_rows, hidden_size, dtype=dtype, device=device)
            self.deepstack = host_zeros(v_rows, num_deepstack * hidden_size, dtype=dtype, device=device)
        else:
            self.embeddings = torch.zeros(v_rows, hidden_size, dtype=dtype, device=self.visual_device)
            self.deepstack = torch.zeros(v_rows, num_deepstack * hidden_size, dtype=dtype, device=self.visual_device)
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

    def capacity(self) -> dict[str, int]:
        """Blocks (or slots) per pool, for the start-up log."""
        return {"slots": self.slot_pool.num_blocks, "token_blocks": self.token_pool.num_blocks,
                "visual_blocks": self.visual_pool.num_blocks}

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

    def allocate_waiting(self, tokens: int, visual: int, slot: bool, wait_s: float, who: str,
                         before_retry=None) -> tuple[int | None, list, list]:
        """Back-pressure: `allocate`, retried for up to wait_s (calling before_retry), then PoolFullError."""
        deadline = time.monotonic() + wait_s
        while True:
            got = self.allocate(tokens, visual, slot)
            if got is not None:
                return got
            if time.monotonic() >= deadline:
                raise PoolFullError(
                    f"{who} buffers full: need {tokens} token rows and {visual} visual rows, "
                    f"in use {self.in_use()}, waited {wait_s:g} s")
            if before_retry is not None:
                before_retry()
            time.sleep(0.002)

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
        self.fill_ids[t] = fill_ids.reshape(-1, 1).cpu().to(torch.int32)
        self.mrope_positions[t] = mrope_positions.cpu().to(torch.int32)
        self.embeddings[v.to(self.visual_device)] = embeddings.to(self.visual_device, self.dtype)
        if self.num_deepstack:
            self.deepstack[v.to(self.visual_device)] = deepstack.to(self.visual_device, self.dtype)

    def zero_token_rows(self, token_blocks: list[int]) -> None:
        """Clear the prompt ids and positions held in these blocks (before they are reused)."""
        rows = self.token_rows(token_blocks)
        self.fill_ids[rows] = 0
        self.mrope_positions[rows] = 0

    def gather(self, token_blocks, visual_blocks, tokens: int, visual: int) -> tuple[torch.Tensor, ...]:
        """(fill_ids [L], mrope_positions [L, 3], embeddings [V, H], deepstack [V, D*H]) of one request:
        views while its blocks are consecutive (the usual case), copies otherwise."""
        t = _rows_or_slice(token_blocks, self.config.block_tokens, tokens)
        v = _rows_or_slice(visual_blocks, self.config.block_visual, visual)
        if isinstance(v, torch.Tensor):
            v = v.to(self.visual_device)
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
