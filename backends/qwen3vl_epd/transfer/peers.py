"""What the language side knows of its encoder peers: which hosts a handle may name, which peers
answered before, which are stalled in Mooncake's handshake, and the engine first contacts use."""

from __future__ import annotations

import ipaddress
import socket
import threading
from concurrent.futures import Future

from qwen3vl_epd.transfer.transport import MooncakeTransport


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


class PeerHealth:
    """Peers that answered (their handles need no first-contact read), peers stalled in a first
    contact (refused until it returns), and the spare engine those first contacts run on."""

    def __init__(self, transport: MooncakeTransport):
        self.transport = transport
        self.good: set[str] = set()
        self.stalled: dict[str, str] = {}  # peer → what is stuck on it, until it returns
        self._spare: MooncakeTransport | None = None
        self._lock = threading.Lock()

    def spare(self) -> MooncakeTransport:
        """The engine for first contacts: a spare, so that a handshake stuck in it stalls no read of
        an established peer (Mooncake serializes an engine's calls behind a handshake)."""
        with self._lock:
            if self._spare is None:
                self._spare = self.transport.spare()
            return self._spare

    def stall(self, peer: str, what: str, spare: MooncakeTransport, job: Future) -> None:
        """A first contact is stuck in `spare`: later ones get a fresh engine, and the peer is
        refused until the stuck call returns."""
        with self._lock:
            if self._spare is spare:
                self._spare = None
            self.stalled[peer] = what
        job.add_done_callback(lambda _: self.stalled.pop(peer, None))
