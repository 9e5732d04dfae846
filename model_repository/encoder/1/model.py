"""Triton adapter of the encoder: requests → qwen3vl_epd EncoderService → handles (BYTES)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd.serving import EncodeRequest, EncoderService
from qwen3vl_epd.settings import Settings
from qwen3vl_epd.triton_io import byte_items, error_code, first, sampling_fields


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        family, counter = pb_utils.MetricFamily, pb_utils.MetricFamily.COUNTER
        # Families must outlive their metrics, so they are kept on the model.
        self.families = [
            family("epd_buffer_blocks_in_use", "Blocks (or slots) in use per buffer pool", family.GAUGE),
            family("epd_encode_seconds_total", "Seconds spent encoding (decode, vision tower, staging)", counter),
            family("epd_encode_requests_total", "Requests the encoder processed (including rejected ones)", counter),
        ]
        self.in_use = {pool: self.families[0].Metric({"side": "encoder", "pool": pool})
                       for pool in ("slots", "token_blocks", "visual_blocks")}
        self.encode_seconds = self.families[1].Metric({})
        self.encode_requests = self.families[2].Metric({})
        self.reported = {}
        self.service = EncoderService(Settings.from_parameters(config.get("parameters", {})), on_tick=self._metrics)

    def _metrics(self):
        """On the service's background thread: set what changed since the last call."""
        s = self.service
        values = {**s.buffers.in_use(), "seconds": s.encode_seconds, "requests": s.encode_count}
        for key, value in values.items():
            if value != self.reported.get(key, 0):
                if key == "seconds":
                    self.encode_seconds.increment(value - self.reported.get(key, 0))
                elif key == "requests":
                    self.encode_requests.increment(value - self.reported.get(key, 0))
                else:
                    self.in_use[key].set(value)
        self.reported = values

    def execute(self, requests):
        parsed, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                text = first(_input(request, "text_input"))
            except UnicodeDecodeError:
                responses[i] = self._error("text_input: not valid UTF-8", "INVALID_ARG")
                continue
            get = lambda name, r=request: _input(r, name)  # noqa: E731
            parsed.append((i, EncodeRequest(text, byte_items(get("image")), bool(first(get("raw_prompt")) or False),
                                            sampling_fields(get))))
        results = self.service.encode([r for _, r in parsed])
        for (i, _), result in zip(parsed, results):
            if isinstance(result, Exception):
                responses[i] = self._error(str(result), error_code(result))
            else:
                handle = pb_utils.Tensor("handle", np.array([[result]], dtype=np.object_))
                responses[i] = pb_utils.InferenceResponse(output_tensors=[handle])
        return responses

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))

    def finalize(self):
        self.service.close()
