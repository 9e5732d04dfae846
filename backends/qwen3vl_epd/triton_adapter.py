"""The toolkit the three model.py adapters share: input reading, error responses, outputs typed by
the model config, metrics reported as deltas. Imports pb_utils, so it loads only inside Triton's
Python backend stub; everything testable without Triton is in triton_io.py."""

from __future__ import annotations

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from .settings import Settings
from .triton_io import coded_message, error_code, message_code

BLOCKS_IN_USE = ("epd_buffer_blocks_in_use", "Blocks (or slots) in use per buffer pool")
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]


def model_config(args: dict) -> dict:
    return json.loads(args["model_config"])


def settings(config: dict) -> Settings:
    return Settings.from_parameters(config.get("parameters", {}))


def read(request, name: str) -> np.ndarray | None:
    """An input as a numpy array, or None when the request lacks it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def present(request, names) -> list:
    """The request's input tensors among `names`, to pass on to another model by BLS."""
    return [t for t in (pb_utils.get_input_tensor_by_name(request, n) for n in names) if t is not None]


def error_response(message: str, code: str = "INTERNAL"):
    """A response carrying a TritonError with code `code` ("INVALID_ARG", ...), the message prefixed
    with it (triton_io.CODE_PREFIX); a message passed on from another model keeps its own code."""
    code = message_code(message) or code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(coded_message(message, code),
                                                                 getattr(pb_utils.TritonError, code)))


def exception_response(exc: BaseException):
    """The error response for an exception: typed errors keep their code, the rest are INTERNAL."""
    return error_response(str(exc), error_code(exc))


class Outputs:
    """Output tensors with the data types the model's config.pbtxt declares."""

    def __init__(self, config: dict):
        self.dtypes = {o["name"]: pb_utils.triton_string_to_numpy(o["data_type"]) for o in config["output"]}

    def tensor(self, name: str, value):
        return pb_utils.Tensor(name, np.array([[value]], dtype=self.dtypes[name]))

    def response(self, **values):
        return pb_utils.InferenceResponse(output_tensors=[self.tensor(k, v) for k, v in values.items()])


class Metrics:
    """One model's counters and block gauges; report() sends only what changed since the last call."""

    def __init__(self, side: str, pools: list[str], counters: dict[str, tuple[str, str]],
                 histograms: dict[str, tuple[str, str]] | None = None, gauges: dict[str, tuple[str, str]] | None = None):
        family = pb_utils.MetricFamily
        histograms, gauges = histograms or {}, gauges or {}
        # Families must outlive their metrics, so they are kept here.
        self.families = [family(*BLOCKS_IN_USE, family.GAUGE)]
        self.families += [family(name, help_text, family.COUNTER) for name, help_text in counters.values()]
        self.families += [family(name, help_text, family.HISTOGRAM) for name, help_text in histograms.values()]
        self.gauges = {pool: self.families[0].Metric({"side": side, "pool": pool}) for pool in pools}
        self.counters = {key: f.Metric({}) for key, f in zip(counters, self.families[1:])}
        self.histograms = {key: f.Metric({}, buckets=SECONDS_BUCKETS)
                           for key, f in zip(histograms, self.families[1 + len(counters):])}
        for key, (name, help_text) in gauges.items():
            self.families.append(family(name, help_text, family.GAUGE))
            self.gauges[key] = self.families[-1].Metric({})
        self.last: dict[str, float] = {}
        self._lock = threading.Lock()

    def report(self, values: dict[str, float]) -> None:
        """Gauges (keyed by pool) set to their value; counters increased by their total's growth."""
        with self._lock:
            for key, value in values.items():
                before = self.last.get(key, 0)
                if value == before:
                    continue
                if key in self.counters:
                    self.counters[key].increment(value - before)
                else:
                    self.gauges[key].set(value)
                self.last[key] = value

    def observe(self, timings) -> None:
        """Drain (name, seconds) pairs from a deque into their histograms."""
        with self._lock:
            while timings:
                name, seconds = timings.popleft()
                self.histograms[name].observe(seconds)
