"""Tokens wasted by cancelled requests: 20 gRPC streams through the client door (`language`),
each cancelled after its first token; waste = tokens the engine generated for them minus the
tokens their clients had received when they cancelled. Also through `ensemble`, whose
tritonserver 2.51 scheduler cannot pass a cancellation on into a running step.

Run: .venv/bin/python bench/cancel.py [--streams 20] [--max-tokens 512]
"""

import argparse
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
from tritonserver import TritonServer  # noqa: E402

import tritonclient.grpc as grpcclient  # noqa: E402
from client import _grpc_inputs  # noqa: E402
from goals import verdict  # noqa: E402


def storm(server: TritonServer, model: str, streams: int, max_tokens: int) -> float:
    """Mean wasted tokens per cancelled stream."""
    produced = lambda: server.metric_values("epd_output_tokens_total")[""]  # noqa: E731
    before = produced()
    received, clients = [], []
    barrier = threading.Barrier(streams + 1)

    def one(i):
        results = queue.Queue()
        client = grpcclient.InferenceServerClient(server.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        inputs = _grpc_inputs(f"Tell me story number {i}.", [], True, {"max_tokens": max_tokens, "ignore_eos": True})
        client.async_stream_infer(model, inputs)
        result, error = results.get(timeout=120)
        assert error is None, error
        barrier.wait()
        got = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        while not results.empty():  # what arrived by the time of the cancel
            result, error = results.get()
            if error is None:
                got = int(result.as_numpy("num_output_tokens").reshape(-1)[0])
        client.stop_stream(cancel_requests=True)
        received.append(got)
        clients.append(client)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 60
    while True:  # until the engine has stopped producing for them
        last = produced()
        time.sleep(0.5)
        if produced() == last or time.monotonic() > deadline:
            break
    for c in clients:
        c.close()
    return (produced() - before - sum(received)) / streams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()
    server = TritonServer(Path(tempfile.mkdtemp(prefix="epd-cancel-")) / "server.log")
    try:
        door = storm(server, "language", args.streams, args.max_tokens)
        ensemble = storm(server, "ensemble", args.streams, args.max_tokens)
        print(f"| door | wasted tokens per cancelled stream ({args.streams} streams, max_tokens {args.max_tokens}) |\n"
              f"|---|---|\n| language | {door:.1f} |\n| ensemble | {ensemble:.1f} |")
        print(f"goal: cancel_waste_tokens_language {door:.2f} (target <= 2) {verdict(door, '<=', 2)}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
