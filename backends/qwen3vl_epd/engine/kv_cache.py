"""Paged KV cache with a fixed memory budget.

Paged rather than one slot per sequence: prompts here range from a few tokens to thousands of
visual tokens, and a slot sized for the longest would waste most of the budget on short ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block_allocator import BlockAllocator, blocks_for
from ..language import causal_attention


class PagedKVCache:
    """k/v [layers, blocks, block_size, kv_heads, head_dim], allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator("kv blocks", num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def in_use(self) -> int:
        return self.allocator.in_use()

    def allocate_sequence(self, tokens: int) -> SequenceKV | None:
        """Allocates blocks for `tokens` tokens (a sequence's whole reservation); None when short."""
        blocks = self.allocator.allocate(blocks_for(tokens, self.block_size))
        return None if blocks is None else SequenceKV(self, blocks)


class SequenceKV:
    """One sequence's view of the cache; `attend` is the Attention a Segment uses."""

    def __init__(self, cache: PagedKVCache, blocks: list[int]):
        self.cache, self.blocks = cache, blocks
        self.length = 0  # tokens written (same for every layer once a forward finishes)
        self._index = torch.tensor(blocks, dtype=torch.long)

    def _slots(self, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + n)
        return self._index[pos // self.cache.block_size], pos % self.cache.block_size

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [1, kv_heads, n, hd] after the tokens already cached; all of them back."""
        n = k.shape[2]
        start = self.length
        block, offset = self._slots(start, n)
        self.cache.k[layer, block, offset] = k[0].transpose(0, 1)
        self.cache.v[layer, block, offset] = v[0].transpose(0, 1)
        if layer == self.cache.k.shape[0] - 1:
            self.length += n
        block, offset = self._slots(0, start + n)
        return (self.cache.k[layer, block, offset].transpose(0, 1)[None],
                self.cache.v[layer, block, offset].transpose(0, 1)[None])

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        return causal_attention(q, *self.append(layer, k, v), scale)

    def free(self) -> None:
        if self.blocks:
            self.cache.allocator.free(self.blocks)
            self.blocks = []


class DecodeBatch:
    """One new token for each of many sequences: their keys and values are written in one scatter
    and attended in one padded SDPA, instead of one small attention per sequence."""

    def __init__(self, seqs: list[SequenceKV]):
        cache = seqs[0].cache
        self.cache, self.seqs = cache, seqs
        lengths = torch.tensor([s.length for s in seqs])
        width = int(lengths.max()) + 1
        pos = torch.arange(width).expand(len(seqs), -1)
        self.valid = pos <= lengths[:, None]  # [B, T]: cached tokens and the new one
        pos = torch.where(self.valid, pos, 0)
        table = torch.nn.utils.rnn.pad_sequence([s._index for s in seqs], batch_first=True)
        self.blocks = torch.gather(table, 1, pos // cache.block_size)
        self.offsets = pos % cache.block_size
        rows = torch.arange(len(seqs))
        self.new_block, self.new_offset = self.blocks[rows, lengths], self.offsets[rows, lengths]

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [1, heads, B, hd], k/v [1, kv, B, hd] → [B, heads * hd]."""
        c = self.cache
        c.k[layer, self.new_block, self.new_offset] = k[0].transpose(0, 1)
        c.v[layer, self.new_block, self.new_offset] = v[0].transpose(0, 1)
        if layer == c.k.shape[0] - 1:
            for s in self.seqs:
                s.length += 1
        keys = c.k[layer, self.blocks, self.offsets].transpose(1, 2)  # [B, kv, T, hd]
        values = c.v[layer, self.blocks, self.offsets].transpose(1, 2)
        o = F.scaled_dot_product_attention(q[0].transpose(0, 1)[:, :, None], keys, values,
                                           attn_mask=self.valid[:, None, None, :], scale=scale, enable_gqa=True)
        return o[:, :, 0].reshape(len(self.seqs), -1)
