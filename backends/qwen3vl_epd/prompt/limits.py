"""Per-request input limits; every violation names the limit in its error."""

from __future__ import annotations

import base64
import binascii
import dataclasses
from dataclasses import dataclass

from qwen3vl_epd.errors import ImageDecodeError, ImageTooLargeError, VideoError
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


def element_bytes(data: bytes, index: int, limit: int, kind: str = "image", unit: str = "encoded bytes") -> bytes:
    """An `image` or `video` element's raw bytes (a base64 data URL decoded), within `limit`."""
    decode_error, size_error = (ImageDecodeError, ImageTooLargeError) if kind == "image" else (VideoError, VideoError)
    if data[:5] == b"data:" and b";base64," in data[:100]:
        try:
            data = base64.b64decode(data.split(b";base64,", 1)[1], validate=True)
        except binascii.Error:
            raise decode_error(index, f"cannot decode {kind}: invalid base64 in data URL") from None
    if len(data) > limit:
        raise size_error(index, f"{len(data)} bytes is over the limit of {limit} {unit}")
    if not data:
        raise decode_error(index, f"cannot decode {kind}: it is empty (0 bytes)")
    return data
