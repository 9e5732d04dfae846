"""A stalled encoder peer (accepts, never answers) beside 8 live streams: the streams' inter-token
latency with and without it, side by side, and how long the stalled request takes to fail.

Engine in-process on the tiny checkpoint, a real encoder process over Mooncake (tcp, loopback).
Run: .venv/bin/python bench/stall.py [--timeout-s 5] [--rounds 3]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from goals import verdict  # noqa: E402

from qwen3vl_epd.checkpoint.tiny import build_tiny  # noqa: E402
from qwen3vl_epd.language.engine.engine import Engine  # noqa: E402
from qwen3vl_epd.language.model import LanguageModel  # noqa: E402
from qwen3vl_epd.language.sampling import SamplingParams  # noqa: E402
from qwen3vl_epd.prompt.processor import Processor  # noqa: E402
from qwen3vl_epd.settings import DEFAULT_CHECKPOINT, LanguageSettings  # noqa: E402
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers  # noqa: E402
from qwen3vl_epd.transfer.puller import Puller  # noqa: E402
from qwen3vl_epd.transfer.signing import HandleKeys  # noqa: E402
from qwen3vl_epd.transfer.transport import MooncakeTransport  # noqa: E402
from support.peers import TEST_KEY, EncoderPeer, SilentPeer, resign  # noqa: E402
from support.prompts import Collector, prompt_inputs  # noqa: E402

STREAMS = 8


def itl_during(streams, start: float, end: float) -> float:
    """Mean gap between consecutive tokens of each stream inside [start, end]."""
    gaps = []
    for c in streams:
        times = [t for t in c.times if start <= t <= end]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return statistics.mean(gaps)


def one_round(engine, peer, window_s: float, stalled: bool) -> tuple[float, float | None]:
    """(ITL of the live streams over the window, seconds until the stalled request failed)."""
    silent = SilentPeer()  # a new one each round: a peer found stalled is refused until its probe ends
    bad_handle = resign({**json.loads(peer.call("prompt", *prompt_inputs("small_image"))), "peer": silent.address})
    streams = []
    for _ in range(STREAMS):
        c = Collector(SamplingParams(max_tokens=4000, ignore_eos=True))
        engine.submit(peer.call("prompt", *prompt_inputs("dragon")), c.request)
        streams.append(c)
    while not all(len(c.pieces) > 4 for c in streams):
        time.sleep(0.005)
    start, failed_after = time.monotonic(), None
    if stalled:
        bad = Collector(SamplingParams(max_tokens=8))
        engine.submit(bad_handle, bad.request)
        bad.done.wait(window_s + 30)
        failed_after = bad.times[-1] - start
        assert bad.last.error is not None and bad.last.error.code == "UNAVAILABLE", bad.last
    else:
        peer.call("reclaim", 10_000)  # the unused staged slot
        time.sleep(window_s)
    end = time.monotonic()
    for c in streams:
        engine.cancel(c.request)
    for c in streams:
        c.done.wait(60)
    peer.call("reclaim", 10_000)
    silent.close()
    return itl_during(streams, start, end), failed_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout-s", type=float, default=5.0, help="transfer_timeout_s of the language side")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    checkpoint = str(DEFAULT_CHECKPOINT)
    if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        build_tiny(DEFAULT_CHECKPOINT)
    torch.set_num_threads(1)  # as served: one torch thread per model process
    peer = EncoderPeer(hidden=64, deepstack=3, checkpoint=checkpoint,
                       buffer_config=dict(num_token_blocks=2048, num_visual_blocks=1024, num_slots=128))
    model, processor = LanguageModel(checkpoint), Processor(checkpoint)
    buffers = MultimodalDataBuffers(64, 3, torch.float32, BufferConfig(block_tokens=16, block_visual=16))
    puller = Puller(buffers, MooncakeTransport(), HandleKeys(TEST_KEY), timeout_s=args.timeout_s)
    engine = Engine(model, puller, processor.tokenizer, LanguageSettings(kv_cache_tokens=STREAMS * 4096 + 1024))
    try:
        clean, stalled, fails = [], [], []
        for _ in range(args.rounds):  # interleaved, so the machine's noise hits both alike
            clean.append(one_round(engine, peer, args.timeout_s, False)[0])
            itl, failed_after = one_round(engine, peer, args.timeout_s, True)
            stalled.append(itl)
            fails.append(failed_after)
    finally:
        engine.stop()
        peer.close()
    ratio = statistics.median(stalled) / statistics.median(clean)
    fail = max(fails)
    print(f"{STREAMS} live streams, tiny checkpoint, transfer_timeout_s {args.timeout_s:g}, {args.rounds} rounds")
    print("| | mean ITL ms (median of rounds) |")
    print("|---|---|")
    print(f"| without a stalled peer | {statistics.median(clean) * 1e3:.2f} |")
    print(f"| beside a stalled peer | {statistics.median(stalled) * 1e3:.2f} |")
    print(f"stalled request failed after {', '.join(f'{f:.2f}' for f in fails)} s (UNAVAILABLE)")
    print(f"goal: stalled_itl_ratio {ratio:.2f} (target <= 1.5) {verdict(ratio, '<=', 1.5)}")
    bound = args.timeout_s + 1.0
    print(f"goal: stalled_fail_s {fail:.2f} (target <= {bound:g}) {verdict(fail, '<=', bound)}")


if __name__ == "__main__":
    main()
