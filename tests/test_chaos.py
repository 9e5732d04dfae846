"""Faults injected into a running, supervised server (scripts/serve's supervisor), 8 streams in
flight each time: every client gets its final response or an error within a bound, the service
is back, nothing leaks, and nothing is left running after shutdown."""

import os
import signal
import threading
import time

import pytest

from client import RequestError, generate, text_of
from qwen3vl_epd.ops.supervisor import Stub, children, is_stub
from support.faults import (
    FREEZER,
    NO_FREEZER,
    assert_soaked,
    back,
    freeze,
    not_ready_after,
    pools_empty,
    restarts,
    soak,
    stub_pid,
    thaw,
    tritonserver_pid,
)
from support.prompts import image_bytes
from support.tritonserver import TritonServer

pytestmark = pytest.mark.chaos

ENDED_WITHIN_S = 10  # every in-flight request has its answer this long after the fault
BACK_WITHIN_S = 30  # and the service is back within this
NOT_READY_WITHIN_S = 1.0  # a dead or stopped model process: /v2/health/ready stops answering 200 within this


SEEN_STUBS: dict[int, Stub] = {}  # every model process of the module's server, across its restarts


def alive(stubs: dict[int, Stub]) -> list[int]:
    """Those of `stubs` still running (the same process: its shared-memory region in its command)."""
    return [pid for pid, stub in stubs.items() if is_stub(pid, stub)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    s = TritonServer(tmp_path_factory.mktemp("chaos") / "server.log", env={"EPD_CHECKPOINT": checkpoint},
                     supervised=True)
    yield s
    s.stop()
    time.sleep(1)
    assert not alive(SEEN_STUBS), "model processes left behind after shutdown"


def stub_of(server, model: str) -> int:
    SEEN_STUBS.update(children(tritonserver_pid(server)))
    return stub_pid(server, model)


class Streams:
    """8 long streams (text only and with an image) whose outcome and end time are recorded."""

    def __init__(self, server, n=8):
        self.outcomes, self.ended, self.messages = {}, {}, {}
        self.started = threading.Barrier(n + 1)
        self.threads = [threading.Thread(target=self._one, args=(server, i), daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()
        self.started.wait(120)

    def _one(self, server, i):
        images = [image_bytes("small_64x64.webp")] if i % 2 else []
        responses = generate(server.grpc_url, f"Tell story {i}.", images, stream=True, max_tokens=4000,
                             ignore_eos=True, timeout=120)
        try:
            next(responses)
            self.started.wait()
            text_of(responses)
            self.outcomes[i] = "finished"
        except RequestError as e:
            self.outcomes[i] = e.code
            self.messages[i] = e.message
        self.ended[i] = time.monotonic()

    def join(self, timeout):
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return self.outcomes, self.ended


def hang(model: str):
    return lambda server: freeze(stub_of(server, model))


FAULTS = {
    "kill language stub": lambda s: os.kill(stub_of(s, "language"), signal.SIGKILL),
    "kill encoder stub": lambda s: os.kill(stub_of(s, "encoder"), signal.SIGKILL),
    "stop language stub": lambda s: os.kill(stub_of(s, "language"), signal.SIGSTOP),
    "stop encoder stub": lambda s: os.kill(stub_of(s, "encoder"), signal.SIGSTOP),
    "freeze language stub": hang("language"),
    "freeze encoder stub": hang("encoder"),
    "kill tritonserver": lambda s: os.kill(tritonserver_pid(s), signal.SIGKILL),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_under_8_streams(server, fault):
    hung = fault.startswith("freeze")  # seen by its stopped heartbeat (liveness.py), not by its state
    if hung and FREEZER is None:
        pytest.skip(NO_FREEZER)
    streams = Streams(server)
    t0 = time.monotonic()
    try:
        FAULTS[fault](server)
        not_ready = not_ready_after(server, t0)
        outcomes, ended = streams.join(ENDED_WITHIN_S + 5)
    finally:
        thaw()
    assert len(outcomes) == 8, f"{8 - len(outcomes)} requests still hang after the fault"
    last_end = max(ended.values()) - t0
    assert last_end <= ENDED_WITHIN_S
    assert set(outcomes.values()) == {"UNAVAILABLE"}, streams.messages
    assert all("language" in m for m in streams.messages.values()), streams.messages  # names the model
    back_after = back(server, t0)
    print(f"{fault}: not ready after {not_ready:.2f} s; 8 in-flight requests ended within {last_end:.1f} s "
          f"({sorted(set(outcomes.values()))}); served again after {back_after:.1f} s")
    assert not_ready <= (ENDED_WITHIN_S if hung else NOT_READY_WITHIN_S)
    assert back_after <= BACK_WITHIN_S
    pools_empty(server)


class LanguageStream:
    """A gRPC stream straight to `language`, 4000 tokens: `got` is set at its first response."""

    def __init__(self, server, i: int):
        import tritonclient.grpc as grpcclient

        from qwen3vl_epd.wire import request_inputs

        self.got, self.errors = threading.Event(), []
        self.client = grpcclient.InferenceServerClient(server.grpc_url)
        self.client.start_stream(callback=self._on_response)
        self.client.async_stream_infer("language", request_inputs(f"Story {i}", [], True,
                                                               {"max_tokens": 4000, "ignore_eos": True}))

    def _on_response(self, result, error):
        if error is not None:
            self.errors.append(error.message())
        self.got.set()

    def cancel(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def test_a_saturated_server_is_not_restarted(server):
    """KV taken by 16 streams and 8 more queued, for longer than two probe timeouts: the probes go
    before the queue, so the supervisor sees a busy server, not a hung one."""
    before = restarts(server)
    streams = [LanguageStream(server, i) for i in range(24)]
    time.sleep(10)
    started, errors = sum(s.got.is_set() for s in streams), [e for s in streams for e in s.errors]
    for s in streams:
        s.cancel()
    assert restarts(server) == before and not errors, errors
    assert 0 < started < 24, started  # some queued all the while
    pools_empty(server)


def test_cancellation_storm_of_20(server):
    streams = [LanguageStream(server, i) for i in range(20)]
    for s in streams:
        assert s.got.wait(60) and not s.errors, s.errors
        s.cancel()
    pools_empty(server)


def test_soak_1000_mixed_requests_with_a_model_process_killed_at_500(server):
    """No request lost without an error, nothing leaks, and the model processes' memory stays flat
    after warm-up (measured on the processes started after the kill)."""
    mix = [("Hi", []), ("Describe this image.", [image_bytes("small_64x64.webp")]),
           ("Compare <image> and <image>.", [image_bytes("small_64x64.webp"), image_bytes("one_pixel.png")])]
    assert_soaked("soak", 1000, 650, *soak(server, lambda i: mix[i % len(mix)], 1000, 8, kill_at=500, warm_at=650,
                                            stub=stub_of))
    pools_empty(server)


def model_processes(server, at_least: int = 0, timeout: float = 60) -> dict[int, Stub]:
    """The model processes of the supervisor's current tritonserver, once there are `at_least`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stubs = children(tritonserver_pid(server))
        except AssertionError:  # between two tritonservers
            stubs = {}
        if len(stubs) >= at_least or time.monotonic() > deadline:
            return stubs
        time.sleep(0.1)


def frozen(server):
    server.wait_ready()
    freeze(stub_of(server, "language"))
    return model_processes(server)


def crashed_and_restarting(server):
    server.wait_ready()
    stubs = model_processes(server)
    os.kill(tritonserver_pid(server), signal.SIGKILL)
    time.sleep(1.5)  # the supervisor has noticed and started another, which is loading
    return {**stubs, **model_processes(server)}


SIGTERM_STATES = {
    "loading": lambda s: model_processes(s, at_least=3),
    "a frozen model process": frozen,
    "restarting after tritonserver crashed": crashed_and_restarting,
}


@pytest.mark.parametrize("state", SIGTERM_STATES)
def test_sigterm_stops_within_30_s(tmp_path, checkpoint, state):
    """scripts/serve stops on SIGTERM within 30 s and leaves no model process behind, whatever the
    state of the server (each on a server of its own)."""
    if "frozen" in state and FREEZER is None:
        pytest.skip(NO_FREEZER)
    s = TritonServer(tmp_path / "server.log", env={"EPD_CHECKPOINT": checkpoint}, supervised=True, wait=False)
    try:
        stubs = SIGTERM_STATES[state](s)
        t0 = time.monotonic()
        os.kill(s.process.pid, signal.SIGTERM)
        s.process.wait(35)
        stopped_after = time.monotonic() - t0
    finally:
        thaw()  # a frozen process ends only when thawed (the supervisor killed it)
        s.stop()
    print(f"SIGTERM while {state}: stopped after {stopped_after:.1f} s")
    assert stopped_after <= 30
    time.sleep(1)
    assert stubs and not alive(stubs), stubs


def test_sigterm_with_a_hung_model_process_stops_within_30_s(server):
    """The last test: SIGSTOP the language model's process, then SIGTERM scripts/serve."""
    os.kill(stub_of(server, "language"), signal.SIGSTOP)
    t0 = time.monotonic()
    os.kill(server.process.pid, signal.SIGTERM)
    server.process.wait(35)
    assert time.monotonic() - t0 <= 30
