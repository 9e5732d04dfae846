"""A busy server is not a hung one: the slow-vision checkpoint (support/checkpoints.py: one batch of
8 images takes seconds here), image requests at concurrency 16 and 64 through gRPC and the OpenAI
server of a supervised server with its default probe timeout; served, failed and restarts per
row; then how long a frozen encoder (cgroup freezer, needs root) takes to be found, three times.

Run: .venv/bin/python bench/busy.py [--requests 64] [--side 448]
"""

import argparse
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from goals import verdict  # noqa: E402

from client import RequestError  # noqa: E402
from qwen3vl_epd.liveness import Bounds, read_beat  # noqa: E402
from support.checkpoints import slow_vision_checkpoint  # noqa: E402
from support.faults import FREEZER, freeze, not_ready_after, restarts, stub_pid, thaw  # noqa: E402
from support.prompts import ask_with_image, noise_jpeg  # noqa: E402
from support.tritonserver import TritonServer  # noqa: E402


def load(server, endpoint: str, n: int, concurrency: int, side: int, seed: int) -> tuple[int, int, float]:
    """(served, failed, seconds) of n requests, each with a new image."""
    def one(i):
        try:
            return ask_with_image(server, endpoint, noise_jpeg(side, seed=seed + i), model="slow") == 4
        except (RequestError, Exception):
            return False

    t0 = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        ok = list(pool.map(one, range(n)))
    return sum(ok), n - sum(ok), time.monotonic() - t0


def frozen_detection(server, side: int, seed: int) -> float:
    """Seconds from freezing the encoder in the middle of a batch to /v2/health/ready failing."""
    threads = [threading.Thread(target=load, args=(server, "grpc", 1, 1, side, seed + i), daemon=True)
               for i in range(8)]
    for t in threads:
        t.start()
    encoder = stub_pid(server, "encoder")
    while not ((beat := read_beat(encoder)) and beat.busy):
        time.sleep(0.05)
    t0 = time.monotonic()
    try:
        freeze(encoder)
        found = not_ready_after(server, t0, 60)
    finally:
        thaw()
    for t in threads:
        t.join(120)
    server.wait_ready()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--side", type=int, default=448)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="epd-busy-"))
    checkpoint = slow_vision_checkpoint(work / "slow")
    server = TritonServer(work / "server.log", env={"EPD_CHECKPOINT": str(checkpoint)}, supervised=True)
    rows, seed = [], 0
    try:
        for endpoint in ("grpc", "openai"):
            for concurrency in (16, 64):
                before = restarts(server)
                served, failed, seconds = load(server, endpoint, args.requests, concurrency, args.side, seed)
                seed += args.requests
                rows.append((endpoint, concurrency, served, failed, restarts(server) - before, seconds))
        detections = [frozen_detection(server, args.side, 100_000 + 10 * k) for k in range(3)] if FREEZER else []
    finally:
        server.stop()
    print(f"| endpoint | concurrency | served | failed | restarts | seconds |  ({args.requests} requests, "
          f"one new {args.side}x{args.side} image each)\n|---|---|---|---|---|---|")
    for endpoint, concurrency, served, failed, restarted, seconds in rows:
        print(f"| {endpoint} | {concurrency} | {served} | {failed} | {restarted} | {seconds:.1f} |")
    if detections:
        print("frozen encoder found after " + ", ".join(f"{d:.2f} s" for d in detections))
    served_all = min(served / args.requests for _, _, served, _, _, _ in rows)
    restarted = sum(r for *_, r, _ in rows)
    print(f"goal: served_fraction_min {served_all:.3f} (target == 1) {verdict(served_all, '==', 1)}")
    print(f"goal: restarts_under_load {restarted} (target == 0) {verdict(restarted, '==', 0)}")
    if detections:
        bound = Bounds().heartbeat_s + 1.5
        print(f"goal: frozen_detection_s_max {max(detections):.2f} (target <= {bound:g}) "
              f"{verdict(max(detections), '<=', bound)}")


if __name__ == "__main__":
    main()
