"""Tokens wasted by cancelled requests: 20 gRPC streams through the client entry (`language`),
each cancelled after its first token; waste = tokens the engine generated for them minus the
tokens their clients had received when they cancelled. Also through `ensemble`, whose
tritonserver 2.51 scheduler cannot pass a cancellation on into a running step. And through the
OpenAI server (HTTP streams closed after their first content chunk), where the waste counted is what
the engine generated after the last connection closed.

Run: .venv/bin/python bench/cancel.py [--streams 20] [--max-tokens 512]
"""

import argparse
import http.client
import json
import queue
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tritonclient.grpc as grpcclient  # noqa: E402
from goals import verdict  # noqa: E402

from qwen3vl_epd.wire import request_inputs  # noqa: E402
from support.tritonserver import TritonServer, start_openai_server  # noqa: E402


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
        inputs = request_inputs(f"Tell me story number {i}.", [], True, {"max_tokens": max_tokens, "ignore_eos": True})
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

    run_all(one, streams, barrier)
    settle(produced)
    for c in clients:
        c.close()
    return (produced() - before - sum(received)) / streams


def run_all(one, streams: int, barrier: threading.Barrier) -> None:
    """one(i) for each stream on its own thread; returns when all reached the barrier and ended."""
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()


def settle(produced) -> None:
    """Until the engine has stopped producing (60 s at most)."""
    deadline = time.monotonic() + 60
    while True:
        last = produced()
        time.sleep(0.5)
        if produced() == last or time.monotonic() > deadline:
            return


def openai_storm(server: TritonServer, streams: int, max_tokens: int) -> float:
    """Mean tokens generated per stream after its HTTP connection to the OpenAI server closed."""
    openai, base = start_openai_server(server.grpc_url)
    port = urllib.parse.urlsplit(base).port
    produced = lambda: server.metric_values("epd_output_tokens_total")[""]  # noqa: E731
    try:
        barrier = threading.Barrier(streams + 1)
        conns = []

        def one(i):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            body = {"messages": [{"role": "user", "content": f"Tell me story number {i}."}], "stream": True,
                    "max_tokens": max_tokens, "ignore_eos": True}
            conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            reply = conn.getresponse()
            while b'"content": "' not in reply.readline():
                pass
            conns.append(conn)
            barrier.wait()

        run_all(one, streams, barrier)
        for c in conns:
            c.sock.shutdown(socket.SHUT_RDWR)  # the reply's file still refers to the socket: close() alone waits
            c.sock.close()
        at_close = produced()
        settle(produced)
        return (produced() - at_close) / streams
    finally:
        openai.terminate()
        openai.wait(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=512)
    args = ap.parse_args()
    server = TritonServer(Path(tempfile.mkdtemp(prefix="epd-cancel-")) / "server.log")
    try:
        language = storm(server, "language", args.streams, args.max_tokens)
        ensemble = storm(server, "ensemble", args.streams, args.max_tokens)
        oai = openai_storm(server, args.streams, args.max_tokens)
        print(f"| endpoint | wasted tokens per cancelled stream ({args.streams} streams, max_tokens {args.max_tokens}) |\n"
              f"|---|---|\n| language | {language:.1f} |\n| ensemble | {ensemble:.1f} |\n"
              f"| OpenAI server (after the close) | {oai:.1f} |")
        print(f"goal: cancel_waste_tokens_language {language:.2f} (target <= 2) {verdict(language, '<=', 2)}")
        print(f"goal: cancel_waste_tokens_openai {oai:.2f} (target <= 2) {verdict(oai, '<=', 2)}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
