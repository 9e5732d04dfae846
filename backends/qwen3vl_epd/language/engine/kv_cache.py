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

from qwen3vl_epd.prompt.prefix import HASH_TOKENS, kv_block_hashes
from qwen3vl_epd.transfer.blocks import BlockAllocator, blocks_for


class PagedKVCache:
    """k/v [layers, blocks, block_size, kv_heads, head_dim] on the model's device, allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device = "cpu", prefix_caching: bool = False):
        shape = (num_layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        flat = (num_layers, num_blocks * block_size, kv_heads, head_dim)  # rows addressed by slot
        self.k_flat, self.v_flat = self.k.view(flat), self.v.view(flat)
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
    """One sequence's blocks of the cache and how many tokens they hold (attention.py reads them)."""

    def __init__(self, cache: PagedKVCache, blocks: list[int]):
        self.cache, self.blocks = cache, blocks
        self.length = 0  # tokens written (same for every layer once a forward finishes)
        self.published = 0  # tokens of its leading blocks published to the prefix cache

    def slots(self, start: int, n: int) -> torch.Tensor:
        """Host int64 [n]: the flat cache rows (block * block_size + offset) of tokens [start, start + n)."""
        bs = self.cache.block_size
        pos = torch.arange(start, start + n)
        return torch.tensor(self.blocks, dtype=torch.long)[pos // bs] * bs + pos % bs

    def free(self) -> None:
        if self.blocks:
            self.cache.release(self.blocks)
            self.blocks = []
