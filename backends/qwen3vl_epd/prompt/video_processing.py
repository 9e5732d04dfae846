"""Qwen3-VL's video processing without torchvision: transformers' Qwen3VLVideoProcessor's own frame
sampling, smart_resize, patchify and timestamps, with its torchvision resize and normalisation
done in torch (the same kernel: bicubic, antialiased, on uint8 frames)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_utils import VideoMetadata

from qwen3vl_epd.errors import InvalidInputError, VideoError
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.videos import VideoInfo, decode_frames, probe_video

MAX_FPS = 60.0  # the most frames per second a request may ask to sample
_KEYS = ("fps", "min_frames", "max_frames", "size", "patch_size", "temporal_patch_size", "merge_size", "image_mean",
         "image_std", "rescale_factor", "cap_pixels_per_frame", "max_video_tokens")


@dataclass(frozen=True)
class VideoOptions:
    """A request's frame sampling: `fps` or `num_frames` (neither: the checkpoint's default fps)."""

    fps: float | None = None
    num_frames: int | None = None

    def check(self, limits: Limits) -> VideoOptions:
        if self.fps is not None and self.num_frames is not None:
            raise InvalidInputError("video_fps, video_frames: send one of them, not both")
        if self.fps is not None and not 0 < self.fps <= MAX_FPS:
            raise InvalidInputError(f"video_fps: {self.fps:g} is outside (0, {MAX_FPS:g}]")
        if self.num_frames is not None and not 2 <= self.num_frames <= limits.max_video_frames:
            raise InvalidInputError(f"video_frames: {self.num_frames} is outside [2, {limits.max_video_frames}] "
                                    "(max_video_frames)")
        return self

    @property
    def key(self) -> bytes:
        return json.dumps([self.fps, self.num_frames]).encode()


@dataclass
class ProcessedVideo:
    pixel_values: torch.Tensor  # [T*H*W patches, C*Tp*P*P] float32
    grid_thw: torch.Tensor  # [3] int64
    timestamps: list[float]  # seconds, per temporal patch (the middle of its frames)
    size: tuple[int, int]  # (width, height) as decoded


class VideoProcessor:
    """The checkpoint's video_preprocessor_config.json over the reference's defaults (2 fps, 4-768
    frames); `fingerprint` covers every setting that shapes a clip's patches."""

    def __init__(self, checkpoint_dir: str | Path):
        path = Path(checkpoint_dir) / "video_preprocessor_config.json"
        own = json.loads(path.read_text()) if path.exists() else {}
        self.config = {k: own.get(k, getattr(Qwen3VLVideoProcessor, k)) for k in _KEYS}
        self.c = c = SimpleNamespace(**self.config)
        self.fingerprint = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).digest()
        self.factor = c.patch_size * c.merge_size
        scale = 1.0 / c.rescale_factor  # rescale and normalise fused, as the reference does
        self.mean = (torch.tensor(c.image_mean) * scale).view(-1, 1, 1)
        self.std = (torch.tensor(c.image_std) * scale).view(-1, 1, 1)

    def indices(self, info: VideoInfo, options: VideoOptions) -> np.ndarray:
        """The frames to sample (Qwen3VLVideoProcessor.sample_frames); never more than the clip has."""
        metadata = VideoMetadata(total_num_frames=info.total_frames, fps=info.fps, width=info.width,
                                 height=info.height, duration=info.seconds)
        num_frames = None if options.num_frames is None else min(options.num_frames, info.total_frames)
        fps = options.fps if num_frames is None else None
        return Qwen3VLVideoProcessor.sample_frames(self.c, metadata, num_frames=num_frames, fps=fps)

    def resized(self, frames: int, height: int, width: int) -> tuple[int, int]:
        """The (height, width) every frame is resized to (Qwen3VLVideoProcessor.resize)."""
        c, size = self.c, self.c.size
        max_pixels = size["longest_edge"]
        if c.cap_pixels_per_frame:
            per_frame = max(min(c.max_video_tokens * self.factor**2, max_pixels // frames),
                            int(size["shortest_edge"] * 1.05))
            max_pixels = per_frame * frames
        return smart_resize(num_frames=frames, height=height, width=width, temporal_factor=c.temporal_patch_size,
                            factor=self.factor, min_pixels=size["shortest_edge"], max_pixels=max_pixels)

    def tokens(self, frames: int, height: int, width: int) -> int:
        """Visual tokens of a clip of `frames` sampled frames."""
        h, w = self.resized(frames, height, width)
        t = -(-frames // self.c.temporal_patch_size)
        return t * (h // self.c.patch_size) * (w // self.c.patch_size) // self.c.merge_size**2

    def process(self, data: bytes, index: int, options: VideoOptions, limits: Limits, tokens_left: int,
                on_frame: Callable[[], None] = lambda: None) -> ProcessedVideo:
        """Container bytes → patches, grid and timestamps; the limits are checked before decoding."""
        info = probe_video(data, index, limits)
        indices = self.indices(info, options)
        if len(indices) > limits.max_video_frames:
            raise VideoError(index, f"{len(indices)} sampled frames is over the limit of {limits.max_video_frames} "
                                    "(max_video_frames); ask for fewer with video_fps or video_frames")
        try:
            h, w = self.resized(len(indices), info.height, info.width)
        except ValueError as e:  # smart_resize: aspect ratio over 200
            raise VideoError(index, f"{info.width}x{info.height} is rejected by the video processor: {e}") from None
        tokens = self.tokens(len(indices), info.height, info.width)
        if tokens > tokens_left:
            raise VideoError(index, f"{tokens} visual tokens ({len(indices)} frames at {w}x{h}) is over what is "
                                    f"left of the per-prompt limit, {tokens_left} of max_visual_tokens "
                                    f"{limits.max_visual_tokens}")

        def resize(frame: torch.Tensor) -> torch.Tensor:
            if frame.shape[-2:] == (h, w):
                return frame
            return F.interpolate(frame, size=[h, w], mode="bicubic", align_corners=False, antialias=True)

        frames = decode_frames(data, index, indices, resize, on_frame)
        pixels = (frames.to(torch.float32) - self.mean) / self.std
        patches, t, gh, gw = Qwen3VLVideoProcessor.patchify(
            None, pixels[None], patch_size=self.c.patch_size, merge_size=self.c.merge_size,
            temporal_patch_size=self.c.temporal_patch_size)
        stamps = Qwen3VLProcessor._calculate_timestamps(None, indices, info.fps, self.c.temporal_patch_size)
        return ProcessedVideo(patches[0], torch.tensor([t, gh, gw], dtype=torch.int64), stamps,
                              (info.width, info.height))

    def key(self, data: bytes, options: VideoOptions) -> bytes:
        """Full SHA-256 of a clip's bytes, its sampling options and the processor settings."""
        return hashlib.sha256(self.fingerprint + options.key + data).digest()

