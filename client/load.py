"""Load generator: N streaming requests at a fixed concurrency; time to first token, inter-token
latency and output tokens per second.

python -m client.load --url localhost:8001 --concurrency 4 --requests 16 [--image FILE] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from client import generate


@dataclass
class Result:
    ttft: float  # seconds from send to the first text
    seconds: float
    output_tokens: int
    gaps: list[float]  # seconds between consecutive pieces


def one(url: str, prompt: str, images: list[bytes], max_tokens: int, protocol: str = "grpc") -> Result:
    start = time.perf_counter()
    times, last = [], None
    for last in generate(url, prompt, images, protocol, stream=True, max_tokens=max_tokens, ignore_eos=True):
        times.append(time.perf_counter())
    end = time.perf_counter()
    return Result(times[0] - start, end - start, last.num_output_tokens, [b - a for a, b in zip(times, times[1:])])


def run(url: str, requests: list[tuple[str, list[bytes]]], concurrency: int, max_tokens: int) -> dict:
    """All requests at `concurrency` in flight; aggregate numbers."""
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda r: one(url, r[0], r[1], max_tokens), requests))
    wall = time.perf_counter() - start
    tokens = sum(r.output_tokens for r in results)
    gaps = [g for r in results for g in r.gaps]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "tok_per_s": tokens / wall,
        "mean_ttft_s": statistics.mean(r.ttft for r in results),
        "mean_itl_s": statistics.mean(gaps) if gaps else 0.0,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--image", action="append", default=[])
    parser.add_argument("--prompt", default="Describe this image.")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    images = [Path(p).read_bytes() for p in args.image]
    print(run(args.url, [(args.prompt, images)] * args.requests, args.concurrency, args.max_tokens))


if __name__ == "__main__":
    main()
