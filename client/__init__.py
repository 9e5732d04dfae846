"""Client for the `language` model (the door; `ensemble` takes the same inputs): gRPC (stream_infer)
or HTTP (generate, generate_stream). Errors are RequestError with the Triton code as `code`."""

from __future__ import annotations

import base64
import json
import queue
import re
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Response:
    """One response: new text (the whole text when not streaming); finish_reason on the last."""

    text: str
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int


# The server puts the code at the front of every error message ("[INVALID_ARG] ..."): the one
# way it reaches a gRPC stream client, which gets no status code from tritonserver 2.51.
_CODE = re.compile(r"\[([A-Z_]+)\] ")
_BY_STATUS = {"400": "INVALID_ARG", "503": "UNAVAILABLE", "499": "CANCELLED", "StatusCode.INVALID_ARGUMENT":
              "INVALID_ARG", "StatusCode.UNAVAILABLE": "UNAVAILABLE", "StatusCode.CANCELLED": "CANCELLED"}


class RequestError(Exception):
    """The server refused or failed the request. `code`: INVALID_ARG (fix the request), UNAVAILABLE
    (retry later), CANCELLED or INTERNAL; `status`: the transport's own (HTTP status, gRPC code)."""

    def __init__(self, status: str | None, message: str):
        found = _CODE.search(message)
        if found:
            self.code = found.group(1)
        elif "is not healthy" in message:  # tritonserver's own word for a model process that is gone
            self.code = "UNAVAILABLE"
        else:
            self.code = _BY_STATUS.get(str(status), "INTERNAL")
        self.status, self.message = status, message
        super().__init__(f"{self.code}: {message}")


def data_url(image: bytes) -> str:
    """An image as a base64 data URL, for the JSON of HTTP generate."""
    kind = "png" if image[:4] == b"\x89PNG" else "webp" if image[8:12] == b"WEBP" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def generate(url: str, prompt: str | None, images: list[bytes] = (), protocol: str = "grpc", stream: bool = False,
             model: str = "language", timeout: float = 300.0, **sampling) -> Iterator[Response]:
    """Send one request; yields responses as they arrive. `sampling`: max_tokens, temperature,
    top_p, top_k, seed, stop, raw_prompt, ignore_eos, and `messages` (a conversation in the OpenAI
    chat layout, list or JSON text) in place of `prompt` (None then)."""
    fields = {k: v for k, v in sampling.items() if v is not None}
    if not isinstance(fields.get("messages", ""), str):
        fields["messages"] = json.dumps(fields["messages"])
    if protocol == "grpc":
        yield from _grpc(url, model, prompt, list(images), stream, fields, timeout)
    elif protocol == "http":
        yield from _http(url, model, prompt, list(images), stream, fields, timeout)
    else:
        raise ValueError(f"protocol must be grpc or http, not {protocol!r}")


def response_of(result) -> Response:
    """A tritonclient gRPC InferResult of the language model (sync or asyncio client alike)."""
    return Response(
        text=result.as_numpy("text_output").reshape(-1)[0].decode(),
        finish_reason=result.as_numpy("finish_reason").reshape(-1)[0].decode(),
        num_input_tokens=int(result.as_numpy("num_input_tokens").reshape(-1)[0]),
        num_output_tokens=int(result.as_numpy("num_output_tokens").reshape(-1)[0]),
    )


def text_of(responses: Iterator[Response]) -> tuple[str, Response]:
    """Concatenated text and the last response."""
    parts, last = [], None
    for last in responses:
        parts.append(last.text)
    return "".join(parts), last


_TYPES = {"max_tokens": ("INT32", np.int32), "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32),
          "top_k": ("INT32", np.int32), "seed": ("UINT64", np.uint64), "raw_prompt": ("BOOL", np.bool_),
          "ignore_eos": ("BOOL", np.bool_),
          "stream": ("BOOL", np.bool_)}


def grpc_inputs(prompt: str | None, images: list[bytes], stream: bool, fields: dict) -> list:
    """The request tensors of `generate` (the OpenAI door and the benches build theirs here too)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, dtype, array):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("stream", "BOOL", np.array([[stream]], dtype=np.bool_))]
    if prompt is not None:
        inputs.append(tensor("text_input", "BYTES", np.array([[prompt.encode()]], dtype=np.object_)))
    if images:
        inputs.append(tensor("image", "BYTES", np.array([images], dtype=np.object_)))
    for name, value in fields.items():
        if name == "stop":
            inputs.append(tensor("stop", "BYTES", np.array([[s.encode() for s in value]], dtype=np.object_)))
        elif name == "messages":
            inputs.append(tensor(name, "BYTES", np.array([[value.encode()]], dtype=np.object_)))
        else:
            triton_type, np_type = _TYPES[name]
            inputs.append(tensor(name, triton_type, np.array([[value]], dtype=np_type)))
    return inputs


_local = threading.local()


def _grpc_client(url: str):
    """One gRPC channel per thread and server, reused across requests (no handshake per request)."""
    import tritonclient.grpc as grpcclient

    clients = _local.__dict__.setdefault("clients", {})
    if url not in clients:
        clients[url] = grpcclient.InferenceServerClient(url)
    return clients[url]


def _grpc(url, model, prompt, images, stream, fields, timeout):
    from tritonclient.utils import InferenceServerException

    results: queue.Queue = queue.Queue()
    client = _grpc_client(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        try:
            client.async_stream_infer(model, grpc_inputs(prompt, images, stream, fields), request_id=uuid.uuid4().hex)
        except InferenceServerException as e:  # the stream broke at once (server gone): its cause, if known
            try:
                _, error = results.get(timeout=1)
            except queue.Empty:
                error = None
            raise _stream_error(model, error or e, "StatusCode.UNAVAILABLE") from None
        while True:
            result, error = results.get(timeout=timeout)
            if error is not None:
                raise _stream_error(model, error)
            if result.as_numpy("text_output") is None:
                raise RequestError(None, "the server ended the request without output")
            r = response_of(result)
            yield r
            if r.finish_reason:
                return
    finally:
        client.stop_stream(cancel_requests=True)


def _stream_error(model: str, error, default_status: str | None = None) -> RequestError:
    """A stream's error; one without a code from the server is the connection's own (the server or
    a model process went away mid-request, and the supervisor restarts it): named as such."""
    status, message = error.status() or default_status, error.message() or ""
    if not _CODE.search(message) and str(status) == "StatusCode.UNAVAILABLE":
        message = f"{model}: the connection to the server was lost ({message}); retry"
    return RequestError(status, message)


def _http(url, model, prompt, images, stream, fields, timeout):
    body = {"stream": stream, **fields, **({} if prompt is None else {"text_input": prompt})}
    if images:
        body["image"] = [data_url(i) for i in images]
    endpoint = "generate_stream" if stream else "generate"
    base = url if url.startswith("http") else f"http://{url}"
    request = urllib.request.Request(f"{base}/v2/models/{model}/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            lines = (line.decode() for line in reply) if stream else [reply.read().decode()]
            for line in lines:
                line = line.strip()
                if not line:
                    continue
                msg = json.loads(line.removeprefix("data:"))
                if "error" in msg:
                    raise RequestError(None, msg["error"])
                r = Response(msg["text_output"], msg["finish_reason"], msg["num_input_tokens"], msg["num_output_tokens"])
                yield r
                if r.finish_reason:
                    return
    except urllib.error.HTTPError as e:
        body = e.read().decode().strip().removeprefix("data:")
        raise RequestError(str(e.code), json.loads(body).get("error", body)) from None
