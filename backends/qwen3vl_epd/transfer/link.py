"""PullLink: what every PullSession of one Puller shares (blocks, engines, peers, workers, bounds)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from qwen3vl_epd.transfer.buffers import MultimodalDataBuffers
from qwen3vl_epd.transfer.peers import PeerHealth
from qwen3vl_epd.transfer.transport import MooncakeTransport


@dataclass
class PullStats:
    bytes_read: int = 0
    reads: int = 0  # Mooncake batch reads (a chunk is one, plus one header re-read)
    first_contacts: int = 0  # header reads of a first contact with a peer
    seconds: float = 0.0
    entries: list[int] = field(default_factory=list)  # batch entries per read, last few
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int, entries: int, seconds: float) -> None:
        with self.lock:
            self.bytes_read += nbytes
            self.reads += 1
            self.seconds += seconds
            self.entries = (self.entries + [entries])[-16:]


@dataclass
class PullLink:
    buffers: MultimodalDataBuffers
    transport: MooncakeTransport
    peers: PeerHealth
    stats: PullStats
    submit: Callable[..., Future]  # runs a transfer on a worker; the engine is woken when it ends
    chunk_tokens: int
    timeout_s: float
    alloc_wait_s: float


