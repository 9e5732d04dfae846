"""Triton adapter `complete`: one request → language (stream off) by BLS → one response."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd.triton_backend import adapter as ta
from qwen3vl_epd.wire import OUTPUTS, PROMPT_INPUTS, SAMPLING_INPUTS


def _run(request):
    stream = pb_utils.Tensor("stream", np.array([[False]]))
    generate = pb_utils.InferenceRequest(model_name="language", requested_output_names=list(OUTPUTS),
                                         inputs=[stream, *ta.present(request, PROMPT_INPUTS + SAMPLING_INPUTS)])
    for response in generate.exec(decoupled=True):
        if response.has_error():
            # BLS hands every error back as INTERNAL; the code the language model gave it is in
            # the message (wire.CODE_PREFIX), and error_response keeps that one.
            return ta.error_response(response.error().message())
        if pb_utils.get_output_tensor_by_name(response, "text_output") is not None:
            return pb_utils.InferenceResponse(
                output_tensors=[pb_utils.get_output_tensor_by_name(response, name) for name in OUTPUTS])
    return ta.error_response("language model sent no output")


class TritonPythonModel:
    def initialize(self, args):
        self.pool = ThreadPoolExecutor(max_workers=8)  # the requests of a batch wait on BLS side by side

    def execute(self, requests):
        return list(self.pool.map(_run, requests))

    def finalize(self):
        self.pool.shutdown()
