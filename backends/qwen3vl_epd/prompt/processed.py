"""ProcessedPrompt: a prompt with its pads expanded, patches cut and M-RoPE computed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qwen3vl_epd.prompt.encoded import CachedImage, EncodedPrompt


@dataclass
class VisualItem:
    """One image or video of a prompt, in prompt order, as the vision tower needs it."""

    key: object  # content key (Processor.image_key / video key), or the item's place when it has none
    cached: CachedImage | None
    pixels: torch.Tensor | None  # its patches when not cached
    grid_thw: torch.Tensor  # [3]
    size: tuple[int, int]
    timestamps: list[float] = field(default_factory=list)  # per temporal patch, videos only


@dataclass
class ProcessedPrompt:
    """A prompt ready for the vision tower: pads expanded, patches cut, M-RoPE computed."""

    fill_ids: torch.Tensor  # [L] int64, image and video pads expanded
    pixel_values: torch.Tensor  # [sum of image patches, C*T*P*P] float32
    image_grid_thw: torch.Tensor  # [n_images, 3] int64
    mrope_positions: torch.Tensor  # [3, L] int64
    mrope_delta: int
    visual_spans: list = field(default_factory=list)  # (first token, number of pads) per image and video frame
    image_sizes: list = field(default_factory=list)  # (width, height) as decoded, per image
    image_keys: list = field(default_factory=list)  # content key per image (Processor.image_key), or none
    cached: list = field(default_factory=list)  # per image: its CachedImage (no patches cut), or None
    pixel_values_videos: torch.Tensor | None = None  # [sum of video patches, C*T*P*P] float32
    video_grid_thw: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, dtype=torch.int64))
    video_keys: list = field(default_factory=list)
    video_cached: list = field(default_factory=list)
    video_sizes: list = field(default_factory=list)
    video_timestamps: list = field(default_factory=list)  # per video, seconds per temporal patch
    visual_order: list = field(default_factory=list)  # ("image" | "video", index) in prompt order

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    @property
    def num_videos(self) -> int:
        return int(self.video_grid_thw.shape[0])

    def items(self, place: object = 0) -> list[VisualItem]:
        """The images and videos in prompt order; `place` tells keyless items of prompts apart."""
        made = {"image": self._items("image", place), "video": self._items("video", place)}
        return [made[kind][i] for kind, i in self.visual_order]

    def _items(self, kind: str, place: object) -> list[VisualItem]:
        image = kind == "image"
        grids = self.image_grid_thw if image else self.video_grid_thw
        pixels = self.pixel_values if image else self.pixel_values_videos
        keys, sizes = (self.image_keys, self.image_sizes) if image else (self.video_keys, self.video_sizes)
        cached = (self.cached if image else self.video_cached) or [None] * len(grids)
        stamps = [[]] * len(grids) if image else self.video_timestamps
        out, row = [], 0
        for i, grid in enumerate(grids):
            n = 0 if cached[i] is not None else int(grid.prod())
            key = keys[i] if keys else (place, kind, i)
            out.append(VisualItem(key, cached[i], pixels[row:row + n] if n else None, grid, sizes[i], stamps[i]))
            row += n
        return out

    def span_keys(self) -> list[bytes]:
        """The content key of each span (a video's on each of its frames); none without keys."""
        if (self.num_images and not self.image_keys) or (self.num_videos and not self.video_keys):
            return []
        keys = {"image": self.image_keys, "video": self.video_keys}
        grids = {"image": self.image_grid_thw, "video": self.video_grid_thw}
        spans = {"image": lambda i: 1, "video": lambda i: int(grids["video"][i][0])}  # a clip: one per frame
        return [keys[kind][i] for kind, i in self.visual_order for _ in range(spans[kind](i))]

    def encoded(self, embeddings: torch.Tensor, deepstack: torch.Tensor) -> EncodedPrompt:
        """This prompt with its visual rows (none for text only), in the staged layout."""
        return EncodedPrompt(
            fill_ids=self.fill_ids.to(torch.int32), mrope_positions=self.mrope_positions.T.contiguous().to(torch.int32),
            embeddings=embeddings, deepstack=deepstack, mrope_delta=self.mrope_delta, visual_spans=self.visual_spans,
            span_keys=self.span_keys(),
        )
