"""Supervisor: runs tritonserver, probes it with real tiny requests, and restarts it when it crashed
or a model stopped serving. A dead or hung model process leaves tritonserver 2.51 answering
"ready" while its requests hang forever; a restart drops their connections, so every client gets
an error at once, and the server is back after one model load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from qwen3vl_epd.liveness import Bounds, beat_path, read_beat
from qwen3vl_epd.ops.console import Console
from qwen3vl_epd.ops.probes import Probe
from qwen3vl_epd.ops.stubs import Stub, children, is_stub, stub_fault

STOP_TIMEOUT_S = 25.0  # a stop (SIGTERM/SIGINT) ends within this, whatever state the server is in
WATCH_S = 0.1  # how often the model processes are checked for being dead or stopped


class Supervisor:
    """run(): start tritonserver and watch it: when it exits, a model process dies, stops or is hung
    by the liveness rule (liveness.py: its heartbeat, its progress while it holds work), or
    `failures` probes of an idle model fail in a row, kill it with its model processes and start it
    again (at once after it served; 1 s doubling to 30 s while starts keep failing). A busy model is
    never probed: its progress is the evidence. SIGTERM/SIGINT stop it within STOP_TIMEOUT_S."""

    def __init__(self, argv: list[str], env: dict, probe: Probe, interval_s: float = 1.0, failures: int = 2,
                 startup_timeout_s: float = 600.0, ready_message: str = "ready", console: Console | None = None,
                 log=sys.stdout, companions: list[list[str]] = (), bounds: Bounds = Bounds()):
        self.argv, self.env, self.probe, self.console = argv, env, probe, console or Console()
        self.bounds = bounds
        # Processes that serve beside tritonserver (the OpenAI server): started once, restarted when they exit.
        self.companions = {tuple(c): None for c in companions}
        self.interval_s, self.failures, self.startup_timeout_s, self.log = interval_s, failures, startup_timeout_s, log
        self.ready_message = ready_message
        self.process: subprocess.Popen | None = None
        self.stopping = self.served = False
        self.restarts = 0
        self.stubs: dict[int, Stub] = {}  # the model processes last seen (they outlive a crashed tritonserver)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        backoff = 1.0
        self._keep_companions()
        while not self.stopping:
            reason = self._serve_once()
            if self.stopping:
                break
            self.restarts += 1
            # A fault after serving restarts at once; a server that never got to serve backs off.
            wait = 0.0 if self.served else backoff
            backoff = 1.0 if self.served else min(backoff * 2, 30.0)
            self._say(f"restarting tritonserver ({reason}) in {wait:g} s; restart {self.restarts}")
            self._sleep(wait)
        return self._stop()

    def _serve_once(self) -> str:
        """Start, wait until ready, then probe until something fails; why it has to restart."""
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, errors="replace")
        self.stubs = {}
        threading.Thread(target=self._relay, args=(self.process.stdout,), daemon=True).start()
        self.served = False
        deadline = time.monotonic() + self.startup_timeout_s
        while not self.stopping and (why := self.probe.failure()) is not None:
            if self.process.poll() is not None:
                return f"it exited with {self.process.returncode} while starting"
            if time.monotonic() > deadline:
                self._kill()
                return f"not serving {self.startup_timeout_s:g} s after start"
            if "is not healthy" in why:  # a model process died before the first probe passed
                self._kill()
                return f"a model process died while starting ({why})"
            self._sleep(0.5)
        self.served = not self.stopping
        if self.served:
            print(self.ready_message, file=self.log, flush=True)
        self._find_stubs()
        failed = 0
        while not self.stopping:
            if not failed and (why := self._watch(self.interval_s)):  # a failed probe is repeated at once
                return why
            # Models loaded since through the repository API are watched too; one unloaded is a fault.
            self._find_stubs()
            self._keep_companions()
            busy = self._busy()  # read once: a beat file per model process
            why = self.probe.failure([m for m in self.probe.models if m not in busy])
            if why and why.split(":", 1)[0] in self._busy():
                why = None  # it took work while the probe waited behind it: busy, and its progress is watched
            failed = failed + 1 if why else 0
            if failed >= self.failures:
                self._kill()
                return f"probe failed {failed} times: {why}"
        return "stopping"

    def _watch(self, seconds: float) -> str | None:
        """Between probes: a crash or a dead or stopped model process is acted on within WATCH_S,
        before the ready endpoint has answered 200 for long. Why it killed the server, or None."""
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            self._sleep(WATCH_S)
            if self.process.poll() is not None:
                self._kill(self.stubs)  # its model processes, orphaned now, may be stuck at exit
                return f"it exited with {self.process.returncode}"
            if why := stub_fault(self.stubs) or self._hung():
                self._kill()
                return why
        return None

    def _find_stubs(self) -> None:
        """The model processes, new ones too; a new one's beat file is a stale one of a reused pid
        until it writes its own (within a quarter second of its heartbeat's start)."""
        for pid, stub in children(self.process.pid).items():
            if pid not in self.stubs:
                beat_path(pid).unlink(missing_ok=True)
                self.stubs[pid] = stub

    def _hung(self) -> str | None:
        for pid, stub in self.stubs.items():
            if why := self.bounds.hung(read_beat(pid)):
                return f"model process {stub.instance} (pid {pid}) is hung: {why}"
        return None

    def _busy(self) -> set[str]:
        """The models whose processes hold work now, or requests waiting on another model (their
        heartbeat says so)."""
        return {stub.model for pid, stub in self.stubs.items()
                if (beat := read_beat(pid)) and (beat.busy or beat.waiting)}

    def _keep_companions(self) -> None:
        for argv, process in self.companions.items():
            if process is not None and process.poll() is None:
                continue
            if process is not None:
                self._say(f"restarting {argv[2]} (it exited with {process.returncode})")
            self.companions[argv] = subprocess.Popen(argv, env=self.env)

    def _stop_companions(self) -> None:
        running = [p for p in self.companions.values() if p is not None and p.poll() is None]
        for p in running:
            p.send_signal(signal.SIGTERM)
        for p in running:
            try:
                p.wait(6)  # the OpenAI server's own graceful stop takes 5 s at most
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True
        if self.process is not None and self.process.poll() is None and signum != signal.SIGINT:
            self.process.send_signal(signum)  # SIGINT reached the whole process group already

    def _stop(self) -> int:
        self._stop_companions()  # first: they answer their clients "unavailable" rather than hang
        if self.process is None:
            return 0
        stubs = children(self.process.pid) or self.stubs
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._say(f"tritonserver did not stop within {STOP_TIMEOUT_S:g} s; killing it")
            code = 0
        # A model process can outlive tritonserver (stuck at exit): none is left behind.
        self._kill(stubs)
        return code

    def _kill(self, stubs: dict[int, Stub] | None = None) -> None:
        """SIGKILL tritonserver and its model processes, and remove their shared-memory regions."""
        stubs = children(self.process.pid) if stubs is None else stubs
        for pid, stub in stubs.items():
            if is_stub(pid, stub):  # still that stub, not a reused pid
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pid, stub in {**self.stubs, **stubs}.items():  # those that died before this too
            Path("/dev/shm", stub.region).unlink(missing_ok=True)
            beat_path(pid).unlink(missing_ok=True)

    def _relay(self, output) -> None:
        """tritonserver's output, through the console filter."""
        for line in output:
            shown = self.console.filter(line)
            if shown is not None:
                print(shown, file=self.log, flush=True)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < end:
            time.sleep(min(0.1, end - time.monotonic()))

    def _say(self, message: str) -> None:
        print(f"supervisor: {message}", file=self.log, flush=True)
