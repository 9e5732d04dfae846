"""Triton adapter of the language model (decoupled), the client-facing entry: prompt + images (or
a handle) + sampling → LanguageService → streamed text."""

import logging
import time

import triton_python_backend_utils as pb_utils

from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.language.request import LanguageRequest, Phase, new_request_id
from qwen3vl_epd.language.service import LanguageService
from qwen3vl_epd.liveness import Heartbeat
from qwen3vl_epd.settings import LanguageSettings
from qwen3vl_epd.triton_backend import adapter as ta
from qwen3vl_epd.triton_backend import metrics as m
from qwen3vl_epd.triton_backend.inputs import first, prompt_inputs, sampling_fields
from qwen3vl_epd.triton_backend.outbox import CancelWatch, Outbox, Reply, accumulate, logprobs_json
from qwen3vl_epd.wire import PROBE_ID_PREFIX

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("qwen3vl_epd.language")


class TritonPythonModel:
    def initialize(self, args):
        config, settings = ta.start(args, LanguageSettings)
        self.outputs = ta.Outputs(config)
        self.metrics = m.Metrics("language", m.LANGUAGE_POOLS, m.LANGUAGE_COUNTERS, m.LANGUAGE_HISTOGRAMS,
                                 m.LANGUAGE_GAUGES)
        self.service = LanguageService(settings)
        self.heartbeat = Heartbeat(self.service.engine.progress)  # for the supervisor: busy is not hung
        self.outbox = Outbox(self._send, self.service.cancel)
        self.watch = CancelWatch(settings.cancel_check_ms / 1000, self.service.cancel)
        # Live gauges from their own thread: no IPC call on the engine's step, and a slot freed
        # after the last step (a release write returning) is still seen.
        self.metrics_thread = ta.every(0.1, self._update_metrics)

    def execute(self, requests):
        for request in requests:
            self._start(request, time.perf_counter())
        return None

    def _start(self, request, arrived):
        reply = Reply(request.get_response_sender(), request.is_cancelled)
        get = lambda name: ta.read(request, name)  # noqa: E731
        handle = first(get("handle"), bytes)
        try:
            try:
                params = self.service.sampling(**sampling_fields(get))
            except EpdError:
                if handle is not None:
                    self.service.release(handle)  # the encoder staged this request: give its blocks back
                raise
            rid = request.request_id() or new_request_id()
            respond = accumulate(bool(first(get("stream")) or False), lambda piece: self.outbox.put(reply, piece))
            reply.request = LanguageRequest(params, respond, rid, arrived, probe=rid.startswith(PROBE_ID_PREFIX))
            self.watch.add(reply.request, reply.cancelled)
            if handle is not None:
                self.service.start(reply.request, handle=handle)
            else:
                self.service.start(reply.request, prompt_inputs(get))
        except Exception as e:
            if not isinstance(e, EpdError):  # a bug: the log has the traceback, the client the request id
                rid = reply.request.id if reply.request is not None else request.request_id()
                log.exception("request %s: internal error at its start", rid)
                e = EpdError(f"internal error (request {rid}): {e!r}")
            if reply.request is not None:
                reply.request.phase = Phase.DONE
            reply.close()
            reply.sender.send(ta.exception_response(e), flags=FINAL)
            self._update_metrics()

    def _send(self, sender, piece):
        if piece.error is not None:
            response, flags = ta.exception_response(piece.error), FINAL
        elif piece.finish_reason == "cancelled":
            response, flags = ta.error_response("request cancelled", "CANCELLED"), FINAL
        else:
            response = self.outputs.response(
                text_output=piece.text.encode(), finish_reason=(piece.finish_reason or "").encode(),
                num_input_tokens=piece.num_input_tokens, num_output_tokens=piece.num_output_tokens,
                token_logprobs=logprobs_json(piece.logprobs))
            flags = FINAL if piece.finish_reason else 0
        try:
            sender.send(response, flags=flags)
        finally:
            if flags == FINAL:
                self._update_metrics()

    def _update_metrics(self):
        engine, stats = self.service.engine, self.service.puller.stats
        # Gauges read first: a pool seen empty comes with every token generated before it emptied.
        self.metrics.report({
            **engine.in_use(), "bytes": stats.bytes_read, "seconds": stats.seconds,
            "tokens": engine.output_tokens,
            "retries": self.service.encoders.retries, "prefix_queried": engine.prefix_queried_tokens,
            "prefix_hit": engine.prefix_hit_tokens, "cached_blocks": engine.kv.cached_blocks()})
        self.metrics.observe(engine.timings)

    def finalize(self):
        self.heartbeat.close()
        self.metrics_thread.set()
        self.watch.close()
        self.service.close()
        self.outbox.close()
