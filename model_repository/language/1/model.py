"""Triton adapter of the language model (decoupled): handle + sampling → the engine → streamed text."""

import dataclasses
import json
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.serving import LanguageService, merge_pieces
from qwen3vl_epd.settings import Settings
from qwen3vl_epd.triton_io import error_code, first, sampling_fields

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


def _response(text, piece):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([[(piece.finish_reason or "").encode()]], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([[piece.num_input_tokens]], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([[piece.num_output_tokens]], dtype=np.int32)),
    ])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        family, counter, gauge = pb_utils.MetricFamily, pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        # Families must outlive their metrics, so they are kept on the model.
        self.families = {
            "bytes": family("epd_transfer_bytes_total", "Bytes pulled from encoders", counter),
            "seconds": family("epd_transfer_seconds_total", "Seconds spent in Mooncake reads", counter),
            "ttft": family("epd_time_to_first_token_seconds_total", "Sum of times to first token", counter),
            "first_tokens": family("epd_first_tokens_total", "Requests that produced a first token", counter),
            "tokens": family("epd_output_tokens_total", "Output tokens generated", counter),
            "blocks": family("epd_buffer_blocks_in_use", "Blocks (or slots) in use per buffer pool", gauge),
        }
        self.metrics = {k: f.Metric({}) for k, f in self.families.items() if k != "blocks"}
        self.in_use = {p: self.families["blocks"].Metric({"side": "language", "pool": p})
                       for p in ("slots", "token_blocks", "visual_blocks", "kv_blocks")}
        self.last, self.metrics_lock, self.metrics_at = {}, threading.Lock(), 0.0
        # Responses go out on their own thread: a send is a blocking round trip to the server
        # process, and the engine's next forward should not wait for it. Pieces that queue up
        # meanwhile for the same request leave as one response.
        self.outbox = queue.SimpleQueue()
        self.sender_thread = threading.Thread(target=self._send_loop, daemon=True)
        self.sender_thread.start()
        self.service = LanguageService(Settings.from_parameters(config.get("parameters", {})), self._on_step)

    def execute(self, requests):
        for request in requests:
            self._submit(request, time.perf_counter())
        return None

    def _submit(self, request, arrived):
        sender = request.get_response_sender()
        handle = _input(request, "handle").reshape(-1)[0]
        try:
            try:
                params = self.service.sampling(**sampling_fields(lambda name: _input(request, name)))
            except EpdError as bad_request:
                self.service.release(handle)  # the encoder staged this request: give its blocks back
                raise bad_request
            stream = bool(first(_input(request, "stream")) or False)
            self.service.submit(handle, params, self._emitter(sender, stream), request.is_cancelled, arrived)
        except EpdError as e:
            sender.send(_error(str(e), error_code(e)), flags=FINAL)
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
            response, flags = _error(str(piece.error), error_code(piece.error)), FINAL
        elif piece.finish_reason == "cancelled":
            response, flags = _error("request cancelled", "CANCELLED"), FINAL
        else:
            response, flags = _response(piece.text, piece), FINAL if piece.finish_reason else 0
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

    def _on_step(self):
        if time.monotonic() - self.metrics_at > 0.1:  # live gauges without an IPC call every step
            self._update_metrics()

    def _update_metrics(self):
        with self.metrics_lock:
            self.metrics_at = time.monotonic()
            self._set_metrics()

    def _set_metrics(self):
        engine, stats = self.service.engine, self.service.puller.stats
        for key, total in (("bytes", stats.bytes_read), ("seconds", stats.seconds), ("ttft", engine.ttft_seconds),
                           ("first_tokens", engine.ttft_count), ("tokens", engine.output_tokens)):
            self.metrics[key].increment(total - self.last.get(key, 0))
            self.last[key] = total
        for pool, value in engine.in_use().items():
            self.in_use[pool].set(value)

    def finalize(self):
        self.service.close()  # drains or cancels in-flight requests, joins the engine thread
        self.outbox.put(None)
        self.sender_thread.join(timeout=30)
