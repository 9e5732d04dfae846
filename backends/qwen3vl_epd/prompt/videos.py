"""Video inputs: container bytes (or a data URL) → stream facts and sampled RGB frames, within the
request's limits, with PyAV. Everything a limit needs is read from the header and the packets
before a frame is decoded."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import av
import numpy as np
import torch

from qwen3vl_epd.errors import VideoError
from qwen3vl_epd.prompt.limits import Limits, element_bytes

# Presentation-time steps may differ by one tick of the stream's time base (rounding, as WebM's
# millisecond clocks do at 30 fps) and by this fraction; more is a variable frame rate.
FRAME_STEP_TOLERANCE = 0.01


@dataclass
class VideoInfo:
    """What the frame sampler needs of a clip, read without decoding a frame."""

    total_frames: int
    fps: float
    width: int
    height: int

    @property
    def seconds(self) -> float:
        return self.total_frames / self.fps


def video_data(data: bytes, index: int, limits: Limits) -> bytes:
    """A `video` element's raw container bytes (a base64 data URL decoded), within the byte limit."""
    return element_bytes(data, index, limits.max_video_bytes, "video", "bytes (max_video_bytes)")


def _open(data: bytes, index: int):
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise VideoError(index, f"cannot decode video: not a video container FFmpeg can read ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(index, "cannot decode video: the container has no video stream (audio only?)")
    return container, container.streams.video[0]


def probe_video(data: bytes, index: int, limits: Limits) -> VideoInfo:
    """Frame count, rate and size from the header and the packets (containers such as WebM and MKV
    report 0 frames: the packets are counted); VideoError for a limit or a clip we cannot time."""
    container, stream = _open(data, index)
    with container:
        stated = (container.duration or 0) / av.time_base  # containers without a frame count still state this
        width, height = stream.codec_context.width, stream.codec_context.height
        if width <= 0 or height <= 0:
            raise VideoError(index, f"cannot decode video: the stream has no frame size ({width}x{height})")
        if width * height > limits.max_video_pixels:
            raise VideoError(index, f"{width}x{height} = {width * height} pixels per frame is over the limit of "
                                    f"{limits.max_video_pixels} (max_video_pixels)")
        if stated > limits.max_video_seconds:
            raise VideoError(index, f"{stated:.1f} s is over the limit of "
                                    f"{limits.max_video_seconds:g} s (max_video_seconds)")
        declared, rate, tick = stream.frames, stream.average_rate, float(stream.time_base)
        try:
            pts = sorted(p.pts for p in container.demux(stream) if p.size and p.pts is not None)
        except av.error.FFmpegError as e:
            raise VideoError(index, f"cannot decode video: the container is damaged ({e})") from None
    if declared and declared != len(pts):
        raise VideoError(index, f"cannot decode video: truncated, the header lists {declared} frames but "
                                f"{len(pts)} are there")
    if len(pts) < 2:
        raise VideoError(index, f"the clip has {len(pts)} frame(s); a clip needs at least 2 (one temporal patch)")
    steps = np.diff(pts)
    step, tick_ms = float(np.median(steps)), tick * 1000
    if step <= 0 or np.abs(steps - step).max() > 1 + FRAME_STEP_TOLERANCE * step:
        raise VideoError(index, f"variable frame rate: frame times step from {steps.min() * tick_ms:.1f} to "
                                f"{steps.max() * tick_ms:.1f} ms; only constant-rate clips are timed correctly "
                                "(re-encode at a constant rate)")
    fps = float(rate) if rate else 1 / (step * tick)
    info = VideoInfo(len(pts), fps, width, height)
    if stated > info.seconds + 1.5 / fps + 0.05:
        raise VideoError(index, f"cannot decode video: truncated, the header says {stated:.2f} s but the frames "
                                f"there last {info.seconds:.2f} s")
    if info.seconds > limits.max_video_seconds:
        raise VideoError(index, f"{info.seconds:.1f} s is over the limit of {limits.max_video_seconds:g} s "
                                "(max_video_seconds)")
    return info


def decode_frames(data: bytes, index: int, indices: Sequence[int], resize: Callable[[torch.Tensor], torch.Tensor],
                  on_frame: Callable[[], None] = lambda: None) -> torch.Tensor:
    """The frames at `indices` (presentation order, ascending) as uint8 [T, 3, h, w], each passed
    through `resize` as it is decoded so the clip is never held at full size; `on_frame` after
    every frame decoded (a long clip's decode is progress the supervisor must see)."""
    wanted, frames = set(int(i) for i in indices), {}
    container, stream = _open(data, index)
    with container:
        size = stream.codec_context.width, stream.codec_context.height
        try:
            for i, frame in enumerate(container.decode(stream)):
                on_frame()
                if i == 0 and frame.rotation:
                    raise VideoError(index, f"rotated by {frame.rotation % 360} degrees (display matrix); "
                                            "rotated clips are not supported (re-encode them upright)")
                if (frame.width, frame.height) != size:
                    raise VideoError(index, f"frame {i} is {frame.width}x{frame.height} but the stream is "
                                            f"{size[0]}x{size[1]}; a clip must keep one frame size")
                if i in wanted:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()
                    frames[i] = resize(rgb[None])[0]
                if i >= indices[-1]:
                    break
        except av.error.FFmpegError as e:
            raise VideoError(index, f"cannot decode video: damaged at frame {len(frames)} ({e})") from None
    if len(frames) != len(wanted):
        raise VideoError(index, f"cannot decode video: truncated, {len(frames)} of the {len(wanted)} sampled frames "
                                "could be decoded")
    return torch.stack([frames[int(i)] for i in indices])
