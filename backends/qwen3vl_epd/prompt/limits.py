"""Per-request input limits; every violation names the limit in its error."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qwen3vl_epd.settings import EncoderSettings, Settings


@dataclass
class Limits:
    max_image_bytes: int = EncoderSettings.max_image_bytes
    max_image_pixels: int = EncoderSettings.max_image_pixels  # checked from the header, before any pixel is decoded
    max_images: int = EncoderSettings.max_images
    max_video_bytes: int = EncoderSettings.max_video_bytes
    max_video_seconds: float = EncoderSettings.max_video_seconds
    max_video_frames: int = EncoderSettings.max_video_frames  # frames sampled from one clip
    max_video_pixels: int = EncoderSettings.max_video_pixels  # per frame, from the stream header
    max_videos: int = EncoderSettings.max_videos
    max_visual_tokens: int = EncoderSettings.max_visual_tokens  # image and video tokens of one prompt
    max_prompt_tokens: int = Settings.max_model_len

    @classmethod
    def of(cls, s: Settings) -> Limits:
        """A side's limits (the language side sends images and videos on unread: theirs are the encoder's)."""
        own = {f.name: getattr(s, f.name) for f in dataclasses.fields(cls) if hasattr(s, f.name)}
        return cls(**own, max_prompt_tokens=s.max_model_len)
