"""Pull of the five buffers vs a raw Mooncake read of the same bytes vs memcpy, side by side.
The pull is the engine's path: signed handle verified, every chunk read on a transfer worker into
local blocks, release written.

Real Qwen3-VL-30B-A3B dims (H = 2048, D = 3, bf16), V visual tokens, L = V + 512.
Run: .venv/bin/python bench/transfer.py [--repeats N]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from goals import verdict  # noqa: E402

from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers  # noqa: E402
from qwen3vl_epd.transfer.puller import Puller  # noqa: E402
from qwen3vl_epd.transfer.signing import HandleKeys  # noqa: E402
from qwen3vl_epd.transfer.transport import MooncakeTransport  # noqa: E402
from support.peers import TEST_KEY, EncoderPeer  # noqa: E402

H, D, DTYPE, TEXT = 2048, 3, torch.bfloat16, 512
VS = (256, 1024, 4096)
AUX = 128


def layout_bytes(L: int, V: int) -> tuple[int, int]:
    """(our layout, seed layout with embeddings and DeepStack for all L rows)."""
    row = H * 2 * (1 + D)
    return L * 16 + V * row + AUX, L * 16 + L * row + AUX


def timed(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def read_session(puller: Puller, handle: bytes) -> None:
    """What the language engine waits for: the handle verified and every chunk in local registered
    blocks. The release write that close() starts runs on a worker; the engine does not wait for it."""
    session = puller.open(handle)
    for _ in session.chunks():
        pass
    session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    vmax, lmax = max(VS), max(VS) + TEXT
    # The visual pool is twice V max so a raw read of a whole request fits in one remote buffer.
    cfg = dict(block_tokens=64, block_visual=64, num_token_blocks=-(-lmax // 64) + 2,
               num_visual_blocks=2 * vmax // 64, num_slots=8)
    peer = EncoderPeer(hidden=H, deepstack=D, buffer_config=cfg, dtype=DTYPE)
    try:
        transport = MooncakeTransport("127.0.0.1", "tcp")
        local = MultimodalDataBuffers(H, D, DTYPE, BufferConfig(**cfg))
        puller = Puller(local, transport, HandleKeys(TEST_KEY), chunk_tokens=lmax)
        remote = peer.call("addresses")
        goals = []
        print(f"H={H} D={D} bf16, tcp on 127.0.0.1, median of {args.repeats}")
        print("| V | L | bytes (ours) | bytes (seed layout) | ours/seed | pull GB/s | raw Mooncake GB/s | "
              "memcpy GB/s | pull/raw | pull latency ms | pull() with copy-out ms |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for V in VS:
            L = V + TEXT
            ours, seed = layout_bytes(L, V)
            dst, src = local.deepstack.data_ptr(), remote["deepstack"]
            a, b = torch.empty(ours, dtype=torch.uint8), torch.ones(ours, dtype=torch.uint8)
            samples = {"pull": [], "owned": [], "raw": [], "copy": []}
            for i in range(args.repeats):  # interleaved, so noise from the shared machine hits all alike
                # Each timing follows a staging call, so every read finds both engines in the same state.
                peer.call("reclaim", 10_000)  # frees everything staged so far (the raw read's too)
                samples["pull"].append(timed(read_session, puller, peer.stage(3 * i, L, V, 2)))
                samples["owned"].append(timed(puller.pull, peer.stage(3 * i + 1, L, V, 2)))
                peer.stage(3 * i + 2, L, V, 2)
                samples["raw"].append(timed(transport.read, peer.session_id, [dst], [src], [ours], "raw"))
                samples["copy"].append(timed(a.copy_, b))
            t_pull, t_owned, t_raw, t_copy = (statistics.median(samples[k]) for k in ("pull", "owned", "raw", "copy"))
            gb = lambda t: ours / t / 1e9  # noqa: E731
            print(f"| {V} | {L} | {ours:,} | {seed:,} | {ours / seed:.2f} | {gb(t_pull):.2f} | {gb(t_raw):.2f} | "
                  f"{gb(t_copy):.2f} | {t_raw / t_pull:.2f} | {t_pull * 1e3:.1f} | {t_owned * 1e3:.1f} |")
            goals.append((f"pull_vs_raw_V{V}", t_raw / t_pull))
    finally:
        peer.close()
    for name, ratio in goals:
        print(f"goal: {name} {ratio:.2f} (target >= 0.9) {verdict(ratio, '>=', 0.9)}")


if __name__ == "__main__":
    main()
