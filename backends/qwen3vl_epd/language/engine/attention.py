"""How one step's tokens attend to the paged KV cache, behind one seam chosen by device.

"sdpa" (CPU, and any device): each prompt chunk in its own causal SDPA over its gathered keys,
all decode tokens in one padded SDPA; exact against transformers. "flash" (CUDA, fp16/bf16,
blocks a multiple of 256 tokens, FlashAttention-2's paged limit): one varlen flash-attention
call per layer for every token of the step, reading the cache in place through a block table."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen3vl_epd.devices import to_device
from qwen3vl_epd.language.engine.kv_cache import PagedKVCache, SequenceKV
from qwen3vl_epd.language.model import causal_attention

BACKENDS = ("auto", "sdpa", "flash")
FLASH_BLOCK = 256


def choose_backend(name: str, device: torch.device, dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    """The backend `name` asks for ("auto": flash where it can run, else sdpa); ValueError naming
    attention_backend when flash is asked for where it cannot run."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend: {name!r} is not one of {', '.join(BACKENDS)}")
    why = flash_unsupported(device, dtype, block_size, head_dim)
    if name == "flash" and why:
        raise ValueError(f"attention_backend: flash cannot run here: {why}")
    return name if name != "auto" else ("sdpa" if why else "flash")


def flash_unsupported(device: torch.device, dtype: torch.dtype, block_size: int, head_dim: int) -> str:
    if device.type != "cuda":
        return f"device {device} is not CUDA"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype} is not float16 or bfloat16"
    if block_size % FLASH_BLOCK:
        return f"kv_block_size {block_size} is not a multiple of {FLASH_BLOCK}"
    if head_dim > 256:
        return f"head_dim {head_dim} is over 256"
    return ""


def step_attention(backend: str, cache: PagedKVCache, chunks: list[tuple[SequenceKV, int]], decodes: list[SequenceKV]):
    """The attention of one flat batch: prompt chunks (kv, tokens) first, then one token per decode.
    Built before the forward: every index it needs is on the device by then."""
    if backend == "flash":
        return PagedFlashAttention(cache, chunks + [(kv, 1) for kv in decodes])
    parts = [(ChunkAttention(kv, n), n) for kv, n in chunks]
    if decodes:
        parts.append((DecodeBatch(decodes), len(decodes)))
    return SegmentedAttention(parts)


def _end_of_forward(cache: PagedKVCache, layer: int, parts: list[tuple[SequenceKV, int]]) -> None:
    if layer == cache.k.shape[0] - 1:
        for kv, n in parts:
            kv.length += n


class SegmentedAttention:
    """Runs of the flat batch, each attended by its own part."""

    def __init__(self, parts: list):
        self.parts = parts

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        out, start = [], 0
        for part, n in self.parts:
            s = slice(start, start + n)
            out.append(part.attend(layer, q[:, :, s], k[:, :, s], v[:, :, s], scale))
            start += n
        return torch.cat(out)


