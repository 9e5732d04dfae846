"""The prompt contract between the halves: what the encoder stages and the language side reads."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from qwen3vl_epd.prompt.prefix import block_hashes


@dataclass
class CachedImage:
    """One image's (or clip's) encoder output and what prompt processing needs of it without decoding it."""

    grid_thw: torch.Tensor  # [3] int64
    size: tuple[int, int]  # (width, height) as decoded
    embeddings: torch.Tensor  # [V, H]
    deepstack: torch.Tensor  # [V, D*H]
    timestamps: tuple[float, ...] = ()  # a clip's, per temporal patch (its prompt layout)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.grid_thw, self.embeddings, self.deepstack))


class ImageLookup(Protocol):
    """Where the processor finds an image already encoded (the encoder cache)."""

    def get(self, key: bytes) -> CachedImage | None: ...


@dataclass
class EncodedPrompt:
    """What the encoder stages for the language side (docs/design.md, before buffer layout)."""

    fill_ids: torch.Tensor  # [L] int32
    mrope_positions: torch.Tensor  # [L, 3] int32
    embeddings: torch.Tensor  # [V, H] model dtype, one row per visual token
    deepstack: torch.Tensor  # [V, D*H] model dtype, [ds_0 | ds_1 | ...] per visual token
    mrope_delta: int
    visual_spans: list[tuple[int, int]]  # (first token, number of tokens) of each image's and video frame's pads
    span_keys: list[bytes] = field(default_factory=list)  # content key of each span's image or clip (prefix hashes)

    @property
    def length(self) -> int:
        return int(self.fill_ids.shape[0])

    @property
    def num_visual(self) -> int:
        return int(self.embeddings.shape[0])

    def visual_rows_before(self, token: int) -> int:
        """How many visual rows belong to tokens [0, token)."""
        return visual_rows_before(self.visual_spans, token)

    def slice(self, start: int, end: int) -> EncodedPrompt:
        """Tokens [start, end) with exactly their own embedding and DeepStack rows."""
        end, v0, v1 = chunk_rows(self.visual_spans, self.length, start, end)
        return EncodedPrompt(
            fill_ids=self.fill_ids[start:end],
            mrope_positions=self.mrope_positions[start:end],
            embeddings=self.embeddings[v0:v1],
            deepstack=self.deepstack[v0:v1],
            mrope_delta=self.mrope_delta,
            visual_spans=clip_spans(self.visual_spans, start, end),
        )

    def block_hashes(self) -> list[bytes]:
        """The prefix hash chain of the whole prompt (prefix.block_hashes)."""
        return block_hashes(self.fill_ids.tolist(), self.visual_spans, self.span_keys)

    def chunks(self, size: int | None = None) -> Iterator[EncodedPrompt]:
        """Consecutive slices of `size` tokens (the whole prompt when None)."""
        size = size or self.length
        for start in range(0, self.length, size):
            yield self.slice(start, start + size)



def visual_rows_before(spans, token: int) -> int:
    """Visual rows of tokens [0, token), given the (first token, count) span of each image."""
    return sum(min(max(token - s, 0), n) for s, n in spans)


def chunk_rows(spans, length: int, start: int, end: int) -> tuple[int, int, int]:
    """Tokens [start, end) of a prompt of `length`: (end within the prompt, first visual row, end row)."""
    end = min(end, length)
    return end, visual_rows_before(spans, start), visual_rows_before(spans, end)


def clip_spans(spans, start: int, end: int) -> list[tuple[int, int]]:
    """The image spans inside tokens [start, end), relative to start."""
    out = []
    for s, n in spans:
        a, z = max(s, start), min(s + n, end)
        if z > a:
            out.append((a - start, z - a))
    return out
