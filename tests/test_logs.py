"""Logs an operator can use: an internal error reaches the client as INTERNAL naming its request,
and the server log has the same request id with the traceback."""

import queue
import textwrap
import time

import pytest
import tritonclient.grpc as grpcclient

from client import generate, text_of
from qwen3vl_epd.wire import request_inputs
from support.faults import patched_repository
from support.tritonserver import TritonServer

pytestmark = pytest.mark.triton

# Put in front of the language model's model.py in a copy of the repository: the engine's model
# runner fails any step that holds a request whose id starts with "epd-fault-".
FAULT = textwrap.dedent('''
    from qwen3vl_epd.language.engine import model_runner

    _run = model_runner.ModelRunner.run

    def _faulty(self, chunks, decodes):
        seqs = [c.seq for c in chunks] + list(decodes)
        if any(s.request is not None and s.request.id.startswith("epd-fault-") for s in seqs):
            raise RuntimeError("induced fault")
        return _run(self, chunks, decodes)

    model_runner.ModelRunner.run = _faulty
''')


def test_an_internal_error_is_logged_with_its_traceback_and_request_id(tmp_path, checkpoint):
    repository = patched_repository(tmp_path / "repository", FAULT)
    log = tmp_path / "server.log"
    s = TritonServer(log, env={"EPD_CHECKPOINT": checkpoint}, args=[f"--model-repository={repository}"])
    try:
        results = queue.Queue()
        client = grpcclient.InferenceServerClient(s.grpc_url)
        client.start_stream(callback=lambda result, error: results.put(error))
        client.async_stream_infer("language", request_inputs("Hi!", [], True, {"max_tokens": 4}),
                                  request_id="epd-fault-7")
        error = results.get(timeout=60)
        client.stop_stream()
        assert error is not None and error.message().startswith("[INTERNAL] internal error in the engine "
                                                                "(request epd-fault-7): RuntimeError('induced fault')")
        text = log.read_text()
        at = text.index("epd-fault-7")
        assert "Traceback (most recent call last)" in text[at:] and "RuntimeError: induced fault" in text[at:]
        # The engine lives on: the next request is served, and nothing is left in use.
        answer, last = text_of(generate(s.grpc_url, "Hi!", max_tokens=4))
        assert last.finish_reason in ("length", "stop")
        deadline = time.monotonic() + 10
        while any(s.metric_values("epd_buffer_blocks_in_use").values()):
            assert time.monotonic() < deadline, s.metric_values("epd_buffer_blocks_in_use")
            time.sleep(0.1)
    finally:
        s.stop()
