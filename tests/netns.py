"""Hosts on one machine: network namespaces on a bridge, on a private range used only inside them.
The test creates and removes everything; traffic goes only to addresses inside these namespaces."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# RFC 2544's benchmarking range: never routed; these namespaces are its only users here.
SUBNET = "198.18.77"


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(("netns", "exec", netns, "ip") if netns else ()), *args]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no iproute2, not permitted), or None."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2 (scripts/setup installs it)"
    probe = f"epd-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    if f"{SUBNET}." in routes:
        return f"{SUBNET}.0/24 is already routed on this machine; the tests will not share it"
    return None


class Hosts:
    """Namespaces `names` on bridge SUBNET.1 (the test process's side); host i is SUBNET.(i+2)."""

    def __init__(self, names: list[str]):
        tag = os.getpid() % 100000
        self.bridge = f"epdbr{tag}"
        self.namespaces = {name: f"epd{tag}-{name}" for name in names}
        self.address = {name: f"{SUBNET}.{i + 2}" for i, name in enumerate(names)}
        self._veths = []
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{SUBNET}.1/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(names):
                self._add(name, i)
        except Exception:
            self.remove()
            raise

    def _add(self, name: str, i: int) -> None:
        ns, outside = self.namespaces[name], f"epdv{os.getpid() % 100000}x{i}"
        _ip("netns", "add", ns)
        _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
        self._veths.append(outside)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("addr", "add", f"{self.address[name]}/24", "dev", "eth0", netns=ns)
        _ip("link", "set", "lo", "up", netns=ns)
        _ip("link", "set", "eth0", "up", netns=ns)
        # An on-link default route (no gateway): mooncake_host=auto finds eth0's address, and a
        # packet for any other address goes nowhere.
        _ip("route", "add", "default", "dev", "eth0", netns=ns)

    def rx_bytes(self, name: str) -> int:
        """Bytes the host `name` received on its veth link (counted on the bridge side)."""
        i = list(self.namespaces).index(name)
        return int(Path(f"/sys/class/net/{self._veths[i]}/statistics/tx_bytes").read_text())

    def remove(self) -> None:
        for ns in self.namespaces.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth pair along
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
