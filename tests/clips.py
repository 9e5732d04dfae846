"""Test clips made with PyAV: moving shapes on a gradient, so frames differ and resizing matters."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np


def frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame i: a colour gradient and a bright square that moves with i, RGB uint8 [H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y + 16 * i) % 256], -1)
    side = max(min(width, height) // 4, 2)
    x0, y0 = (5 * i) % max(width - side, 1), (3 * i) % max(height - side, 1)
    rgb[y0:y0 + side, x0:x0 + side] = (250, 240 - 10 * (i % 8), 20)
    return rgb.astype(np.uint8)


def make_clip(frames: int = 8, rate: int = 4, width: int = 96, height: int = 72, fmt: str = "mp4",
              codec: str = "libx264", rotation: int = 0, pts: list[int] | None = None) -> bytes:
    """Container bytes of a clip; `pts` in milliseconds for a variable rate."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=rate)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            s.options = {"crf": "18", "preset": "ultrafast", "threads": "1"}
        if rotation:
            s.set_display_rotation(rotation)
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(frame(i, width, height), format="rgb24")
            if pts is not None:
                f.pts, f.time_base = pts[i], Fraction(1, 1000)
            _mux(c, s, f)
        _mux(c, s, None)
    return buf.getvalue()


def make_audio_only(packets: int = 5) -> bytes:
    """An MP4 with one AAC stream and no video."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(packets):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            _mux(c, s, f)
        _mux(c, s, None)
    return buf.getvalue()


def _mux(container, stream, frame) -> None:
    for packet in stream.encode(frame):
        container.mux(packet)
