"""A 10 s 640x480 clip sampled at 2 fps against one image of the same total pixels (20 frames of
640x480 = 2560x2400), side by side in alternating rounds: encode time in process (decode, resize,
patches, the vision tower), the bytes staged and pulled, and TTFT through a real tritonserver with
the encoder cache and the prefix cache off (every round a full encode).

Run: .venv/bin/python bench/video.py [--checkpoint DIR] [--rounds 3]
"""

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from clips import frame, make_clip  # noqa: E402
from goals import verdict  # noqa: E402

from client import generate  # noqa: E402
from qwen3vl_epd.encoder.vision import VisionEncoder  # noqa: E402
from qwen3vl_epd.prompt.processor import Processor  # noqa: E402
from support.tritonserver import TritonServer  # noqa: E402

PROMPT = "Describe what you see."


def same_pixels_image() -> bytes:
    """2560x2400: the clip's 20 sampled frames tiled 4 x 5, as a JPEG of the clip's quality."""
    tiles = [frame(i * 2, 640, 480) for i in range(20)]
    rows = [np.concatenate(tiles[r * 4:(r + 1) * 4], axis=1) for r in range(5)]
    out = io.BytesIO()
    Image.fromarray(np.concatenate(rows, axis=0)).save(out, "JPEG", quality=90)
    return out.getvalue()


def staged_bytes(encoded) -> int:
    """What the language side pulls: fill ids, M-RoPE positions, embeddings and DeepStack rows."""
    return sum(t.numel() * t.element_size() for t in (encoded.fill_ids, encoded.mrope_positions, encoded.embeddings,
                                                      encoded.deepstack))


def encode_ms(processor, encoder, kind: str, data: bytes) -> tuple[float, object]:
    t = time.perf_counter()
    prompt = processor.process(PROMPT, videos=[data]) if kind == "clip" else processor.process(PROMPT, [data])
    encoded = encoder.encode([prompt])[0]
    return (time.perf_counter() - t) * 1000, encoded


def ttft_ms(server, kind: str, data: bytes) -> float:
    t = time.perf_counter()
    videos, images = ([data], []) if kind == "clip" else ([], [data])
    next(iter(generate(server.grpc_url, PROMPT, images, stream=True, max_tokens=1, videos=videos)))
    return (time.perf_counter() - t) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tiny"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the encoder runs beside a busy language model (config.pbtxt torch_threads 0)
    inputs = {"clip": make_clip(frames=40, rate=4, width=640, height=480), "image": same_pixels_image()}
    processor, encoder = Processor(args.checkpoint), VisionEncoder(args.checkpoint)
    encode, ttft, staged, tokens = {k: [] for k in inputs}, {k: [] for k in inputs}, {}, {}
    with tempfile.TemporaryDirectory() as work:
        server = TritonServer(Path(work) / "server.log", env={"EPD_CHECKPOINT": args.checkpoint,
                                                              "EPD_ENCODER_CACHE_MB": "0", "EPD_PREFIX_CACHE": "false"})
        try:
            for kind, data in inputs.items():  # warm-up
                ttft_ms(server, kind, data)
            for _ in range(args.rounds):
                for kind, data in inputs.items():
                    ms, encoded = encode_ms(processor, encoder, kind, data)
                    encode[kind].append(ms)
                    staged[kind], tokens[kind] = staged_bytes(encoded), encoded.num_visual
                    ttft[kind].append(ttft_ms(server, kind, data))
        finally:
            server.stop()
    med = {name: {k: statistics.median(v) for k, v in d.items()} for name, d in (("encode", encode), ("ttft", ttft))}
    print(f"{'input':<34} {'bytes':>9} {'visual tokens':>14} {'encode ms':>10} {'staged MiB':>11} {'TTFT ms':>8}")
    for kind, label in (("clip", "clip 10 s 640x480, 2 fps (20 fr)"), ("image", "image 2560x2400 (same pixels)")):
        print(f"{label:<34} {len(inputs[kind]):>9} {tokens[kind]:>14} {med['encode'][kind]:>10.1f} "
              f"{staged[kind] / 2**20:>11.2f} {med['ttft'][kind]:>8.1f}")
    ratios = {"encode": med["encode"]["clip"] / med["encode"]["image"],
              "ttft": med["ttft"]["clip"] / med["ttft"]["image"], "bytes": staged["clip"] / staged["image"]}
    print(f"clip / image: encode {ratios['encode']:.2f}, staged bytes {ratios['bytes']:.2f}, TTFT {ratios['ttft']:.2f}")
    # Temporal patches of 2 frames halve the clip's tokens: it should stage about half the bytes and,
    # decoding included, encode and answer no slower than the image of the same pixels.
    for name, key, target in (("staged_bytes", "bytes", 0.55), ("encode", "encode", 1.0), ("ttft", "ttft", 1.0)):
        print(f"goal: clip_vs_image_{name} {ratios[key]:.2f} (target <= {target}) {verdict(ratios[key], '<=', target)}")


if __name__ == "__main__":
    main()
