"""End to end through a real tritonserver: equality with transformers, errors, concurrency, perf_analyzer."""

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from reference import reference_greedy

from client import RequestError, generate, text_of
from support.prompts import (
    ACCEPTED,
    IMAGES,
    REJECTED,
    ROOT,
    image_bytes,
    language_request_inputs,
    noise_jpeg,
    prompt_inputs,
)
from support.tritonserver import TritonServer

pytestmark = pytest.mark.triton

MAX_TOKENS = 16
CASES = ["sea", "landscape", "two_marked_with"]  # text only, one image, two images


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    s = TritonServer(tmp_path_factory.mktemp("triton") / "server.log", env={"EPD_CHECKPOINT": checkpoint})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(processor, reference):
    """Per case: (text, number of tokens) of transformers' greedy generate."""
    out = {}
    for case in CASES:
        tokens = reference_greedy(reference, processor.process(*prompt_inputs(case)), MAX_TOKENS)
        out[case] = (processor.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens))
    return out


def url(server, protocol):
    return server.grpc_url if protocol == "grpc" else server.http_url


def assert_pools_empty(server, timeout=5.0):
    server.assert_pools_empty(timeout)


@pytest.mark.parametrize("model", ["language", "ensemble"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
@pytest.mark.parametrize("case", CASES)
def test_endpoints_equal_transformers(server, expected, case, protocol, stream, model):
    text, images = prompt_inputs(case)
    responses = list(generate(url(server, protocol), text, images, protocol, stream, model=model,
                              max_tokens=MAX_TOKENS))
    want_text, want_n = expected[case]
    got_text, last = text_of(iter(responses))
    assert got_text == want_text
    assert last.num_output_tokens == want_n
    assert last.finish_reason == ("stop" if want_n < MAX_TOKENS else "length")
    if stream:
        assert len(responses) > 1 and all(not r.finish_reason for r in responses[:-1])
    else:
        assert len(responses) == 1


def test_stop_string_and_sampling_fields(server, expected):
    want_text, _ = expected["sea"]
    stop = want_text[3:6]
    text, last = text_of(generate(server.grpc_url, prompt_inputs("sea")[0], stream=True, max_tokens=MAX_TOKENS,
                                  stop=[stop]))
    assert last.finish_reason == "stop" and text == want_text[: want_text.index(stop)]
    seeded = dict(max_tokens=8, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    a = text_of(generate(server.grpc_url, "Hi", **seeded))[0]
    b = text_of(generate(server.http_url, "Hi", protocol="http", **seeded))[0]
    assert a == b


BAD_FIELDS = [
    (dict(max_tokens=0), "max_tokens: 0 is outside 1..4096"),
    (dict(max_tokens=5000), "max_tokens: 5000 is outside 1..4096"),
    (dict(temperature=-0.5), "temperature: -0.5 must be >= 0"),
    (dict(top_p=0.0), "top_p: 0.0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p: 1.5 must be in (0, 1]"),
    (dict(top_k=-1), "top_k: -1 must be >= 0"),
]
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_inputs_are_invalid_arg_and_lose_nothing(server, protocol):
    u = url(server, protocol)

    def rejected(prompt, images=(), **fields):
        with pytest.raises(RequestError) as e:
            text_of(generate(u, prompt, list(images), protocol, stream=True, **fields))
        assert e.value.code == "INVALID_ARG", e.value  # gRPC streams too: the code is in the message
        if protocol == "http":
            assert e.value.status == "400", e.value
        return e.value.message

    for fields, message in BAD_FIELDS:
        assert message in rejected("Hello", [image_bytes("small_64x64.webp")], **fields)
    for name, message in REJECTED.items():
        got = rejected("Look", [image_bytes("small_64x64.webp"), image_bytes(name)])
        assert "image 1:" in got and message in got, got
    assert "10 images is over the limit of 8 per prompt" in rejected("x", [image_bytes("small_64x64.webp")] * 10)
    assert "2 '<image>' markers but 1 images" in rejected("<image> <image>", [image_bytes("small_64x64.webp")])
    assert "over the max model length of 32768" in rejected("word " * 33000)
    assert "over the limit of 20971520 encoded bytes" in rejected("x", [b"\xff" * (20 * 1024 * 1024 + 1)])
    assert_pools_empty(server)
    # the server keeps serving
    assert text_of(generate(u, "Still there?", protocol=protocol, max_tokens=2))[1].num_output_tokens == 2


def test_missing_text_input(server):
    import urllib.error
    import urllib.request

    body = json.dumps({"max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/generate", data=body)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400 and "text_input" in e.value.read().decode()


def test_forged_and_malformed_handles_sent_to_language(server):
    assert "malformed handle" in server.send_handle(b"{not json")
    assert "max_tokens: 0 is outside 1..4096" in server.send_handle(b"{not json", max_tokens=0)
    staged = server.encode_handle()
    assert "max_tokens: 0 is outside" in server.send_handle(staged, max_tokens=0)  # and its slot is released
    real = server.encode_handle()
    forged = json.loads(real)
    forged["nonce"] += 1
    assert "handle signature is missing or wrong" in server.send_handle(json.dumps(forged).encode())
    elsewhere = {**json.loads(real), "peer": "192.0.2.1:4000"}
    assert "handle signature is missing or wrong" in server.send_handle(json.dumps(elsewhere).encode())
    unsigned = {k: v for k, v in json.loads(real).items() if k != "signature"}
    assert "handle signature is missing or wrong" in server.send_handle(json.dumps(unsigned).encode())
    assert server.send_handle(real) == ""  # the genuine handle still works, and is released
    assert "was already opened on this server" in server.send_handle(real)  # a replay
    twice = server.encode_handle()
    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(lambda _: server.send_handle(twice), range(2)))
    assert outcomes[0] == "" and "was already opened on this server" in outcomes[1]  # served once
    assert_pools_empty(server)


def test_16_concurrent_requests(server, expected):
    jobs = [CASES[i % len(CASES)] for i in range(16)]

    def run(i_case):
        i, case = i_case
        text, images = prompt_inputs(case)
        protocol = "grpc" if i % 2 else "http"
        return text_of(generate(url(server, protocol), text, images, protocol,
                                stream=bool(i % 3), max_tokens=MAX_TOKENS))[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, enumerate(jobs)))
    assert results == [expected[c][0] for c in jobs]
    assert_pools_empty(server)


def test_text_only_never_waits_behind_vision_work(server):
    """A text-only prompt sent while a large image is being encoded gets its first token before
    that encode ends (the encoder's request counter has not moved yet)."""
    encodes = lambda: sum(server.metric_values("epd_encode_requests_total").values())  # noqa: E731
    before = encodes()
    big = noise_jpeg(2048)  # seconds of encoding on the tiny tower
    with ThreadPoolExecutor(1) as pool:
        image_job = pool.submit(lambda: text_of(generate(server.grpc_url, "Describe this.", [big], max_tokens=1)))
        time.sleep(0.5)  # the big image is in the encoder now
        first = next(iter(generate(server.grpc_url, "Hi!", stream=True, max_tokens=4)))
        assert first.text and encodes() == before, "the text-only request waited for the image's encode"
        assert image_job.result()[1].num_output_tokens == 1
    assert encodes() >= before + 1
    assert_pools_empty(server)


def test_perf_analyzer_streaming_grpc(server, tmp_path):
    data = tmp_path / "perf.json"
    subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "client.perf_data", str(data),
                    "--image", str(IMAGES / "small_64x64.webp"), "--max-tokens", "4"], cwd=ROOT, check=True)
    result = subprocess.run(
        [str(ROOT / "scripts" / "perf"), "-m", "ensemble", "-u", server.grpc_url, "-i", "grpc", "--streaming",
         "--input-data", str(data), "--request-count", "8", "--concurrency-range", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Successful request count: 8" in result.stdout


def _cancel_stream(server):
    import queue

    import tritonclient.grpc as grpcclient

    results = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    client.async_stream_infer("language", language_request_inputs(server.encode_handle()))
    for _ in range(2):
        result, error = results.get(timeout=60)
        assert error is None
    client.stop_stream(cancel_requests=True)
    client.close()


def _kill_client(server):
    """A client process streaming from the language model is killed: its connection just drops."""
    script = (
        "import sys, time, queue, numpy as np, tritonclient.grpc as g\n"
        "sys.path.insert(0, '.')\n"
        "from support.prompts import language_request_inputs\n"
        "q = queue.Queue(); c = g.InferenceServerClient(sys.argv[1])\n"
        "c.start_stream(callback=lambda result, error: q.put(error))\n"
        "c.async_stream_infer('language', language_request_inputs(sys.argv[2].encode()))\n"
        "q.get(); print('streaming', flush=True); time.sleep(600)\n")
    cli = subprocess.Popen([str(ROOT / ".venv" / "bin" / "python"), "-c", script, server.grpc_url,
                            server.encode_handle().decode()], cwd=ROOT, stdout=subprocess.PIPE)
    assert cli.stdout.readline().strip() == b"streaming"
    cli.kill()
    cli.wait()


@pytest.mark.parametrize("how", [_cancel_stream, _kill_client], ids=["cancel", "disconnect"])
def test_grpc_cancel_and_disconnect_free_everything(server, how):
    tokens = lambda: server.metric_values("epd_output_tokens_total")[""]  # noqa: E731
    how(server)
    assert_pools_empty(server, timeout=5.0)  # 4000 tokens would take far longer than this
    time.sleep(0.3)  # the language model reports its metrics every 0.1 s
    stopped_at = tokens()
    time.sleep(0.5)
    assert tokens() == stopped_at
    assert text_of(generate(server.grpc_url, "Hello", max_tokens=3))[1].num_output_tokens == 3


@pytest.mark.parametrize("name", ACCEPTED)
def test_every_accepted_test_image_is_served(server, name):
    text, last = text_of(generate(server.grpc_url, "What is this?", [image_bytes(name)], max_tokens=2))
    assert last.num_output_tokens >= 1 and last.num_input_tokens > 64


def test_unloading_leaves_no_process_behind(tmp_path, checkpoint):
    import tritonclient.http as httpclient

    s = TritonServer(tmp_path / "server.log", env={"EPD_CHECKPOINT": checkpoint},
                     args=["--model-control-mode=explicit", "--load-model=*"])
    try:
        client = httpclient.InferenceServerClient(s.http_url)
        assert text_of(generate(s.grpc_url, "Hi", max_tokens=2))[1].num_output_tokens == 2
        # launch.py execs tritonserver, so the process we started is the server itself
        children = subprocess.run(["pgrep", "-P", str(s.process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 3  # the encoder, language and complete stubs
        for model in ("ensemble", "complete", "language", "encoder"):
            client.unload_model(model)
        deadline = time.monotonic() + 60
        while any(_alive(pid) for pid in children):
            assert time.monotonic() < deadline, "a model process outlived its unload"
            time.sleep(0.2)
        client.close()  # an open keep-alive connection holds tritonserver's exit for 30 s
    finally:
        s.stop()


def _alive(pid: str) -> bool:
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def _complete(server, text, images=(), **fields):
    """HTTP /infer on the unary `complete` model; (outputs, None) or (None, (HTTP status, message))."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(server.http_url)
    inputs = []
    values = {"text_input": ("BYTES", np.array([[text.encode()]], dtype=np.object_))}
    if images:
        values["image"] = ("BYTES", np.array([list(images)], dtype=np.object_))
    for name, value in fields.items():
        values[name] = ("INT32", np.array([[value]], dtype=np.int32))
    for name, (dtype, array) in values.items():
        t = httpclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array, binary_data=True)
        inputs.append(t)
    try:
        result = client.infer("complete", inputs)
        return {n: result.as_numpy(n).reshape(-1)[0] for n in ("text_output", "finish_reason", "num_output_tokens")}, None
    except InferenceServerException as e:
        return None, (e.status(), e.message())
    finally:
        client.close()


def test_http_infer_on_complete(server, expected):
    out, error = _complete(server, *prompt_inputs("landscape"), max_tokens=MAX_TOKENS)
    assert error is None
    assert out["text_output"].decode() == expected["landscape"][0]
    assert out["num_output_tokens"] == expected["landscape"][1]
    _, error = _complete(server, "Hi", max_tokens=0)
    assert error[0] == "400" and "max_tokens: 0 is outside 1..4096" in error[1]
    _, error = _complete(server, "Hi", [image_bytes("truncated.jpg")])
    assert error[0] == "400" and "[INVALID_ARG] image 0: cannot decode image" in error[1]  # across the BLS hop
    assert_pools_empty(server)


def test_a_fresh_clone_stays_clean_after_serving(tmp_path):
    """scripts/serve run in a fresh clone (this venv, the clone's package) leaves `git status` empty."""
    import os
    import signal

    from support.tritonserver import free_ports

    clone = tmp_path / "clone"
    # This venv up to date first: else the clone's set-up would install the clone's package into it.
    subprocess.run([str(ROOT / "scripts" / "setup")], check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    http, grpc, metrics = free_ports(3)
    env = {**os.environ, "EPD_VENV": str(ROOT / ".venv"), "PYTHONPATH": str(clone / "backends"),
           "HTTP_PORT": str(http), "GRPC_PORT": str(grpc), "METRICS_PORT": str(metrics)}
    serve = subprocess.Popen([str(clone / "scripts" / "serve")], cwd=clone, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        for line in serve.stdout:
            if line.startswith("ready: "):
                break
            assert time.monotonic() < deadline and serve.poll() is None, line
        else:
            raise AssertionError("scripts/serve ended without a ready line")
        assert f"HTTP http://localhost:{http}" in line
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        serve.wait(40)
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=clone, capture_output=True, text=True)
    assert status.stdout == "", status.stdout


def test_plain_tritonserver_recipe_from_the_readme(tmp_path, expected):
    """The README's plain-tritonserver block, run as written (ports through its variables)."""
    import os
    import re
    import signal

    from support.tritonserver import free_ports, wait_ready

    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- recipe: plain tritonserver -->\n```bash\n(.*?)```", readme, re.S).group(1)
    http, grpc, metrics = free_ports(3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPD_") or k == "EPD_CHECKPOINT"}
    env.update(HTTP_PORT=str(http), GRPC_PORT=str(grpc), METRICS_PORT=str(metrics))
    log = open(tmp_path / "plain.log", "w")
    server = subprocess.Popen(["bash", "-c", block], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        wait_ready(server, f"127.0.0.1:{http}", 180, tmp_path / "plain.log")
        text, images = prompt_inputs("landscape")
        got, _ = text_of(generate(f"127.0.0.1:{grpc}", text, images, stream=True, max_tokens=MAX_TOKENS))
        assert got == expected["landscape"][0]
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(40)
        try:  # a model process stuck at exit
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def test_latency_histograms_count_each_request(server):
    """Histograms per request from its arrival at the language model; queue and prompt time are parts of TTFT."""
    names = ["epd_time_to_first_token_seconds", "epd_prompt_seconds", "epd_queue_seconds", "epd_request_seconds"]

    def totals():
        time.sleep(0.3)  # reported every 0.1 s
        return {(n, part): server.metric_values(f"{n}_{part}")[""] for n in names for part in ("count", "sum")}

    before = totals()
    for case in ("sea", "landscape"):
        text_of(generate(server.grpc_url, *prompt_inputs(case), max_tokens=3))
    after = totals()
    grew = {key: after[key] - before[key] for key in after}
    assert all(grew[(n, "count")] == 2 for n in names), grew
    ttft = grew[("epd_time_to_first_token_seconds", "sum")]
    assert ttft >= grew[("epd_prompt_seconds", "sum")] + grew[("epd_queue_seconds", "sum")] > 0
    assert grew[("epd_request_seconds", "sum")] >= ttft
    buckets = server.metric_values("epd_time_to_first_token_seconds_bucket")
    assert buckets['{le="+Inf"}'] == after[("epd_time_to_first_token_seconds", "count")], buckets


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="no CUDA GPU here; the generated GPU configuration is checked by test_roles")
def test_serves_on_a_gpu(tmp_path, checkpoint, expected):
    s = TritonServer(tmp_path / "server.log", env={"EPD_CHECKPOINT": checkpoint}, args=["--device=cuda:0"])
    try:
        for case in CASES:
            text, last = text_of(generate(s.grpc_url, *prompt_inputs(case), max_tokens=MAX_TOKENS))
            assert last.num_output_tokens == expected[case][1] and text == expected[case][0]
    finally:
        s.stop()


def test_a_repeated_image_is_encoded_once(server):
    """The encoder cache through the server: three requests with one new image, one vision forward,
    the same answer each time; its metrics move accordingly."""
    image = noise_jpeg(320, seed=77)  # no other test sends it
    names = ["epd_vision_images_total", "epd_encoder_cache_hits_total", "epd_encoder_cache_misses_total"]

    def counts():
        time.sleep(0.3)
        return [sum(server.metric_values(n).values()) for n in names]

    before = counts()
    answers = {text_of(generate(server.grpc_url, "Describe <image>.", [image], max_tokens=6))[0] for _ in range(3)}
    images, hits, misses = (a - b for a, b in zip(counts(), before))
    assert (images, hits, misses) == (1, 2, 1) and len(answers) == 1
    assert server.metric_values("epd_encoder_cache_bytes")[""] > 0


def test_prefix_cache_metrics_and_answers(server, expected):
    """The same prompt twice: the second finds all but its last block cached and answers the same."""
    names = ["epd_prefix_cache_queried_tokens_total", "epd_prefix_cache_hit_tokens_total"]

    def counts():
        time.sleep(0.3)
        return [server.metric_values(n)[""] for n in names]

    text, images = prompt_inputs("landscape")
    first = counts()
    answers = [text_of(generate(server.grpc_url, text, images, max_tokens=MAX_TOKENS)) for _ in range(2)]
    queried, hit = (a - b for a, b in zip(counts(), first))
    length = answers[0][1].num_input_tokens
    assert queried == 2 * length and (length - 1) // 16 * 16 <= hit <= 2 * ((length - 1) // 16 * 16)
    assert answers[0][0] == answers[1][0] == expected["landscape"][0]
    assert server.metric_values("epd_prefix_cache_blocks")[""] >= (length - 1) // 16
