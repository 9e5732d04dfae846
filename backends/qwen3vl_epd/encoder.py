"""Encoder half: the vision tower alone, one packed forward per batch of prompts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .architecture import architecture
from .checkpoint import VISION_PREFIX, CheckpointReader, load_config, materialize
from .encoder_cache import CachedImage, EncoderCache
from .prefix import block_hashes
from .processor import ProcessedPrompt


@dataclass
class EncodedPrompt:
    """What the encoder stages for the language side (DESIGN §3, before buffer layout)."""

    fill_ids: torch.Tensor  # [L] int32
    mrope_positions: torch.Tensor  # [L, 3] int32
    embeddings: torch.Tensor  # [V, H] model dtype, one row per visual token
    deepstack: torch.Tensor  # [V, D*H] model dtype, [ds_0 | ds_1 | ...] per visual token
    mrope_delta: int
    image_spans: list[tuple[int, int]]  # (first token, number of tokens) of each image's pads
    image_keys: list[bytes] = field(default_factory=list)  # content key of each image (prefix hashes)

    @property
    def length(self) -> int:
        return int(self.fill_ids.shape[0])

    @property
    def num_visual(self) -> int:
        return int(self.embeddings.shape[0])

    def visual_rows_before(self, token: int) -> int:
        """How many visual rows belong to tokens [0, token)."""
        return visual_rows_before(self.image_spans, token)

    def slice(self, start: int, end: int) -> EncodedPrompt:
        """Tokens [start, end) with exactly their own embedding and DeepStack rows."""
        end = min(end, self.length)
        v0, v1 = self.visual_rows_before(start), self.visual_rows_before(end)
        return EncodedPrompt(
            fill_ids=self.fill_ids[start:end],
            mrope_positions=self.mrope_positions[start:end],
            embeddings=self.embeddings[v0:v1],
            deepstack=self.deepstack[v0:v1],
            mrope_delta=self.mrope_delta,
            image_spans=clip_spans(self.image_spans, start, end),
        )

    def block_hashes(self) -> list[bytes]:
        """The prefix hash chain of the whole prompt (prefix.block_hashes)."""
        return block_hashes(self.fill_ids.tolist(), self.image_spans, self.image_keys)

    def chunks(self, size: int | None = None) -> Iterator[EncodedPrompt]:
        """Consecutive slices of `size` tokens (the whole prompt when None)."""
        size = size or self.length
        for start in range(0, self.length, size):
            yield self.slice(start, start + size)


def encoded_prompt(p: ProcessedPrompt, embeddings: torch.Tensor, deepstack: torch.Tensor) -> EncodedPrompt:
    """A processed prompt with its visual rows (none for text only), in the staged layout."""
    return EncodedPrompt(
        fill_ids=p.fill_ids.to(torch.int32), mrope_positions=p.mrope_positions.T.contiguous().to(torch.int32),
        embeddings=embeddings, deepstack=deepstack, mrope_delta=p.mrope_delta, image_spans=p.image_spans,
        image_keys=list(p.image_keys),
    )


def _cached(p: ProcessedPrompt) -> list:
    """Per image of a prompt, its CachedImage or None."""
    return p.cached or [None] * p.num_images


def _key(p: ProcessedPrompt, n: int, i: int) -> object:
    """The content key of image i of prompt n (the batch position when it has none)."""
    return p.image_keys[i] if p.image_keys else (n, i)


def visual_rows_before(spans, token: int) -> int:
    """Visual rows of tokens [0, token), given the (first token, count) span of each image."""
    return sum(min(max(token - s, 0), n) for s, n in spans)


def clip_spans(spans, start: int, end: int) -> list[tuple[int, int]]:
    """The image spans inside tokens [start, end), relative to start."""
    out = []
    for s, n in spans:
        a, z = max(s, start), min(s + n, end)
        if z > a:
            out.append((a - start, z - a))
    return out


class VisionEncoder:
    """Loads only `model.visual.*` and turns processed prompts into EncodedPrompts."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.config = load_config(checkpoint_dir)
        self.dtype, self.device = dtype, torch.device(device)
        vc = self.config.vision_config
        self.hidden_size = vc.out_hidden_size
        self.num_deepstack = len(vc.deepstack_visual_indexes)
        with torch.device("meta"):
            visual = architecture(self.config, checkpoint_dir).vision_model._from_config(vc, dtype=dtype)
        state = CheckpointReader(checkpoint_dir).load((VISION_PREFIX,), strip=VISION_PREFIX, dtype=dtype)
        self.visual = materialize(visual, state, self.device).eval()
        self.merge_unit = vc.spatial_merge_size**2
        self.images_encoded = 0  # images through the vision tower (cache hits and repeats are not)

    @torch.inference_mode()
    def encode(self, prompts: list[ProcessedPrompt], cache: EncoderCache | None = None) -> list[EncodedPrompt]:
        """One packed vision forward over the batch's images that are not cached (an image that
        appears twice is encoded once), split back per prompt; what was encoded goes into `cache`."""
        fresh = self._forward(prompts)
        if cache is not None:
            for key, entry in fresh.items():
                if isinstance(key, bytes):
                    cache.put(key, entry)
        results = []
        for n, p in enumerate(prompts):
            rows = [c or fresh[_key(p, n, i)] for i, c in enumerate(_cached(p))]
            embeds = torch.cat([self._empty(0), *(r.embeddings for r in rows)])
            deepstack = torch.cat([self._empty(0, self.num_deepstack), *(r.deepstack for r in rows)])
            results.append(encoded_prompt(p, embeds, deepstack))
        return results

    def _forward(self, prompts: list[ProcessedPrompt]) -> dict[object, CachedImage]:
        """Key → encoder output of each distinct image that was not cached."""
        todo: dict[object, tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        for n, p in enumerate(prompts):
            patch = 0
            for i, c in enumerate(_cached(p)):
                if c is not None:
                    continue
                grid = p.image_grid_thw[i]
                count = int(grid.prod())
                todo.setdefault(_key(p, n, i), (p.pixel_values[patch:patch + count], grid, p.image_sizes[i]))
                patch += count
        if not todo:
            return {}
        pixels = torch.cat([t[0] for t in todo.values()]).to(self.device, self.dtype)
        grid = torch.stack([t[1] for t in todo.values()]).to(self.device)
        out = self.visual(pixels, grid_thw=grid, return_dict=True)
        deepstack = torch.cat(list(out.deepstack_features), dim=-1) if self.num_deepstack else None
        self.images_encoded += len(todo)
        fresh, row = {}, 0
        for key, (_, g, size) in todo.items():
            v = int(g.prod()) // self.merge_unit
            ds = deepstack[row:row + v] if deepstack is not None else self._empty(v, 0)
            fresh[key] = CachedImage(g.cpu(), size, out.pooler_output[row:row + v], ds)
            row += v
        return fresh

    def _empty(self, rows: int, levels: int = 1) -> torch.Tensor:
        return torch.zeros(rows, levels * self.hidden_size, dtype=self.dtype, device=self.device)
