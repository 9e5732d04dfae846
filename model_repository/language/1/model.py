"""Triton adapter of the language model (decoupled), the client-facing door: prompt + images (or a
handle) + sampling → LanguageService → streamed text."""

import dataclasses
import queue
import threading
import time

import triton_python_backend_utils as pb_utils

from qwen3vl_epd import triton_adapter as ta
from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.serving import EncodeRequest, LanguageService, merge_pieces
from qwen3vl_epd.triton_io import PROBE_ID_PREFIX, first, prompt_fields, sampling_fields, text_field

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
COUNTERS = {
    "bytes": ("epd_transfer_bytes_total", "Bytes pulled from encoders"),
    "seconds": ("epd_transfer_seconds_total", "Seconds spent in Mooncake reads"),
    "tokens": ("epd_output_tokens_total", "Output tokens generated"),
    "retries": ("epd_encode_retries_total", "Encodes sent again because their encoder became unreachable"),
    "prefix_queried": ("epd_prefix_cache_queried_tokens_total", "Prompt tokens of admitted requests, looked up "
                       "in the prefix cache"),
    "prefix_hit": ("epd_prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix cache "
                   "(neither pulled nor prefilled)"),
}
GAUGES = {"cached_blocks": ("epd_prefix_cache_blocks", "KV blocks held in the prefix cache (in use by requests "
                            "or kept for reuse)")}
# Per request, from its arrival at this model (the door; the ensemble and complete pass straight on).
HISTOGRAMS = {
    "ttft": ("epd_time_to_first_token_seconds", "Seconds from a request's arrival at the language model to "
             "its first token: prompt processing, encoding on the pool, queueing and prefill included"),
    "prompt": ("epd_prompt_seconds", "Seconds from a request's arrival to its prompt being ready at the engine "
               "(text only: tokenizing; with images: encoding on the pool, waiting for an encoder included)"),
    "queue": ("epd_queue_seconds", "Seconds a ready prompt waited for the engine to admit it (KV cache space, "
              "max_running)"),
    "request": ("epd_request_seconds", "Seconds from a request's arrival to its final response (finished, "
                "cancelled or failed in the engine)"),
}


class TritonPythonModel:
    def initialize(self, args):
        config = ta.model_config(args)
        self.outputs = ta.Outputs(config)
        self.metrics = ta.Metrics("language", ["slots", "token_blocks", "visual_blocks", "kv_blocks"], COUNTERS,
                                  HISTOGRAMS, GAUGES)
        # Responses go out on their own thread: a send is a blocking round trip to the server
        # process, and the engine's next forward should not wait for it. Pieces that queue up
        # meanwhile for the same request leave as one response.
        self.outbox = queue.SimpleQueue()
        self.sender_thread = threading.Thread(target=self._send_loop, daemon=True)
        self.sender_thread.start()
        self.service = LanguageService(ta.settings(config))
        # Live gauges from their own thread: no IPC call on the engine's step, and a slot freed
        # after the last step (a release write returning) is still seen.
        self.stopping = threading.Event()
        self.metrics_thread = threading.Thread(target=self._metrics_loop, daemon=True)
        self.metrics_thread.start()

    def execute(self, requests):
        for request in requests:
            self._submit(request, time.perf_counter())
        return None

    def _submit(self, request, arrived):
        sender = request.get_response_sender()
        get = lambda name: ta.read(request, name)  # noqa: E731
        handle = first(get("handle"), bytes)
        try:
            try:
                params = self.service.sampling(**sampling_fields(get))
            except EpdError as bad_request:
                if handle is not None:
                    self.service.release(handle)  # the encoder staged this request: give its blocks back
                raise bad_request
            emit = self._emitter(sender, bool(first(get("stream")) or False))
            if handle is not None:
                self.service.submit(handle, params, emit, request.is_cancelled, arrived)
            else:
                prompt = EncodeRequest(*prompt_fields(get), messages=text_field(get, "messages"))
                probe = request.request_id().startswith(PROBE_ID_PREFIX)
                self.service.generate(prompt, params, emit, request.is_cancelled, arrived, probe)
        except EpdError as e:
            sender.send(ta.exception_response(e), flags=FINAL)
            self._update_metrics()

    def _send_loop(self):
        while (item := self.outbox.get()) is not None:
            batch = [item]
            while not self.outbox.empty() and (item := self.outbox.get()) is not None:
                batch.append(item)
            for sender, piece in merge_pieces(batch):
                self._respond(sender, piece)
            if item is None:
                return

    def _respond(self, sender, piece):
        if piece.error is not None:
            response, flags = ta.exception_response(piece.error), FINAL
        elif piece.finish_reason == "cancelled":
            response, flags = ta.error_response("request cancelled", "CANCELLED"), FINAL
        else:
            response = self.outputs.response(
                text_output=piece.text.encode(), finish_reason=(piece.finish_reason or "").encode(),
                num_input_tokens=piece.num_input_tokens, num_output_tokens=piece.num_output_tokens)
            flags = FINAL if piece.finish_reason else 0
        try:
            sender.send(response, flags=flags)
        except Exception:  # the client is gone; the engine finds out through is_cancelled
            pass
        if flags == FINAL:
            self._update_metrics()

    def _emitter(self, sender, stream):
        texts = []

        def emit(piece):  # called on the engine thread
            if stream or piece.error is not None or piece.finish_reason == "cancelled":
                self.outbox.put((sender, piece))
            else:
                texts.append(piece.text)
                if piece.finish_reason:
                    self.outbox.put((sender, dataclasses.replace(piece, text="".join(texts))))

        return emit

    def _metrics_loop(self):
        while not self.stopping.wait(0.1):
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
        self.stopping.set()
        self.service.close()
        self.outbox.put(None)
