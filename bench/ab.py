"""Two checkouts' servers side by side in one run: the same requests (bench/throughput.py's mix) at
concurrency 1, 4 and 16 against A and B in alternating rounds; B's output tok/s and TTFT as a
ratio of A's. For a restructuring that must not lose speed: A the code before, B this one.

Run: .venv/bin/python bench/ab.py --a-root OLD_CHECKOUT --a-python OLD_VENV/bin/python \
       [--a-module qwen3vl_epd.launch] [--rounds 3] [--requests 16] [--max-tokens 64]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from goals import verdict  # noqa: E402
from throughput import requests  # noqa: E402

from client import load  # noqa: E402
from support.tritonserver import NO_CACHES, free_ports, wait_ready  # noqa: E402


def start(root: Path, python: str, module: str, log: Path) -> tuple[subprocess.Popen, str]:
    http, grpc, metrics = free_ports(3)
    process = subprocess.Popen([python, "-m", module, f"--http-port={http}", f"--grpc-port={grpc}",
                                f"--metrics-port={metrics}", "--probe-interval-s=0"], cwd=root,
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, **NO_CACHES, "EPD_CHECKPOINT": str(ROOT / "checkpoints" / "tiny")})
    wait_ready(process, f"127.0.0.1:{http}", 180, log)
    return process, f"127.0.0.1:{grpc}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-root", type=Path, required=True)
    parser.add_argument("--a-python", required=True)
    parser.add_argument("--a-module", default="qwen3vl_epd.launch")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    reqs = requests(args.requests)
    work = Path(tempfile.mkdtemp(prefix="epd-ab-"))
    servers = {"A": start(args.a_root, args.a_python, args.a_module, work / "a.log"),
               "B": start(ROOT, sys.executable, "qwen3vl_epd.ops.launch", work / "b.log")}
    runs = {(side, c): [] for side in servers for c in (1, 4, 16)}
    try:
        for _, url in servers.values():
            load.run(url, reqs[:4], 2, 4)  # warm-up
        for _ in range(args.rounds):
            for c in (1, 4, 16):
                for side, (_, url) in servers.items():
                    runs[side, c].append(load.run(url, reqs, c, args.max_tokens))
    finally:
        for process, _ in servers.values():
            process.terminate()
        for process, _ in servers.values():
            process.wait(30)
    print(f"{args.requests} requests (mixed text / 1 / 2 images), {args.max_tokens} output tokens, {args.rounds} "
          "alternating rounds, medians")
    print("| concurrency | A tok/s | B tok/s | B/A tok/s | A TTFT ms | B TTFT ms | B/A TTFT |\n|---|---|---|---|---|---|---|")
    ratios = []
    for c in (1, 4, 16):
        tok = {s: statistics.median(r["tok_per_s"] for r in runs[s, c]) for s in servers}
        ttft = {s: statistics.median(r["mean_ttft_s"] for r in runs[s, c]) * 1e3 for s in servers}
        ratios.append(tok["B"] / tok["A"])
        print(f"| {c} | {tok['A']:.1f} | {tok['B']:.1f} | {tok['B'] / tok['A']:.2f} | {ttft['A']:.1f} | "
              f"{ttft['B']:.1f} | {ttft['B'] / ttft['A']:.2f} |")
    worst = min(ratios)
    print(f"goal: b_vs_a_tok_per_s_min {worst:.2f} (target >= 0.95) {verdict(worst, '>=', 0.95)}")


if __name__ == "__main__":
    main()
