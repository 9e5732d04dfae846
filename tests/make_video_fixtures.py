"""Writes tests/fixtures/video_processing.safetensors: clips and what transformers' own
Qwen3VLVideoProcessor (its torchvision pipeline) makes of them, for test_video.py to compare the
torch-only processing against. Run once, in a throwaway environment that has torchvision (PyPI's
torch and torchvision are CUDA builds; they run on CPU):

    python3 -m venv /tmp/tvenv && /tmp/tvenv/bin/pip install --isolated torch==2.13.0 torchvision==0.28.0 \
        transformers==5.24.0 av==18.1.0 numpy==1.26.4 pillow==13.0.0
    /tmp/tvenv/bin/python tests/make_video_fixtures.py
"""

import io
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen3VLVideoProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata, load_video

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from clips import make_clip  # noqa: E402

# name: (clip arguments, sampling options); WebM reports 0 frames, so transformers gets it decoded.
CLIPS = {
    "mp4_resized": (dict(frames=9, rate=4, width=100, height=60), {}),
    "mp4_odd_frames": (dict(frames=25, rate=10, width=128, height=96), {"num_frames": 5}),
    "mp4_fps": (dict(frames=30, rate=6, width=72, height=136), {"fps": 3.0}),
    "webm": (dict(frames=12, rate=6, width=80, height=64, fmt="webm", codec="libvpx-vp9"), {}),
}


def decoded(data: bytes) -> tuple[np.ndarray, VideoMetadata]:
    """Every frame and the stream facts, for containers transformers' PyAV reader cannot count."""
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(s)])
        rate = float(s.average_rate)
    return frames, VideoMetadata(total_num_frames=len(frames), fps=rate, duration=len(frames) / rate,
                                 width=frames.shape[2], height=frames.shape[1])


def main() -> None:
    config = json.loads((ROOT / "backends/qwen3vl_epd/checkpoint/video_preprocessor_config.json").read_text())
    config.pop("video_processor_type")
    processor = Qwen3VLVideoProcessor(**config)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (clip, options) in CLIPS.items():
            data = make_clip(**clip)
            if clip.get("fmt") == "webm":
                frames, metadata = decoded(data)
                result = processor(videos=[frames], video_metadata=[metadata], return_metadata=True,
                                   cap_pixels_per_frame=False, **options)
            else:  # transformers' own PyAV reader, sampling with the processor's sample_frames
                path = Path(tmp) / f"{name}.mp4"
                path.write_bytes(data)
                frames, metadata = load_video(str(path), backend="pyav",
                                              sample_indices_fn=partial(processor.sample_frames, **options))
                result = processor(videos=[frames], video_metadata=[metadata], do_sample_frames=False,
                                   return_metadata=True, cap_pixels_per_frame=False)
            meta = result["video_metadata"][0]
            stamps = Qwen3VLProcessor._calculate_timestamps(None, meta.frames_indices, meta.fps, 2)
            out[f"{name}.clip"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            out[f"{name}.pixel_values"] = result["pixel_values_videos"].contiguous()
            out[f"{name}.grid_thw"] = result["video_grid_thw"][0].contiguous()
            out[f"{name}.timestamps"] = torch.tensor(stamps, dtype=torch.float64)
            out[f"{name}.options"] = torch.tensor([options.get("fps", 0.0), options.get("num_frames", 0)],
                                                  dtype=torch.float64)
            print(name, tuple(result["pixel_values_videos"].shape), result["video_grid_thw"].tolist(), stamps)
    (ROOT / "tests/fixtures").mkdir(exist_ok=True)
    save_file(out, ROOT / "tests/fixtures/video_processing.safetensors")


if __name__ == "__main__":
    main()
