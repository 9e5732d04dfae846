"""Language side: verify handles and run their transfers on a pool of workers (never on the
caller's thread); each open handle is a PullSession."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from qwen3vl_epd.errors import HandleError, PeerError
from qwen3vl_epd.prompt.encoded import EncodedPrompt
from qwen3vl_epd.transfer.buffers import MultimodalDataBuffers
from qwen3vl_epd.transfer.handle import Handle, dtype_name
from qwen3vl_epd.transfer.link import PullLink, PullStats
from qwen3vl_epd.transfer.peers import HostAllowList, PeerHealth, local_hosts
from qwen3vl_epd.transfer.session import PullSession
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.transport import MooncakeTransport


class Puller:
    """Opens signed handles; each open handle is a PullSession whose Mooncake calls run on a pool of
    transfer workers, each call bounded by timeout_s."""

    def __init__(self, buffers: MultimodalDataBuffers, transport: MooncakeTransport, keys: HandleKeys,
                 chunk_tokens: int = 2048, allowed_hosts: set[str] | None = None, alloc_wait_s: float = 5.0,
                 timeout_s: float = 5.0, workers: int = 8):
        self.buffers, self.transport, self.keys = buffers, transport, keys
        self.chunk_tokens, self.alloc_wait_s, self.timeout_s = chunk_tokens, alloc_wait_s, timeout_s
        self.allowed_hosts = HostAllowList(local_hosts() if allowed_hosts is None else set(allowed_hosts))
        self.stats = PullStats()
        self.on_arrival: Callable[[], None] = lambda: None  # called on a worker when a transfer ends
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="epd-transfer")
        self.peers = PeerHealth(transport)
        self.link = PullLink(buffers, transport, self.peers, self.stats, self.submit, chunk_tokens, timeout_s,
                             alloc_wait_s)
        self._opened: dict[tuple, int] = {}  # handle identity → its expiry (ms)
        self._lock = threading.Lock()
        transport.register(buffers.regions())

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.transport.unregister(self.buffers.regions())

    def open(self, data: bytes | str) -> PullSession:
        """Verify the handle and check it against this model, the allow-list and the handles already
        opened; no Mooncake traffic happens before all of that passed."""
        h = Handle.decode(data, self.keys)
        b = self.buffers
        ours = (b.hidden_size, b.num_deepstack, dtype_name(b.dtype))
        theirs = (h.hidden_size, h.num_deepstack, h.dtype)
        if ours != theirs:
            raise HandleError(
                f"{h.name} is for a model with hidden size {theirs[0]}, {theirs[1]} DeepStack levels, "
                f"dtype {theirs[2]}; this language model has {ours[0]}, {ours[1]}, {ours[2]}")
        host = h.peer.rsplit(":", 1)[0]
        if host not in self.allowed_hosts:
            raise HandleError(f"{h.name}: encoder host {host!r} is not in the allowed encoder hosts")
        if h.peer in self.peers.stalled:
            raise PeerError(f"encoder peer {h.peer} is not answering ({self.peers.stalled[h.peer]} waits "
                            f"longer than {self.timeout_s:g} s)")
        self._mark_opened(h)
        return PullSession(self.link, h)

    def _mark_opened(self, h: Handle) -> None:
        now_ms = time.time() * 1000
        with self._lock:
            # Oldest first (one TTL for all): forget handles that expired, which decode refuses anyway.
            while self._opened and next(iter(self._opened.values())) < now_ms:
                del self._opened[next(iter(self._opened))]
            if h.identity in self._opened:
                raise HandleError(f"{h.name} was already opened on this server: a handle is used once")
            self._opened[h.identity] = h.expires_ms

    def pull(self, data: bytes | str) -> EncodedPrompt:
        """The whole prompt, read chunk by chunk, then the encoder slot released (waited for)."""
        with self.open(data) as session:
            return session.read_all()

    def submit(self, fn, *args) -> Future:
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: self.on_arrival())
        return future
