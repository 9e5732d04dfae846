"""Prefix hashes: a SHA-256 chain over a prompt's 16-token blocks, the key of the KV those tokens
leave. Image pad tokens all share one id, so a block with pads also hashes the content key of each
image it covers: two different images never share KV. The chain covers every earlier token, so
the same digest means the same tokens, images and M-RoPE positions up to that point."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

HASH_TOKENS = 16  # tokens per hashed block; the KV block size must be a multiple of it


def block_hashes(fill_ids: Sequence[int], visual_spans: Sequence[Sequence[int]],
                 span_keys: Sequence[bytes]) -> list[bytes]:
    """One digest per full block of HASH_TOKENS tokens, each chained on the one before. Without an
    image's content key (a prompt with images but no keys) nothing is hashed: no key, no reuse."""
    if len(span_keys) != len(visual_spans):
        return []
    ids = [int(t) for t in fill_ids]
    out, digest = [], b"epd-prefix-v1"
    for start in range(0, len(ids) - HASH_TOKENS + 1, HASH_TOKENS):
        end = start + HASH_TOKENS
        h = hashlib.sha256(digest)
        h.update(struct.pack(f"<{HASH_TOKENS}q", *ids[start:end]))
        for (first, n), key in zip(visual_spans, span_keys):
            if first < end and first + n > start:  # this image's pads reach into the block
                h.update(key)
        digest = h.digest()
        out.append(digest)
    return out


def kv_block_hashes(hashes: list[bytes], kv_block_size: int) -> list[bytes]:
    """The digest of each full KV block: that of the last hashed block inside it."""
    per = kv_block_size // HASH_TOKENS
    return hashes[per - 1::per] if per >= 1 and kv_block_size % HASH_TOKENS == 0 else []
