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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .console import Console
from .triton_io import PROBE_ID_PREFIX

STOP_TIMEOUT_S = 25.0  # a stop (SIGTERM/SIGINT) ends within this, whatever state the server is in
WATCH_S = 0.1  # how often the model processes are checked for being dead or stopped


@dataclass(frozen=True)
class Stub:
    """A Python backend model process: its shared-memory region (unique to it) and instance name."""

    region: str
    instance: str


@dataclass
class Probe:
    """One real request per model the role serves, through the server's gRPC port."""

    url: str
    models: list[str]
    timeout_s: float = 3.0

    def failure(self) -> str | None:
        """None when every model answered as expected, else what went wrong."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        try:
            for model in self.models:
                try:
                    if model == "language":
                        _language_probe(client, self.timeout_s)
                    else:  # the encoder runs its request and rejects the image: nothing is staged
                        _encoder_probe(client, self.timeout_s)
                except InferenceServerException as e:
                    return f"{model}: {e.message()}"
            return None
        finally:
            client.close()


def _bytes(name: str, value: bytes):
    import tritonclient.grpc as grpcclient

    t = grpcclient.InferInput(name, [1, 1], "BYTES")
    return t.set_data_from_numpy(np.array([[value]], dtype=np.object_))


def _encoder_probe(client, timeout_s: float) -> None:
    from tritonclient.utils import InferenceServerException

    try:
        client.infer("encoder", [_bytes("text_input", b"probe"), _bytes("image", b"not an image")],
                     request_id=PROBE_ID_PREFIX + "encoder", client_timeout=timeout_s, priority=1)
    except InferenceServerException as e:
        if "cannot decode image" in (e.message() or ""):
            return
        raise


def _language_probe(client, timeout_s: float) -> None:
    """One token of a text-only prompt: the model process, its engine thread and sampling."""
    import queue

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error), stream_timeout=timeout_s)
    tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    tokens.set_data_from_numpy(np.array([[1]], dtype=np.int32))
    try:
        client.async_stream_infer("language", [_bytes("text_input", b"probe"), tokens], request_id=PROBE_ID_PREFIX + "language")
        try:
            error = results.get(timeout=timeout_s)
        except queue.Empty:
            raise InferenceServerException(f"no answer within {timeout_s:g} s") from None
        if error is not None:
            raise error
    finally:
        client.stop_stream(cancel_requests=True)


class Supervisor:
    """run(): start tritonserver; every `interval_s` probe it, watching its processes in between;
    when it exits, a model process dies or stops, or `failures` probes fail in a row (a hang: within
    interval_s + failures × the probe's timeout), kill it with its model processes and start it
    again (at once after it served; 1 s doubling to 30 s while starts keep failing). SIGTERM/SIGINT
    stop it within STOP_TIMEOUT_S."""

    def __init__(self, argv: list[str], env: dict, probe: Probe, interval_s: float = 1.0, failures: int = 2,
                 startup_timeout_s: float = 600.0, ready_message: str = "ready", console: Console | None = None,
                 log=sys.stdout, companions: list[list[str]] = ()):
        self.argv, self.env, self.probe, self.console = argv, env, probe, console or Console()
        # Processes that serve beside tritonserver (the OpenAI door): started once, restarted when they exit.
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
        self.stubs = children(self.process.pid)
        failed = 0
        while not self.stopping:
            if not failed and (why := self._watch(self.interval_s)):  # a failed probe is repeated at once
                return why
            # Models loaded since through the repository API are watched too; one unloaded is a fault.
            self.stubs.update(children(self.process.pid))
            self._keep_companions()
            why = self.probe.failure()
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
            if why := stub_fault(self.stubs):
                self._kill()
                return why
        return None

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
                p.wait(6)  # the door's own graceful stop takes 5 s at most
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
        for stub in stubs.values():
            Path("/dev/shm", stub.region).unlink(missing_ok=True)

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
            state = _stat(pid)[0] if is_stub(pid, stub) else "X"  # a zombie's cmdline is empty
        except (OSError, IndexError):
            state = "X"
        if state in "ZX":
            return f"model process {stub.instance} (pid {pid}) died"
        if state == "T":
            return f"model process {stub.instance} (pid {pid}) is stopped"
    return None


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: state, ppid, ..."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> dict[int, Stub]:
    """The Python backend model processes started by process `pid`."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int(_stat(int(proc.name))[1])
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 8:
            out[int(proc.name)] = Stub(argv[2].decode(), argv[8].decode())
    return out
