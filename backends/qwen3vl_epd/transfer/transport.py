"""The Mooncake TransferEngine of one process: registration, batch reads, one-sided writes."""

from __future__ import annotations

from ..buffers import MultimodalDataBuffers
from ..errors import PeerError


class MooncakeTransport:
    """A Mooncake TransferEngine bound to this host; session id `host:rpc_port`."""

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "",
                 metadata_server: str = "P2PHANDSHAKE"):
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        rc = self.engine.initialize(host, metadata_server, protocol, device)
        if rc != 0:
            raise RuntimeError(f"Mooncake initialize({host!r}, {metadata_server!r}, {protocol!r}) failed: {rc}")
        self.session_id = f"{host}:{self.engine.get_rpc_port()}"

    def register(self, buffers: MultimodalDataBuffers) -> None:
        location = "cpu" if buffers.device.type == "cpu" else f"cuda:{buffers.device.index or 0}"
        for name, t in buffers.regions().items():
            if self.engine.register_memory(t.data_ptr(), t.numel() * t.element_size(), location) != 0:
                raise RuntimeError(f"Mooncake could not register buffer {name}")

    def unregister(self, buffers: MultimodalDataBuffers) -> None:
        for t in buffers.regions().values():
            self.engine.unregister_memory(t.data_ptr())

    def read(self, peer: str, local: list[int], remote: list[int], lengths: list[int], what: str) -> None:
        """One batch read; PeerError naming the peer when it fails."""
        if lengths and self.engine.batch_transfer_sync_read(peer, local, remote, lengths) < 0:
            raise PeerError(f"encoder peer {peer} is unreachable or died while reading {what}")

    def write(self, peer: str, local: int, remote: int, length: int, what: str) -> None:
        if self.engine.transfer_sync_write(peer, local, remote, length) < 0:
            raise PeerError(f"encoder peer {peer} is unreachable or died while writing {what}")
