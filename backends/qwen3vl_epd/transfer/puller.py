"""Language side: verify handles and run their transfers on a pool of workers (never on the
caller's thread); each open handle is a PullSession (session.py)."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from ..buffers import MultimodalDataBuffers
from ..encoder import EncodedPrompt
from ..errors import HandleError, PeerError
from .handle import Handle, dtype_name
from .session import PullSession
from .signing import HandleKeys
from .transport import MooncakeTransport


def local_hosts() -> set[str]:
    """Names and addresses of this host: the default encoder allow-list."""
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        names.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return names


class HostAllowList:
    """Encoder hosts a handle may name: names and addresses, CIDR networks, or "*" for any."""

    def __init__(self, entries: set[str]):
        self.any = "*" in entries
        self.networks = [ipaddress.ip_network(e, strict=False) for e in entries if "/" in e]
        self.names = {e for e in entries if "/" not in e}

    def __contains__(self, host: str) -> bool:
        if self.any or host in self.names:
            return True
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return False
        return any(address in net for net in self.networks)


@dataclass
class PullStats:
    bytes_read: int = 0
    reads: int = 0  # Mooncake batch reads (a chunk is one, plus one header re-read)
    probes: int = 0  # header reads of a first contact with a peer
    seconds: float = 0.0
    entries: list[int] = field(default_factory=list)  # batch entries per read, last few
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, entries: int, seconds: float) -> None:
        with self.lock:
            self.bytes_read += nbytes
            self.reads += 1
            self.seconds += seconds
            self.entries = (self.entries + [entries])[-16:]


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
        self.good_peers: set[str] = set()  # answered before: no header probe needed
        self._spare: MooncakeTransport | None = None  # the engine first contacts are made on
        self.stalled_peers: dict[str, str] = {}  # peer → what is stuck on it, until it returns
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
        if h.peer in self.stalled_peers:
            raise PeerError(f"encoder peer {h.peer} is not answering ({self.stalled_peers[h.peer]} waits "
                            f"longer than {self.timeout_s:g} s)")
        self._mark_opened(h)
        return PullSession(self, h)

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

    def spare(self) -> MooncakeTransport:
        """The engine for first contacts: a spare, so that a handshake stuck in it stalls no read of
        an established peer (Mooncake serializes an engine's calls behind a handshake)."""
        with self._lock:
            if self._spare is None:
                self._spare = self.transport.spare()
            return self._spare

    def retire(self, spare: MooncakeTransport) -> None:
        """A first contact is stuck in this spare: later ones get a fresh engine."""
        with self._lock:
            if self._spare is spare:
                self._spare = None

    def submit(self, fn, *args) -> Future:
        future = self.pool.submit(fn, *args)
        future.add_done_callback(lambda _: self.on_arrival())
        return future
