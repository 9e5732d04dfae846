"""EncoderPool: the language side's client of the encoder servers. One gRPC channel to the pool's
target; gRPC's own round_robin spreads requests over every address the target names or resolves
to, and its retry policy moves a request whose encoder died before answering onto another."""

from __future__ import annotations

import ipaddress
import json
import threading
import time

import grpc
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from qwen3vl_epd.errors import EpdError, InvalidInputError, UnavailableError
from qwen3vl_epd.prompt.video_processing import VideoOptions
from qwen3vl_epd.wire import error_code, request_inputs

# UNAVAILABLE is what a dead or unreachable encoder gives, and what an encoder with full pools
# answers: either way another encoder may do better. Three attempts in all (gRPC allows five).
RETRY_POLICY = {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.5s", "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"]}
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [{"name": [{"service": "inference.GRPCInferenceService", "method": "ModelInfer"}],
                      "retryPolicy": RETRY_POLICY}],
}
CHANNEL_ARGS = [
    ("grpc.service_config", json.dumps(SERVICE_CONFIG)),
    ("grpc.enable_retries", 1),
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    # gRPC keeps a request for a retry only up to this size (default 256 KiB; images are larger).
    ("grpc.per_rpc_retry_buffer_size", 256 << 20),
    ("grpc.retry_buffer_size", 1 << 30),
    # A restarted encoder is back in the rotation within a second, not gRPC's default of up to 120 s;
    # the minimum is also the connect timeout of one attempt.
    ("grpc.initial_reconnect_backoff_ms", 1000),
    ("grpc.min_reconnect_backoff_ms", 1000),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.dns_min_time_between_resolutions_ms", 1000),  # DNS targets: scaled pools are seen soon
]


def on_this_host(target: str) -> bool:
    """Whether every address a gRPC target names is loopback or a unix socket (a name other than
    localhost is taken as another host)."""
    if target.startswith("unix:"):
        return True
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        target = target.removeprefix(scheme)
    hosts = [a[1 : a.index("]")] if a.startswith("[") else a.rpartition(":")[0] or a for a in target.split(",")]
    return all(h == "localhost" or _loopback(h) for h in hosts)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EncoderPool:
    """encode() sends a prompt to the pool's `encoder` model and returns the signed handle; errors
    keep the encoder's code (INVALID_ARG, UNAVAILABLE) and name the pool when it is unreachable."""

    def __init__(self, target: str, timeout_s: float = 600.0, wait_s: float = 10.0, model: str = "encoder"):
        self.target, self.timeout_s, self.wait_s, self.model = target, timeout_s, wait_s, model
        self.on_this_host = on_this_host(target)  # its encoders share our cores
        self.client = grpcclient.InferenceServerClient(target, channel_args=CHANNEL_ARGS)
        self.retries = 0  # encodes sent again after their encoder became unreachable
        self._lock = threading.Lock()

    def encode(self, text: str, images: list[bytes], raw_prompt: bool = False, videos: list[bytes] = (),
               options: VideoOptions = VideoOptions(), language_idle: bool = False) -> bytes:
        """`language_idle`: the sender computes nothing now (told only to an encoder on this host,
        which may then take every core)."""
        inputs = self.inputs(text, images, raw_prompt, videos, options, language_idle)
        deadline = time.monotonic() + self.wait_s
        while True:
            self._wait_ready(deadline)
            try:
                result = self.client.infer(self.model, inputs, client_timeout=self.timeout_s)
                return result.as_numpy("handle").reshape(-1)[0]
            except InferenceServerException as e:
                if "UNAVAILABLE" in str(e.status()) and not self._ready(0.1):
                    # Its encoder went away and gRPC's own retries found no other: wait for one.
                    self.count_retry()
                    continue
                raise self._error(e) from None

    def inputs(self, text: str, images: list[bytes], raw_prompt: bool, videos: list[bytes], options: VideoOptions,
               language_idle: bool) -> list:
        fields = {"raw_prompt": raw_prompt, "video_fps": options.fps, "video_frames": options.num_frames,
                  "language_idle": language_idle if self.on_this_host else None}
        return request_inputs(text, images, None, fields, videos)

    def count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def close(self) -> None:
        self.client.close()

    def _ready(self, timeout: float) -> bool:
        """Whether the channel has (or within `timeout` gets) a connection to some encoder."""
        try:
            grpc.channel_ready_future(self.client._channel).result(timeout=max(timeout, 0.01))
            return True
        except grpc.FutureTimeoutError:
            return False

    def _wait_ready(self, deadline: float) -> None:
        if not self._ready(deadline - time.monotonic()):
            raise UnavailableError(f"no encoder of the pool {self.target!r} is reachable "
                                   f"(waited {self.wait_s:g} s, encoder_wait_s)")

    def _error(self, e: InferenceServerException) -> EpdError:
        status, message = str(e.status()), e.message()
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return UnavailableError(f"encoder pool {self.target!r}: no answer within {self.timeout_s:g} s "
                                    "(encode_timeout_s)")
        code = error_code(status, message)
        if code == "INVALID_ARG":
            return InvalidInputError(message)
        if code == "UNAVAILABLE":
            return UnavailableError(message)
        return EpdError(f"encoder pool {self.target!r}: {message}")

