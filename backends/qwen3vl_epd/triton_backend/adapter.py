"""What the three model.py adapters share: input reading, error responses, outputs typed by the
model config, logging into Triton's log. Imports pb_utils, so it loads only inside Triton's
Python backend stub; what is testable without Triton is in inputs.py and outbox.py."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

import numpy as np
import triton_python_backend_utils as pb_utils

from qwen3vl_epd.errors import EpdError
from qwen3vl_epd.settings import Settings
from qwen3vl_epd.wire import coded_message, message_code


class TritonLog(logging.Handler):
    """The package's log records into tritonserver's log (pb_utils.Logger), tracebacks included."""

    def emit(self, record: logging.LogRecord) -> None:
        log = pb_utils.Logger
        write = (log.log_error if record.levelno >= logging.ERROR else
                 log.log_warn if record.levelno >= logging.WARNING else log.log_info)
        write(self.format(record))


def start(args: dict, settings_type: type[Settings]) -> tuple[dict, Settings]:
    """The model config and its settings; the package's logger writes to Triton's log from here on."""
    root = logging.getLogger("qwen3vl_epd")
    if not any(isinstance(h, TritonLog) for h in root.handlers):
        handler = TritonLog()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    config = json.loads(args["model_config"])
    return config, settings_type.from_parameters(config.get("parameters", {}))


def read(request, name: str) -> np.ndarray | None:
    """An input as a numpy array, or None when the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def present(request, names) -> list:
    """The request's input tensors among `names`, to pass on to another model by BLS."""
    return [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in names) if t is not None]


def error_response(message: str, code: str = "INTERNAL"):
    """A response carrying a TritonError with code `code` ("INVALID_ARG", ...), the message prefixed
    with it (wire.CODE_PREFIX); a message passed on from another model keeps its own code."""
    code = message_code(message) or code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(coded_message(message, code),
                                                                 getattr(pb_utils.TritonError, code)))


def exception_response(exc: BaseException):
    """The error response for an exception: typed errors keep their code, the rest are INTERNAL."""
    return error_response(str(exc), exc.code if isinstance(exc, EpdError) else "INTERNAL")


class Outputs:
    """Output tensors with the data types the model's config.pbtxt declares."""

    def __init__(self, config: dict):
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def tensor(self, name: str, value):
        return pb_utils.Tensor(name, np.array([[value]], dtype=self.dtypes[name]))

    def response(self, **values):
        return pb_utils.InferenceResponse(output_tensors=[self.tensor(k, v) for k, v in values.items()])


def every(interval_s: float, fn: Callable[[], None]) -> threading.Event:
    """Call fn every interval_s on a thread of its own (metrics), until the returned event is set."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval_s):
            fn()

    threading.Thread(target=loop, name="epd-every", daemon=True).start()
    return stop
