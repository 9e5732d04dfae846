"""Triton adapter of the language model (decoupled): handle + sampling → LanguageService → streamed text."""

import json
import queue
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.serving import LanguageService
from qwen3vl_epd.settings import Settings
from qwen3vl_epd.triton_io import error_code, first, sampling_fields

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _error(message, code):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


def _response(text, finish_reason, n_in, n_out):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_)),
        pb_utils.Tensor("finish_reason", np.array([[(finish_reason or "").encode()]], dtype=np.object_)),
        pb_utils.Tensor("num_input_tokens", np.array([[n_in]], dtype=np.int32)),
        pb_utils.Tensor("num_output_tokens", np.array([[n_out]], dtype=np.int32)),
    ])


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.service = LanguageService(Settings.from_parameters(config.get("parameters", {})))
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        family = pb_utils.MetricFamily
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
                       for p in ("slots", "token_blocks", "visual_blocks")}
        self.requests = queue.Queue()
        self.worker = threading.Thread(target=self._loop, daemon=True)
        self.worker.start()

    def execute(self, requests):
        for request in requests:
            self.requests.put((request, time.perf_counter()))
        return None

    def _loop(self):
        while (item := self.requests.get()) is not None:
            request, arrived = item
            sender = request.get_response_sender()
            try:
                self._serve(request, sender, arrived)
            except EpdError as e:
                sender.send(_error(str(e), error_code(e)), flags=FINAL)
            except Exception as e:  # one request's failure never takes the model down
                sender.send(_error(f"internal error: {e!r}", "INTERNAL"), flags=FINAL)
            self._update_metrics()

    def _serve(self, request, sender, arrived):
        handle = _input(request, "handle").reshape(-1)[0]
        try:
            params = self.service.sampling(**sampling_fields(lambda name: _input(request, name)))
        except EpdError:
            self.service.release(handle)  # the encoder staged this request: give its blocks back
            raise
        stream = bool(first(_input(request, "stream")) or False)
        pieces = []
        for piece in self.service.generate(handle, params, request.is_cancelled, arrived):
            if piece.finish_reason == "cancelled":
                sender.send(_error("request cancelled", "CANCELLED"), flags=FINAL)
                return
            if stream:
                sender.send(_response(piece.text, piece.finish_reason, piece.num_input_tokens, piece.num_output_tokens),
                            flags=FINAL if piece.finish_reason else 0)
            else:
                pieces.append(piece.text)
                if piece.finish_reason:
                    sender.send(_response("".join(pieces), piece.finish_reason, piece.num_input_tokens,
                                          piece.num_output_tokens), flags=FINAL)

    def _update_metrics(self):
        s, stats = self.service, self.service.puller.stats
        for key, total in (("bytes", stats.bytes_read), ("seconds", stats.seconds), ("ttft", s.ttft_seconds),
                           ("first_tokens", s.ttft_count), ("tokens", s.output_tokens)):
            self.metrics[key].increment(total - getattr(self, "_last_" + key, 0))
            setattr(self, "_last_" + key, total)
        for pool, value in s.buffers.in_use().items():
            self.in_use[pool].set(value)

    def finalize(self):
        self.requests.put(None)
        self.worker.join(timeout=30)
        self.service.close()
