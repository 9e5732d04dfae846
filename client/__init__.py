"""Client for the `language` model (the entry model; `ensemble` takes the same inputs): gRPC (stream_infer)
or HTTP (generate, generate_stream). Errors are RequestError with the Triton code as `code`."""

from __future__ import annotations

import base64
import json
import queue
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

from qwen3vl_epd.wire import Response, error_code, message_code, request_inputs, response_of

__all__ = ["RequestError", "Response", "data_url", "generate", "response_of", "text_of"]


class RequestError(Exception):
    """The server refused or failed the request. `code`: INVALID_ARG (fix the request), UNAVAILABLE
    (retry later), CANCELLED or INTERNAL; `status`: the transport's own (HTTP status, gRPC code)."""

    def __init__(self, status: str | None, message: str):
        self.code = error_code(status, message)
        self.status, self.message = status, message
        super().__init__(f"{self.code}: {message}")


def data_url(image: bytes) -> str:
    """An image as a base64 data URL, for the JSON of HTTP generate."""
    kind = "png" if image[:4] == b"\x89PNG" else "webp" if image[8:12] == b"WEBP" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(image).decode()}"


def generate(url: str, prompt: str | None, images: list[bytes] = (), protocol: str = "grpc", stream: bool = False,
             model: str = "language", timeout: float = 300.0, videos: list[bytes] = (), **sampling) -> Iterator[Response]:
    """Send one request; yields responses as they arrive. `videos`: container bytes (MP4, WebM, MKV
    ...); `sampling`: max_tokens, temperature, top_p, top_k, seed, stop, raw_prompt, ignore_eos,
    logprobs (Response.logprobs), video_fps or video_frames, and `messages` (a conversation in the
    OpenAI chat layout, list or JSON text) in place of `prompt` (None then)."""
    fields = {k: v for k, v in sampling.items() if v is not None}
    if not isinstance(fields.get("messages", ""), str):
        fields["messages"] = json.dumps(fields["messages"])
    if protocol == "grpc":
        yield from _grpc(url, model, prompt, list(images), stream, fields, timeout, list(videos))
    elif protocol == "http":
        yield from _http(url, model, prompt, list(images), stream, fields, timeout, list(videos))
    else:
        raise ValueError(f"protocol must be grpc or http, not {protocol!r}")


def text_of(responses: Iterator[Response]) -> tuple[str, Response]:
    """Concatenated text and the last response."""
    parts, last = [], None
    for last in responses:
        parts.append(last.text)
    return "".join(parts), last


_local = threading.local()


def _grpc_client(url: str):
    """One gRPC channel per thread and server, reused across requests (no handshake per request)."""
    import tritonclient.grpc as grpcclient

    clients = _local.__dict__.setdefault("clients", {})
    if url not in clients:
        clients[url] = grpcclient.InferenceServerClient(url)
    return clients[url]


def _grpc(url, model, prompt, images, stream, fields, timeout, videos):
    from tritonclient.utils import InferenceServerException

    results: queue.Queue = queue.Queue()
    client = _grpc_client(url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        try:
            client.async_stream_infer(model, request_inputs(prompt, images, stream, fields, videos),
                                     request_id=uuid.uuid4().hex)
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
    if not message_code(message) and str(status) == "StatusCode.UNAVAILABLE":
        message = f"{model}: the connection to the server was lost ({message}); retry"
    return RequestError(status, message)


def _http(url, model, prompt, images, stream, fields, timeout, videos):
    body = {"stream": stream, **fields, **({} if prompt is None else {"text_input": prompt})}
    if images:
        body["image"] = [data_url(i) for i in images]
    if videos:
        body["video"] = [f"data:video;base64,{base64.b64encode(v).decode()}" for v in videos]
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
                r = Response(msg["text_output"], msg["finish_reason"], msg["num_input_tokens"], msg["num_output_tokens"],
                             json.loads(msg.get("token_logprobs") or "[]"))
                yield r
                if r.finish_reason:
                    return
    except urllib.error.HTTPError as e:
        body = e.read().decode().strip().removeprefix("data:")
        raise RequestError(str(e.code), json.loads(body).get("error", body)) from None
