"""A busy server is never restarted by its own supervisor: a vision tower whose batches take
seconds, 16 image requests at a time through both endpoints, while the supervisor's probe timeout
is shorter than one batch. A frozen model process under that load is still found within its bound."""

import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import tritonclient.grpc as grpcclient

from client import RequestError, generate, text_of
from qwen3vl_epd.liveness import Bounds, read_beat
from qwen3vl_epd.wire import request_inputs
from support import faults
from support.checkpoints import slow_vision_checkpoint
from support.prompts import ask_with_image, noise_jpeg
from support.tritonserver import TritonServer

pytestmark = pytest.mark.chaos

PROBE_TIMEOUT_S = 1.0  # shorter than one vision batch of this checkpoint (checked below)
SUPERVISOR_INTERVAL_S = 1.0  # launch.py's default --probe-interval-s
SIDE = 640  # 1600 patches an image: a batch of 8 takes seconds on this machine's CPUs (448 took 1.6 s on an AVX-512 host)
SOAK_SIDE = 224  # smaller images, so that 500 requests fit in a few minutes


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = slow_vision_checkpoint(tmp_path_factory.mktemp("slow") / "slow")
    s = TritonServer(tmp_path_factory.mktemp("busy") / "server.log", env={"EPD_CHECKPOINT": str(checkpoint)},
                     supervised=True, args=[f"--probe-timeout-s={PROBE_TIMEOUT_S}"])
    yield s
    s.stop()


def ask(server, endpoint: str, i: int) -> int:
    """One request with a new image (no encoder cache hit): its output tokens."""
    return ask_with_image(server, endpoint, noise_jpeg(SIDE, seed=i), model="slow")


def test_one_vision_batch_takes_longer_than_the_probe_timeout(server):
    """What makes the rest mean something: a probe queued behind a running batch would time out."""
    images = [noise_jpeg(SIDE, seed=10_000 + i) for i in range(8)]
    t0 = time.monotonic()
    text_of(generate(server.grpc_url, "Describe these.", images, max_tokens=1, timeout=600))
    assert time.monotonic() - t0 > 2 * PROBE_TIMEOUT_S


def language_inferences(server) -> float:
    """Requests the language model has finished, the supervisor's probes among them."""
    return sum(v for k, v in server.metric_values("nv_inference_request_success").items() if 'model="language"' in k)


def test_a_language_model_whose_requests_wait_on_the_encoder_is_not_probed(server):
    """Its probe's prefill would take the cores from the encoder working for those requests."""
    def one(k: int) -> None:
        images = [noise_jpeg(SIDE, seed=20_000 + 8 * k + i) for i in range(8)]
        text_of(generate(server.grpc_url, "Describe these.", images, max_tokens=1, timeout=600))

    workers = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(2)]  # one batch after the other
    language = faults.stub_pid(server, "language")
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while not ((beat := read_beat(language)) and beat.waiting == 2):
        assert time.monotonic() < deadline, "the language model never said it waits on the encoder"
        time.sleep(0.02)
    time.sleep(PROBE_TIMEOUT_S + 0.5)  # a probe sent just before has answered (or timed out)
    t0, before = time.monotonic(), language_inferences(server)
    while (beat := read_beat(language)) and beat.waiting:
        assert time.monotonic() - t0 < 120, "the encodes never came back"
        time.sleep(0.02)
    waited, after = time.monotonic() - t0, language_inferences(server)
    for w in workers:
        w.join(60)
    print(f"a language model waiting {waited:.1f} s on the encoder: {after - before:g} requests finished")
    assert waited > 3 * SUPERVISOR_INTERVAL_S  # the supervisor had its chances to probe it
    assert after == before


@pytest.mark.parametrize("endpoint", ["grpc", "openai"])
def test_64_image_requests_at_concurrency_16_are_all_served_without_a_restart(server, endpoint):
    before = faults.restarts(server)
    offset = 1000 if endpoint == "openai" else 0  # other images than the other endpoint's
    with ThreadPoolExecutor(16) as pool:
        served = list(pool.map(lambda i: ask(server, endpoint, offset + i), range(64)))
    assert served == [4] * 64
    assert faults.restarts(server) == before, server.log_path.read_text()[-2000:]
    faults.pools_empty(server)


