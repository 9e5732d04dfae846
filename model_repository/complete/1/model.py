"""Triton adapter `complete`: one request → encoder, then language (stream off) by BLS → one response."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.serving import check_request
from qwen3vl_epd.settings import Settings
from qwen3vl_epd.triton_io import first, sampling_fields

ENCODER_INPUTS = ("text_input", "image", "raw_prompt", "max_tokens", "temperature", "top_p", "top_k", "seed",
                  "ignore_eos", "stop")
LANGUAGE_INPUTS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "ignore_eos", "stop")
OUTPUTS = ["text_output", "finish_reason", "num_input_tokens", "num_output_tokens"]


def _tensor(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _inputs(request, names):
    return [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in names) if t is not None]


def _failed(error):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(error.message(), error.code()))


def _run(request, settings):
    # BLS in tritonserver 2.51 hands errors back as INTERNAL, so the request's own fields are
    # checked here first, where INVALID_ARG can still be answered.
    try:
        check_request(first(_tensor(request, "text_input")), sampling_fields(lambda n: _tensor(request, n)), settings)
    except EpdError as e:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), getattr(pb_utils.TritonError, e.code)))
    encoded = pb_utils.InferenceRequest(model_name="encoder", requested_output_names=["handle"],
                                        inputs=_inputs(request, ENCODER_INPUTS)).exec()
    if encoded.has_error():
        return _failed(encoded.error())
    handle = pb_utils.get_output_tensor_by_name(encoded, "handle")
    stream = pb_utils.Tensor("stream", np.array([[False]]))
    generate = pb_utils.InferenceRequest(model_name="language", requested_output_names=OUTPUTS,
                                         inputs=[handle, stream, *_inputs(request, LANGUAGE_INPUTS)])
    for response in generate.exec(decoupled=True):
        if response.has_error():
            return _failed(response.error())
        if pb_utils.get_output_tensor_by_name(response, "text_output") is not None:
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.get_output_tensor_by_name(response, name) for name in OUTPUTS])
    return pb_utils.InferenceResponse(error=pb_utils.TritonError("language model sent no output"))


class TritonPythonModel:
    def initialize(self, args):
        self.settings = Settings.from_parameters(json.loads(args["model_config"]).get("parameters", {}))
        self.pool = ThreadPoolExecutor(max_workers=8)  # the requests of a batch wait on BLS side by side

    def execute(self, requests):
        return list(self.pool.map(lambda r: _run(r, self.settings), requests))

    def finalize(self):
        self.pool.shutdown()
