"""A real tritonserver process on free ports, started the way scripts/serve starts it."""

import os
import queue
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NO_CACHES = {"EPD_ENCODER_CACHE_MB": "0", "EPD_PREFIX_CACHE": "false"}  # the environment of a server without them


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_ready(process: subprocess.Popen, http_url: str, timeout: float, log_path: Path) -> None:
    """Until the server at http_url is ready; RuntimeError if the process exits or time runs out."""
    try:
        wait_http_ok(f"http://{http_url}/v2/health/ready", timeout, "tritonserver", process)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; see {log_path}") from None


def wait_http_ok(url: str, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Until GET url answers 200; RuntimeError naming `what` after `timeout` seconds, or at once
    when `process` (the server behind url) exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:g} s")
        time.sleep(0.2)


def start_openai_server(grpc_url: str, *args: str, timeout: float = 30.0) -> tuple[subprocess.Popen, str]:
    """The OpenAI server started by hand in front of a server's gRPC port, once healthy: (process, base URL)."""
    port = free_ports(1)[0]
    openai = subprocess.Popen([sys.executable, "-m", "qwen3vl_epd.openai_api", "--host", "127.0.0.1", "--port",
                             str(port), "--triton", grpc_url, *args], cwd=ROOT)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout, "the OpenAI server")
    except RuntimeError:
        openai.kill()
        raise
    return openai, f"http://127.0.0.1:{port}/v1"


class TritonServer:
    """`netns`: run inside that network namespace, on its address `host` and the default ports.
    `cpus`: pinned to these cores (taskset list). `wait=False`: return at once; call wait_ready().
    `supervised`: with scripts/serve's supervisor (its probes are real requests that move the
    metrics, so tests that count tokens or encodes run without it)."""

    def __init__(self, log_path: Path, env: dict | None = None, timeout: float = 180.0, args: list[str] = (),
                 netns: str | None = None, host: str = "127.0.0.1", wait: bool = True, cpus: str | None = None,
                 supervised: bool = False):
        self.host, self.log_path, self.timeout, self.supervised = host, log_path, timeout, supervised
        self.http, self.grpc, self.metrics, self.openai = (8000, 8001, 8002, 9000) if netns else free_ports(4)
        self.log = open(log_path, "w")
        prefix = (["ip", "netns", "exec", netns] if netns else []) + (["taskset", "-c", cpus] if cpus else [])
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "qwen3vl_epd.ops.launch", f"--http-port={self.http}",
             f"--grpc-port={self.grpc}", f"--metrics-port={self.metrics}", f"--openai-port={self.openai}",
             *([] if supervised else ["--probe-interval-s=0"]), *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Until tritonserver is ready and, supervised, until the supervisor says `ready:` (its
        probes passed: every model has served a request)."""
        try:
            wait_ready(self.process, self.http_url, self.timeout, self.log_path)
            deadline = time.monotonic() + self.timeout
            while self.supervised and not any(line.startswith("ready: ") for line in self.log_path.open()):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the supervisor never said ready; see {self.log_path}")
                time.sleep(0.2)
        except RuntimeError:
            self.stop()
            raise

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http}"

    @property
    def openai_url(self) -> str:
        """The OpenAI server's base URL (supervised servers only: scripts/serve starts it)."""
        return f"http://{self.host}:{self.openai}/v1"

    def metric_values(self, name: str) -> dict[str, float]:
        """{labels: value} of one metric family from the metrics endpoint."""
        with urllib.request.urlopen(f"http://{self.host}:{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                key, value = line.rsplit(" ", 1)
                out[key[len(name):]] = float(value)
        return out

    def assert_pools_empty(self, timeout: float = 5.0) -> None:
        """Both sides' pools and the KV cache back to 0 in use (released slots are reclaimed within ms)."""
        time.sleep(0.2)  # gauges are reported every 0.1 s: none is read stale
        deadline = time.monotonic() + timeout
        while True:
            values = self.metric_values("epd_buffer_blocks_in_use")
            assert len(values) == 7, values
            if all(v == 0 for v in values.values()):
                return
            assert time.monotonic() < deadline, values
            time.sleep(0.05)

    def send_handle(self, handle: bytes, max_tokens: int = 2) -> str:
        """Send a handle straight to the language model; the error message, or '' on success."""
        import tritonclient.grpc as grpcclient

        from qwen3vl_epd.wire import bytes_input, value_input

        results = queue.Queue()
        client = grpcclient.InferenceServerClient(self.grpc_url)
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        client.async_stream_infer("language", [bytes_input("handle", [handle]), value_input("max_tokens", max_tokens)])
        try:
            while True:
                result, error = results.get(timeout=60)
                if error is not None:
                    return error.message()
                if result.as_numpy("finish_reason").reshape(-1)[0]:
                    return ""
        finally:
            client.stop_stream()
            client.close()

    def encode_handle(self, text: bytes = b"Hello") -> bytes:
        """A handle staged by this server's encoder model."""
        import tritonclient.http as httpclient

        client = httpclient.InferenceServerClient(self.http_url)
        t = httpclient.InferInput("text_input", [1, 1], "BYTES")
        t.set_data_from_numpy(np.array([[text]], dtype=np.object_))
        try:
            return client.infer("encoder", [t]).as_numpy("handle").reshape(-1)[0]
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL to tritonserver and its model processes: a crash, nothing cleaned up."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.log.close()

    def stop(self) -> None:
        if self.log.closed:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        try:  # a model process stuck at exit outlives tritonserver; it is still in the group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