def test_a_frozen_encoder_under_load_is_found_within_its_bound(server):
    if faults.FREEZER is None:
        pytest.skip(faults.NO_FREEZER)
    outcomes = []

    def one(i):
        try:
            outcomes.append(ask(server, "grpc", 5000 + i))
        except RequestError as e:
            outcomes.append(e.code)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    encoder = faults.stub_pid(server, "encoder")
    deadline = time.monotonic() + 60
    while not ((beat := read_beat(encoder)) and beat.busy):  # frozen in the middle of a batch
        assert time.monotonic() < deadline, "the encoder never took the batch"
        time.sleep(0.05)
    t0 = time.monotonic()
    try:
        faults.freeze(encoder)
        not_ready = faults.not_ready_after(server, t0)
    finally:
        faults.thaw()
    for t in threads:
        t.join(60)
    print(f"frozen encoder under load: not ready after {not_ready:.2f} s; outcomes {sorted(map(str, outcomes))}")
    assert not_ready <= Bounds().heartbeat_s + 1.5
    assert len(outcomes) == 8 and set(outcomes) <= {4, "UNAVAILABLE"}
    assert faults.back(server, t0) <= 60
    faults.pools_empty(server)


def test_soak_500_mixed_requests_at_concurrency_16_with_the_encoder_killed_midway(server):
    """Text, one and two new images a request; the encoder's process killed at request 100: every
    request ends with its answer (retrying UNAVAILABLE, as a client would), none hangs, nothing
    leaks, and the model processes' memory stays flat after warm-up."""
    def request(i):
        images = [noise_jpeg(SOAK_SIDE, seed=20_000 + 2 * i + k) for k in range(i % 3)]
        return ["Hi, tell me something.", "Describe this image.", "Compare <image> and <image>."][i % 3], images

    faults.assert_soaked("slow soak", 500, 300,
                         *faults.soak(server, request, 500, 16, kill_at=100, warm_at=300, model="encoder"))
    faults.pools_empty(server)


# Put before the language model's model.py: a forward holding a request "epd-wedge-…" never
# returns (a wedged call), while the rest of the process (its heartbeat thread) lives on.
WEDGE = textwrap.dedent('''
    import threading

    from qwen3vl_epd.language.engine import model_runner

    _run = model_runner.ModelRunner.run

    def _wedged(self, chunks, decodes):
        seqs = [c.seq for c in chunks] + list(decodes)
        if any(s.request is not None and s.request.id.startswith("epd-wedge-") for s in seqs):
            threading.Event().wait()
        return _run(self, chunks, decodes)

    model_runner.ModelRunner.run = _wedged
''')


def test_a_wedged_engine_is_found_by_its_progress_bound(tmp_path, checkpoint):
    """Its heartbeat goes on, it holds work and never finishes a step: hung after the bound its own
    rates give (the tiny model's steps are milliseconds, so the floor), not before."""
    repository = faults.patched_repository(tmp_path / "repository", WEDGE)
    s = TritonServer(tmp_path / "server.log", env={"EPD_CHECKPOINT": checkpoint}, supervised=True,
                     args=[f"--model-repository={repository}"])
    try:
        for _ in range(3):  # some history: the engine's rates
            text_of(generate(s.grpc_url, "Hi!", max_tokens=4))
        client = grpcclient.InferenceServerClient(s.grpc_url)
        client.start_stream(callback=lambda result, error: None)
        client.async_stream_infer("language", request_inputs("Hi!", [], True, {"max_tokens": 4}),
                                  request_id="epd-wedge-1")
        t0 = time.monotonic()
        found = faults.not_ready_after(s, t0, 60)
        client.stop_stream()
        print(f"wedged engine: not ready after {found:.2f} s")
        floor = Bounds().floor_s
        assert floor - 0.5 <= found <= floor + 3
        deadline = time.monotonic() + 30  # the supervisor says why once its kill is done
        while "restarting" not in (log := s.log_path.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "is hung: no progress" in log
        assert faults.back(s, t0) <= 60
    finally:
        s.stop()
