"""An encoder peer in its own OS process (spawned), driven over a pipe, and synthetic prompts."""

import multiprocessing as mp
import time

import torch

from qwen3vl_epd.encoder import EncodedPrompt


def synthetic_prompt(seed: int, length: int, visual: int, hidden: int, deepstack: int, images: int = 1,
                     dtype: torch.dtype = torch.float32) -> EncodedPrompt:
    """Deterministic random content; `visual` rows split over `images` spans spread through the prompt."""
    g = torch.Generator().manual_seed(seed)
    spans, per, gap = [], [], (length - visual) // (images + 1) if images else 0
    if visual:
        per = [visual // images + (i < visual % images) for i in range(images)]
        pos = gap
        for n in per:
            spans.append((pos, n))
            pos += n + gap
    return EncodedPrompt(
        fill_ids=torch.randint(0, 151000, (length,), generator=g, dtype=torch.int32),
        mrope_positions=torch.randint(0, 1 << 20, (length, 3), generator=g, dtype=torch.int32),
        embeddings=torch.randn(visual, hidden, generator=g).to(dtype),
        deepstack=torch.randn(visual, deepstack * hidden, generator=g).to(dtype),
        mrope_delta=int(torch.randint(-500, 0, (1,), generator=g)),
        image_spans=spans,
    )


def _serve(conn, hidden, deepstack, buffer_config, ttl, alloc_wait_s, checkpoint, dtype):
    from qwen3vl_epd.buffers import BufferConfig, MultimodalDataBuffers
    from qwen3vl_epd.transfer import MooncakeTransport, Stager

    transport = MooncakeTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(hidden, deepstack, dtype, BufferConfig(**buffer_config))
    stager = Stager(buffers, transport, handle_ttl_s=ttl, alloc_wait_s=alloc_wait_s)
    processor = encoder = None
    if checkpoint:
        from qwen3vl_epd.encoder import VisionEncoder
        from qwen3vl_epd.processor import Processor

        processor, encoder = Processor(checkpoint), VisionEncoder(checkpoint)
    conn.send(transport.session_id)
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "synthetic":
                seed, length, visual, images = args
                result = stager.stage(synthetic_prompt(seed, length, visual, hidden, deepstack, images, dtype)).encode()
            elif cmd == "addresses":
                result = {k: t.data_ptr() for k, t in buffers.regions().items()}
            elif cmd == "prompt":
                text, images = args
                result = stager.stage(encoder.encode([processor.process(text, images)])[0]).encode()
            elif cmd == "in_use":
                result = buffers.in_use()
            elif cmd == "reclaim":
                result = stager.reclaim(time.monotonic() + args[0])
            elif cmd == "exit":
                conn.send(None)
                return
            else:
                raise ValueError(cmd)
            conn.send(result)
        except Exception as e:  # report to the test, keep serving
            conn.send(e)


class EncoderPeer:
    """Handle on the spawned encoder process."""

    def __init__(self, hidden=64, deepstack=3, buffer_config=None, ttl=120.0, alloc_wait_s=2.0, checkpoint=None,
                 dtype=torch.float32):
        self.hidden, self.deepstack = hidden, deepstack
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, hidden, deepstack, buffer_config or {}, ttl, alloc_wait_s, checkpoint, dtype), daemon=True)
        self.process.start()
        if not self.conn.poll(120):
            raise RuntimeError("encoder peer did not start")
        self.session_id = self.conn.recv()

    def call(self, *cmd):
        self.conn.send(cmd)
        result = self.conn.recv()
        if isinstance(result, Exception):
            raise result
        return result

    def stage(self, seed, length, visual, images=1) -> bytes:
        return self.call("synthetic", seed, length, visual, images)

    def in_use(self) -> dict:
        return self.call("in_use")

    def close(self):
        if self.process.is_alive():
            try:
                self.call("exit")
            except (EOFError, OSError):
                pass
        self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
