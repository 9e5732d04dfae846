"""The Python backend's model processes ("stubs") of a tritonserver, found and checked in /proc."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qwen3vl_epd.procfs import stat_fields


@dataclass(frozen=True)
class Stub:
    """A Python backend model process: its shared-memory region (unique to it) and instance name."""

    region: str
    instance: str

    @property
    def model(self) -> str:
        """The model it serves: instance `language_0_0` serves `language`."""
        return self.instance.rsplit("_", 2)[0]


def is_stub(pid: int, stub: Stub) -> bool:
    """Whether process `pid` is still that model process (not a reused pid)."""
    try:
        return stub.region.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def stub_fault(stubs: dict[int, Stub]) -> str | None:
    """Why one of `stubs` cannot serve (it died, or it is stopped), else None."""
    for pid, stub in stubs.items():
        try:
            state = stat_fields(pid)[0] if is_stub(pid, stub) else "X"  # a zombie's cmdline is empty
        except (OSError, IndexError):
            state = "X"
        if state in "ZX":
            return f"model process {stub.instance} (pid {pid}) died"
        if state == "T":
            return f"model process {stub.instance} (pid {pid}) is stopped"
    return None


def children(pid: int) -> dict[int, Stub]:
    """The Python backend model processes started by process `pid`."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int(stat_fields(int(proc.name))[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 8:
            out[int(proc.name)] = Stub(argv[2].decode(), argv[8].decode())
    return out
