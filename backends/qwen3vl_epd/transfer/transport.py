"""The Mooncake TransferEngine of one process: registration, batch reads, one-sided writes."""

from __future__ import annotations

import math
import os
import socket

import torch

from qwen3vl_epd.errors import PeerError
from qwen3vl_epd.settings import Settings


class MooncakeTransport:
    """A Mooncake TransferEngine bound to this host; session id `host:rpc_port`."""

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "",
                 metadata_server: str = "P2PHANDSHAKE", timeout_s: float = 5.0, ports: str = ""):
        host = advertised_host(host)
        self.options = (host, protocol, device, metadata_server, timeout_s, ports)
        os.environ.update(mooncake_env(timeout_s, ports))
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        rc = self.engine.initialize(host, metadata_server, protocol, device)
        if rc != 0:
            raise RuntimeError(f"Mooncake initialize({host!r}, {metadata_server!r}, {protocol!r}) failed: {rc}")
        self.session_id = f"{host}:{self.engine.get_rpc_port()}"

    @classmethod
    def from_settings(cls, s: Settings) -> MooncakeTransport:
        return cls(s.mooncake_host, s.mooncake_protocol, s.mooncake_device, s.mooncake_metadata_server,
                   timeout_s=s.transfer_timeout_s, ports=s.mooncake_ports)

    def spare(self) -> MooncakeTransport:
        """Another engine with the same options. One engine's calls all wait while any of them is
        in a handshake; a first contact made on a spare engine stalls nothing else."""
        return MooncakeTransport(*self.options)

    def register(self, regions: dict[str, torch.Tensor]) -> None:
        """Make tensors readable and writable by peers (MultimodalDataBuffers.regions(), scratch rows)."""
        for name, t in regions.items():
            location = "cpu" if t.device.type == "cpu" else f"cuda:{t.device.index or 0}"
            if self.engine.register_memory(t.data_ptr(), t.numel() * t.element_size(), location) != 0:
                raise RuntimeError(f"Mooncake could not register buffer {name}")

    def unregister(self, regions: dict[str, torch.Tensor]) -> None:
        for t in regions.values():
            self.engine.unregister_memory(t.data_ptr())

    def read(self, peer: str, local: list[int], remote: list[int], lengths: list[int], what: str) -> None:
        """One batch read; PeerError naming the peer when it fails."""
        if lengths and self.engine.batch_transfer_sync_read(peer, local, remote, lengths) < 0:
            raise PeerError(f"encoder peer {peer} is unreachable or died while reading {what}")

    def write(self, peer: str, local: int, remote: int, length: int, what: str) -> None:
        if self.engine.transfer_sync_write(peer, local, remote, length) < 0:
            raise PeerError(f"encoder peer {peer} is unreachable or died while writing {what}")


def advertised_host(host: str) -> str:
    """The address peers reach this engine at; "auto": the source address of the default route (the
    engine's listeners bind every address; this is only what the handle tells peers)."""
    if host != "auto":
        return host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1; a UDP connect sends nothing, it only picks the route
        except OSError as e:
            raise ValueError(f"mooncake_host=auto: this host has no default route ({e}); set mooncake_host "
                             "(EPD_MOONCAKE_HOST) to the address the other hosts reach it at") from None
        return s.getsockname()[0]


def mooncake_env(timeout_s: float, ports: str = "") -> dict[str, str]:
    """Mooncake's own knobs (environment, read when an engine starts): connect and data-phase
    timeouts, and the port range of its two listeners. Its handshake reply timeout (60 s) has no
    knob; the Puller bounds that itself (puller.py)."""
    secs = str(max(1, math.ceil(timeout_s)))
    env = {"MC_HANDSHAKE_CONNECT_TIMEOUT": secs, "MC_TRANSFER_TIMEOUT": secs,
           "MC_TCP_PROGRESS_TIMEOUT_SEC": secs, "MC_TCP_STATUS_TIMEOUT_SEC": secs}
    if ports:
        low, _, high = ports.partition("-")
        if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high) < 65536):
            raise ValueError(f"mooncake_ports: {ports!r} is not MIN-MAX")
        env.update(MC_MIN_RPC_PORT=low, MC_MAX_RPC_PORT=high)
    return env
