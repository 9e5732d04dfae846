"""Triton adapter `complete`: one request → language (stream off) by BLS → one response."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd import triton_adapter as ta
from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.serving import check_request
from qwen3vl_epd.triton_io import OUTPUTS, PROMPT_INPUTS, SAMPLING_INPUTS, first, sampling_fields


def _failed(error):
    """A BLS call's TritonError, passed on."""
    return ta.error_response(error.message(), error.code())


def _run(request, settings):
    # BLS in tritonserver 2.51 hands errors back as INTERNAL, so the request's own fields are
    # checked here first, where INVALID_ARG can still be answered.
    try:
        check_request(first(ta.read(request, "text_input")), sampling_fields(lambda n: ta.read(request, n)), settings)
    except EpdError as e:
        return ta.exception_response(e)
    stream = pb_utils.Tensor("stream", np.array([[False]]))
    generate = pb_utils.InferenceRequest(model_name="language", requested_output_names=list(OUTPUTS),
                                         inputs=[stream, *ta.present(request, PROMPT_INPUTS + SAMPLING_INPUTS)])
    for response in generate.exec(decoupled=True):
        if response.has_error():
            return _failed(response.error())
        if pb_utils.get_output_tensor_by_name(response, "text_output") is not None:
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.get_output_tensor_by_name(response, name) for name in OUTPUTS])
    return ta.error_response("language model sent no output")


class TritonPythonModel:
    def initialize(self, args):
        self.settings = ta.settings(ta.model_config(args))
        self.pool = ThreadPoolExecutor(max_workers=8)  # the requests of a batch wait on BLS side by side

    def execute(self, requests):
        return list(self.pool.map(lambda r: _run(r, self.settings), requests))

    def finalize(self):
        self.pool.shutdown()
