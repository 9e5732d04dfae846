"""Paged KV cache with a fixed memory budget, and a prefix cache over its blocks.

Paged rather than one slot per sequence: prompts here range from a few tokens to thousands of
visual tokens, and a slot sized for the longest would waste most of the budget on short ones.
Full prompt blocks are published under their prefix hash (prefix.py); a later prompt with the
same prefix shares them (reference counts) instead of pulling and prefilling those tokens again.
Blocks no sequence holds stay cached until a new allocation needs room, oldest use first.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from qwen3vl_epd.language.model import causal_attention
from qwen3vl_epd.prompt.prefix import HASH_TOKENS, kv_block_hashes
from qwen3vl_epd.transfer.blocks import BlockAllocator, blocks_for


class PagedKVCache:
    """k/v [layers, blocks, block_size, kv_heads, head_dim], allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", prefix_caching: bool = False):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.allocator = BlockAllocator("kv blocks", num_blocks)
        self.prefix_caching = prefix_caching and block_size % HASH_TOKENS == 0
        self.refs = [0] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, held by no sequence; oldest first
        self.evictions = 0

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def in_use(self) -> int:
        """Blocks held by sequences (cached blocks nobody holds are free to take)."""
        return self.allocator.in_use() - len(self.evictable)

    def cached_blocks(self) -> int:
        return len(self.hash_of)

    def allocate_sequence(self, tokens: int, hashes: list[bytes] = (), prompt_tokens: int = 0) -> SequenceKV | None:
        """Blocks for `tokens` tokens (a sequence's whole reservation), its longest cached prefix
        shared; None when short (nothing taken then). At least the last prompt token is left to
        compute: its logits give the first output token."""
        bs = self.block_size
        reusable = kv_block_hashes(list(hashes), bs)[: max(prompt_tokens - 1, 0) // bs] if self.prefix_caching else []
        cached = []
        for h in reusable:
            if (b := self.by_hash.get(h)) is None:
                break
            cached.append(b)
        need = blocks_for(tokens, bs) - len(cached)
        idle = len(self.evictable) - sum(b in self.evictable for b in cached)
        short = need - (self.num_blocks - self.allocator.in_use())
        if short > idle:
            return None
        for b in cached:
            self.refs[b] += 1
            self.evictable.pop(b, None)
        for _ in range(max(short, 0)):  # room from the least recently used cached blocks
            b, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(b)]
            self.allocator.free([b])
            self.evictions += 1
        new = self.allocator.allocate(need)
        for b in new:
            self.refs[b] = 1
        kv = SequenceKV(self, cached + new)
        kv.length = kv.published = len(cached) * bs
        return kv

    def publish(self, kv: SequenceKV, hashes: list[bytes]) -> None:
        """Make kv's full prompt blocks written so far findable by their prefix hash."""
        if not self.prefix_caching:
            return
        kv_hashes = kv_block_hashes(hashes, self.block_size)
        full = min(kv.length // self.block_size, len(kv_hashes))
        for i in range(kv.published // self.block_size, full):
            h, b = kv_hashes[i], kv.blocks[i]
            if h not in self.by_hash and b not in self.hash_of:
                self.by_hash[h], self.hash_of[b] = b, h
        kv.published = max(kv.published, full * self.block_size)

    def release(self, blocks: list[int]) -> None:
        """A sequence is done with its blocks: cached ones stay findable, the rest are freed. Last
        block first: a chain's tail is evicted before its head, which keeps the head findable."""
        for b in reversed(blocks):
            self.refs[b] -= 1
            if self.refs[b]:
                continue
            if b in self.hash_of:
                self.evictable[b] = None
            else:
                self.allocator.free([b])


class SequenceKV:
    """One sequence's view of the cache; `attend` is the Attention a Segment uses."""

    def __init__(self, cache: PagedKVCache, blocks: list[int]):
        self.cache, self.blocks = cache, blocks
        self.length = 0  # tokens written (same for every layer once a forward finishes)
        self.published = 0  # tokens of its leading blocks published to the prefix cache
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
            self.cache.release(self.blocks)
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
