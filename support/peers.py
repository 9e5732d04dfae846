"""An encoder peer in its own OS process (spawned), driven over a pipe, and synthetic prompts."""

import json
import multiprocessing as mp
import socket
import threading
import time

import torch

from qwen3vl_epd.prompt.encoded import EncodedPrompt
from qwen3vl_epd.transfer.handle import signing_payload
from qwen3vl_epd.transfer.signing import HandleKeys

TEST_KEY = "5eed" * 16  # the handle key of test encoder peers and the pullers that read from them


def resign(handle: dict | bytes, key: str = TEST_KEY) -> bytes:
    """A handle (possibly altered) signed again, as only a holder of the key could."""
    fields = json.loads(handle) if isinstance(handle, bytes) else dict(handle)
    fields["signature"] = HandleKeys(key).sign(signing_payload(fields))
    return json.dumps(fields).encode()


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
        visual_spans=spans,
    )


def _serve(conn, hidden, deepstack, buffer_config, ttl, alloc_wait_s, checkpoint, dtype, key):
    from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
    from qwen3vl_epd.transfer.stager import Stager
    from qwen3vl_epd.transfer.transport import MooncakeTransport

    transport = MooncakeTransport("127.0.0.1", "tcp")
    buffers = MultimodalDataBuffers(hidden, deepstack, dtype, BufferConfig(**buffer_config))
    stager = Stager(buffers, transport, HandleKeys(key), handle_ttl_s=ttl, alloc_wait_s=alloc_wait_s)
    processor = encoder = None
    if checkpoint:
        from qwen3vl_epd.encoder.vision import VisionEncoder
        from qwen3vl_epd.prompt.processor import Processor

        processor, encoder = Processor(checkpoint), VisionEncoder(checkpoint)
    conn.send(transport.session_id)
    while True:
        cmd, *args = conn.recv()
        try:
            if cmd == "synthetic":
                seed, length, visual, images = args
                result = stager.stage(synthetic_prompt(seed, length, visual, hidden, deepstack, images, dtype))
            elif cmd == "addresses":
                result = {k: t.data_ptr() for k, t in buffers.regions().items()}
            elif cmd == "prompt":  # text, images[, raw_prompt]
                result = stager.stage(encoder.encode([processor.process(*args)])[0])
            elif cmd == "token_rows":  # the raw fill_ids pool, to check what a released slot leaves
                result = buffers.fill_ids[:, 0].clone()
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
                 dtype=torch.float32, key=TEST_KEY):
        self.hidden, self.deepstack, self.key = hidden, deepstack, key
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_serve, args=(child, hidden, deepstack, buffer_config or {}, ttl, alloc_wait_s, checkpoint, dtype, key),
            daemon=True)
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


class SilentPeer:
    """A TCP listener on 127.0.0.1 that accepts connections and never answers: a stalled encoder.
    `connections` counts what reached it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections, self._held = 0, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self):
        self.sock.close()
        for conn in self._held:
            conn.close()