class ChunkAttention:
    """One sequence's prompt chunk of n tokens after the kv.length already cached."""

    def __init__(self, kv: SequenceKV, n: int):
        self.kv, self.n = kv, n
        self.read = to_device(kv.slots(0, kv.length + n), kv.cache.k.device)  # every key it attends to
        self.write = self.read[kv.length:]

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [1, heads, n, hd], k/v [1, kv, n, hd] → [n, heads * hd]."""
        c = self.kv.cache
        c.k_flat[layer].index_copy_(0, self.write, k[0].transpose(0, 1))
        c.v_flat[layer].index_copy_(0, self.write, v[0].transpose(0, 1))
        _end_of_forward(c, layer, [(self.kv, self.n)])
        keys = c.k_flat[layer].index_select(0, self.read).transpose(0, 1)[None]
        values = c.v_flat[layer].index_select(0, self.read).transpose(0, 1)[None]
        return causal_attention(q, keys, values, scale)


class DecodeBatch:
    """One new token for each of many sequences: their keys and values are written in one scatter
    and attended in one padded SDPA, instead of one small attention per sequence."""

    def __init__(self, seqs: list[SequenceKV]):
        self.cache, self.seqs = seqs[0].cache, seqs
        lengths = [s.length for s in seqs]
        width = max(lengths) + 1
        slots = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, (s, n) in enumerate(zip(seqs, lengths)):
            slots[i, : n + 1] = s.slots(0, n + 1)
        valid = torch.arange(width)[None] <= torch.tensor(lengths)[:, None]  # [B, T]: cached tokens and the new one
        new = slots[torch.arange(len(seqs)), lengths]
        packed = to_device(torch.cat([slots.flatten(), valid.flatten().long(), new]), self.cache.k.device)
        size = slots.numel()
        self.slots = packed[:size]
        self.valid = packed[size : 2 * size].view(len(seqs), 1, 1, width).bool()
        self.new = packed[2 * size :]
        self.width = width

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [1, heads, B, hd], k/v [1, kv, B, hd] → [B, heads * hd]."""
        c, b = self.cache, len(self.seqs)
        c.k_flat[layer].index_copy_(0, self.new, k[0].transpose(0, 1))
        c.v_flat[layer].index_copy_(0, self.new, v[0].transpose(0, 1))
        _end_of_forward(c, layer, [(s, 1) for s in self.seqs])
        shape = (b, self.width, *c.k_flat.shape[2:])
        keys = c.k_flat[layer].index_select(0, self.slots).view(shape).transpose(1, 2)  # [B, kv, T, hd]
        values = c.v_flat[layer].index_select(0, self.slots).view(shape).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[0].transpose(0, 1)[:, :, None], keys, values,
                                           attn_mask=self.valid, scale=scale, enable_gqa=True)
        return o[:, :, 0].reshape(b, -1)


class PagedFlashAttention:
    """Every token of the step in one FlashAttention-2 varlen call per layer (causal, aligned to
    each sequence's end), keys read from the paged cache in place through a block table."""

    def __init__(self, cache: PagedKVCache, parts: list[tuple[SequenceKV, int]]):
        self.cache, self.parts = cache, parts
        q_lens = [n for _, n in parts]
        k_lens = [kv.length + n for kv, n in parts]
        width = max(len(kv.blocks) for kv, _ in parts)
        table = torch.zeros(len(parts), width, dtype=torch.int32)
        for i, (kv, _) in enumerate(parts):
            table[i, : len(kv.blocks)] = torch.tensor(kv.blocks, dtype=torch.int32)
        cu = lambda lens: torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
        ints = torch.cat([cu(q_lens), cu(k_lens), torch.tensor(k_lens, dtype=torch.int32), table.flatten()])
        device = cache.k.device
        ints = to_device(ints, device)
        b = len(parts)
        self.cu_q, self.cu_k, self.used = ints[: b + 1], ints[b + 1 : 2 * b + 2], ints[2 * b + 2 : 3 * b + 2]
        self.table = ints[3 * b + 2 :].view(b, width)
        self.slots = to_device(torch.cat([kv.slots(kv.length, n) for kv, n in parts]), device)
        self.max_q, self.max_k = max(q_lens), max(k_lens)

    def attend(self, layer: int, q, k, v, scale: float) -> torch.Tensor:
        """q [1, heads, N, hd], k/v [1, kv, N, hd] → [N, heads * hd]."""
        c = self.cache
        c.k_flat[layer].index_copy_(0, self.slots, k[0].transpose(0, 1))
        c.v_flat[layer].index_copy_(0, self.slots, v[0].transpose(0, 1))
        _end_of_forward(c, layer, self.parts)
        out = torch.ops.aten._flash_attention_forward(
            q[0].transpose(0, 1), c.k[layer], c.v[layer], self.cu_q, self.cu_k, self.max_q, self.max_k, 0.0, True,
            False, scale=scale, seqused_k=self.used, block_table=self.table)[0]
        return out.reshape(out.shape[0], -1)
