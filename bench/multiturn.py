"""Multi-turn conversations with caching on and off, side by side in one run: two servers (the
encoder and prefix caches on; both off with EPD_ENCODER_CACHE_MB=0 EPD_PREFIX_CACHE=false), the
same workload on each, alternating.

Workload: conversations of 4 turns, one 1024×1024 image in the first turn and a short question
per turn, each turn resending the whole history (the model's own answers as assistant turns),
16 conversations interleaved at concurrency 4, through `ensemble` over gRPC streaming.

Run: .venv/bin/python bench/multiturn.py [--conversations 16] [--concurrency 4] [--rounds 1]
"""

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from goals import verdict  # noqa: E402

from client import data_url, generate  # noqa: E402
from support.prompts import noise_jpeg  # noqa: E402
from support.tritonserver import NO_CACHES, TritonServer  # noqa: E402

QUESTIONS = ["Describe this image.", "What colors stand out?", "Is there any text in it?", "Summarize in one line."]
MAX_TOKENS = 16


def conversation(server: TritonServer, image: bytes) -> tuple[list[float], int]:
    """Four turns; (time to first token of each turn, output tokens)."""
    url = data_url(image)
    messages, ttfts, tokens = [], [], 0
    for turn, question in enumerate(QUESTIONS):
        content = [{"type": "image_url", "image_url": {"url": url}}] if turn == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": question}]})
        start, first, parts = time.perf_counter(), None, []
        for r in generate(server.grpc_url, None, model="ensemble", stream=True, messages=messages,
                          max_tokens=MAX_TOKENS):
            first = first or time.perf_counter()
            parts.append(r.text)
            tokens = tokens + r.num_output_tokens if r.finish_reason else tokens
        ttfts.append(first - start)
        messages.append({"role": "assistant", "content": "".join(parts)})
    return ttfts, tokens


def counters(server: TritonServer) -> dict[str, float]:
    time.sleep(0.3)  # metrics are reported every 0.1 s
    names = ["epd_vision_images_total", "epd_transfer_bytes_total", "epd_encoder_cache_hits_total",
             "epd_encoder_cache_misses_total", "epd_prefix_cache_hit_tokens_total",
             "epd_prefix_cache_queried_tokens_total"]
    return {n: sum(server.metric_values(n).values()) for n in names}


def workload(server: TritonServer, images: list[bytes], concurrency: int) -> dict:
    before = counters(server)
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        runs = list(pool.map(lambda image: conversation(server, image), images))
    wall = time.perf_counter() - start
    grew = {k: v - before[k] for k, v in counters(server).items()}
    n = len(images)
    looked = grew["epd_encoder_cache_hits_total"] + grew["epd_encoder_cache_misses_total"]
    return {
        "ttft_later": statistics.mean(t for ttfts, _ in runs for t in ttfts[1:]),
        "ttft_first": statistics.mean(ttfts[0] for ttfts, _ in runs),
        "forwards": grew["epd_vision_images_total"] / n,
        "pulled_mb": grew["epd_transfer_bytes_total"] / n / 2**20,
        "tok_s": sum(tokens for _, tokens in runs) / wall,
        "hit_rate": grew["epd_encoder_cache_hits_total"] / looked if looked else 0.0,
        "prefix_rate": (grew["epd_prefix_cache_hit_tokens_total"] / grew["epd_prefix_cache_queried_tokens_total"]
                        if grew["epd_prefix_cache_queried_tokens_total"] else 0.0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=1, help="workload passes per server, alternating")
    args = ap.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="epd-multiturn-"))
    servers = {"on": TritonServer(logs / "on.log", wait=False),
               "off": TritonServer(logs / "off.log", NO_CACHES, wait=False)}
    results: dict[str, list[dict]] = {"on": [], "off": []}
    try:
        for s in servers.values():
            s.wait_ready()
        for r in range(args.rounds):
            images = [noise_jpeg(1024, seed=1000 * r + i) for i in range(args.conversations)]  # new images each round
            for name in ("off", "on"):
                results[name].append(workload(servers[name], images, args.concurrency))
    finally:
        for s in servers.values():
            s.stop()
    mean = {name: {k: statistics.mean(run[k] for run in runs) for k in runs[0]} for name, runs in results.items()}
    print(f"{args.conversations} conversations × 4 turns, one 1024×1024 image in turn 1, concurrency "
          f"{args.concurrency}, max_tokens {MAX_TOKENS}, through ensemble (gRPC streaming)\n")
    print("| caching | mean TTFT turn 1 ms | mean TTFT turns 2–4 ms | vision forwards / conversation | "
          "MiB pulled / conversation | output tok/s | encoder cache hit rate | prefix cache hit rate (tokens) |\n"
          "|---|---|---|---|---|---|---|---|")
    for name in ("off", "on"):
        m = mean[name]
        print(f"| {name} | {m['ttft_first'] * 1e3:.0f} | {m['ttft_later'] * 1e3:.0f} | {m['forwards']:.2f} | "
              f"{m['pulled_mb']:.1f} | {m['tok_s']:.1f} | {m['hit_rate']:.2f} | {m['prefix_rate']:.2f} |")
    ratio = mean["on"]["ttft_later"] / mean["off"]["ttft_later"]
    forwards = mean["on"]["forwards"]
    print(f"goal: multiturn_ttft_turns_2_4_vs_off {ratio:.2f} (target <= 0.3) {verdict(ratio, '<=', 0.3)}")
    print(f"goal: vision_forwards_per_conversation {forwards:.2f} (target <= 1) {verdict(forwards, '<=', 1)}")


if __name__ == "__main__":
    main()
