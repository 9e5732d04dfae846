"""/proc reading shared by the supervisor (model processes) and key signing (the server's start)."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ... (field 3 on is index 0 on)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
