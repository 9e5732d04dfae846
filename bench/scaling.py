"""Encoder scaling and the remote path's first-token time, measured side by side in one run.

Encode-heavy load (1024×1024 images, max_tokens 1) through a language server whose pool is one
encoder server, then through one whose pool is two, each encoder pinned to its own core
(taskset), same client concurrency, rounds alternating: images/s of both and their ratio. Then,
at concurrency 1 on the same requests, time to first token through the remote path (language
server + encoder servers) against a single server (role all), requests alternating.

Run: .venv/bin/python bench/scaling.py [--images 24] [--concurrency 8] [--rounds 2] [--ttft-requests 12]
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from goals import verdict  # noqa: E402

from client import generate, text_of  # noqa: E402
from qwen3vl_epd.transfer.signing import new_key  # noqa: E402
from support.prompts import noise_jpeg  # noqa: E402
from support.tritonserver import NO_CACHES, TritonServer  # noqa: E402


def images_per_second(url: str, images: list[bytes], concurrency: int) -> float:
    def one(image):
        return text_of(generate(url, "Describe this image.", [image], stream=True, max_tokens=1))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, images))
    return len(images) / (time.perf_counter() - start)


def first_token_s(url: str, image: bytes) -> float:
    start = time.perf_counter()
    next(iter(generate(url, "Describe this image.", [image], stream=True, max_tokens=8)))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="images per round")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per pool size, alternating")
    ap.add_argument("--ttft-requests", type=int, default=12)
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    logs = Path(tempfile.mkdtemp(prefix="epd-scaling-"))
    # Multi-host roles on one host: loopback addresses, one shared key.
    # The uncached path is measured: repeated images would otherwise skip the encoder and the pull.
    env = {"EPD_HANDLE_KEY": new_key(), "EPD_MOONCAKE_HOST": "127.0.0.1", **NO_CACHES}
    encoders = [TritonServer(logs / f"enc{i}.log", env, args=["--role", "encoder"], wait=False,
                             cpus=str(cores[i % len(cores)])) for i in range(2)]
    for e in encoders:
        e.wait_ready()
    pools = {n: "ipv4:" + ",".join(e.grpc_url for e in encoders[:n]) for n in (1, 2)}
    language = {n: TritonServer(logs / f"lang{n}.log", env, args=["--role", "language", "--encoders", pools[n]],
                                wait=False) for n in (1, 2)}
    single = TritonServer(logs / "single.log", NO_CACHES, wait=False)
    servers = [*encoders, *language.values(), single]
    try:
        for s in servers:
            s.wait_ready()
        print(f"encoders pinned to cores {[cores[i % len(cores)] for i in range(2)]} of {cores}; logs in {logs}")
        warm = noise_jpeg(1024, seed=99)
        for s in (*language.values(), single):
            images_per_second(s.grpc_url, [warm] * 2, 2)
        rates = {1: [], 2: []}
        for r in range(args.rounds):
            for n in (1, 2) if r % 2 == 0 else (2, 1):
                batch = [noise_jpeg(1024, seed=1000 * r + 10 * n + i) for i in range(args.images)]
                rates[n].append(images_per_second(language[n].grpc_url, batch, args.concurrency))
                print(f"round {r}: {n} encoder(s): {rates[n][-1]:.2f} images/s")
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        print(f"\n| encoder servers | images/s (1024×1024, max_tokens 1, concurrency {args.concurrency}) |\n"
              f"|---|---|\n| 1 | {one:.2f} |\n| 2 | {two:.2f} |")

        remote, local = [], []
        image = (ROOT.parent / "shared" / "testdata" / "images" / "landscape_640x480.jpg").read_bytes()
        for i in range(args.ttft_requests):
            for path, times in ((language[2], remote), (single, local)) if i % 2 == 0 else \
                    ((single, local), (language[2], remote)):
                times.append(first_token_s(path.grpc_url, image))
        r_ms, l_ms = statistics.median(remote) * 1000, statistics.median(local) * 1000
        print(f"\n| path (concurrency 1, 640×480 image) | median TTFT ms |\n|---|---|\n"
              f"| single server (role all) | {l_ms:.1f} |\n| language server + encoder servers | {r_ms:.1f} |\n")
        scaling, ttft = two / one, r_ms / l_ms
        print(f"goal: encoder_scaling_2_vs_1 {scaling:.2f} (target >= 1.7) {verdict(scaling, '>=', 1.7)}")
        print(f"goal: remote_ttft_vs_single_server {ttft:.2f} (target <= 1.15) {verdict(ttft, '<=', 1.15)}")
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
