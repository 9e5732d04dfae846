"""Handle signing keys: HMAC-SHA256 under the current key; verification also accepts a previous
key until the end of its grace period, so keys rotate without failing handles in flight.

Key text: the current key in hex, then optionally previous keys as `HEX@UNIX_TIME` (accepted
until then), separated by commas or newlines. Sources, first found: the `handle_key_file`
setting, EPD_HANDLE_KEY_FILE, EPD_HANDLE_KEY; else one key per tritonserver, generated at start
and shared by its model processes through a private file (see `server_key`). A key file is
re-read when it changes."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
import threading
import time
from pathlib import Path

from qwen3vl_epd.procfs import stat_fields

ENV_KEY, ENV_KEY_FILE = "EPD_HANDLE_KEY", "EPD_HANDLE_KEY_FILE"
MIN_KEY_BYTES = 16


def new_key() -> str:
    return secrets.token_hex(32)


def parse_keys(text: str, where: str) -> tuple[bytes, list[tuple[bytes, float]]]:
    """(current key, [(previous key, accepted until)]); ValueError naming `where` when malformed."""
    entries = [e.strip() for e in text.replace("\n", ",").split(",") if e.strip()]
    if not entries:
        raise ValueError(f"{where}: no handle key")
    keys = []
    for i, entry in enumerate(entries):
        hex_key, _, until = entry.partition("@")
        try:
            key = bytes.fromhex(hex_key)
            deadline = float(until) if until else float("inf")
        except ValueError:
            raise ValueError(f"{where}: entry {i} is not HEX or HEX@UNIX_TIME") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"{where}: entry {i} is {len(key)} bytes, under the minimum of {MIN_KEY_BYTES}")
        if i == 0 and until:
            raise ValueError(f"{where}: the first (current) key has no end of grace")
        keys.append((key, deadline))
    return keys[0][0], keys[1:]


class HandleKeys:
    """Signs with the current key; verifies with it or a previous key still in its grace period."""

    def __init__(self, text: str, where: str = "handle key", path: Path | None = None):
        self.where, self.path = where, path
        self.current, self.previous = parse_keys(text, where)
        self._mtime = path.stat().st_mtime_ns if path else None
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> HandleKeys:
        p = Path(path)
        return cls(p.read_text(), f"handle key file {p}", p)

    @classmethod
    def load(cls, key_file: str = "", env: dict | None = None) -> HandleKeys:
        """From the setting, the environment, or this server's generated key, in that order."""
        env = os.environ if env is None else env
        if key_file or env.get(ENV_KEY_FILE):
            return cls.from_file(key_file or env[ENV_KEY_FILE])
        if env.get(ENV_KEY):
            return cls(env[ENV_KEY], ENV_KEY)
        return cls.from_file(server_key())

    def sign(self, message: bytes) -> str:
        self._refresh()
        return hmac.new(self.current, message, hashlib.sha256).hexdigest()

    def verify(self, message: bytes, signature: str) -> bool:
        self._refresh()
        now = time.time()
        keys = [self.current] + [k for k, until in self.previous if now <= until]
        return any(hmac.compare_digest(hmac.new(k, message, hashlib.sha256).hexdigest(), signature) for k in keys)

    def _refresh(self) -> None:
        """Re-read a key file that changed (checked at most once a second)."""
        if self.path is None or time.monotonic() - self._checked < 1.0:
            return
        with self._lock:
            self._checked = time.monotonic()
            mtime = self.path.stat().st_mtime_ns
            if mtime != self._mtime:
                self.current, self.previous = parse_keys(self.path.read_text(), self.where)
                self._mtime = mtime


def server_key() -> Path:
    """The generated key of the tritonserver this model process belongs to: a 0600 file named after
    the parent process (pid and start time), created once by whichever model process comes first."""
    ppid = os.getppid()
    try:
        start = stat_fields(ppid)[19]
    except OSError:
        start = "0"
    path = Path(tempfile.gettempdir()) / f"epd-handle-key-{os.getuid()}-{ppid}-{start}"
    if path.exists():
        st = path.lstat()
        if st.st_uid != os.getuid() or st.st_mode & 0o077 or not path.is_file() or path.is_symlink():
            raise PermissionError(f"{path} is not a private key file of this user; set {ENV_KEY} or {ENV_KEY_FILE}")
    else:
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key() + "\n")
        try:
            os.link(tmp, path)  # atomic: the file appears whole, and only the first creator's stays
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path
