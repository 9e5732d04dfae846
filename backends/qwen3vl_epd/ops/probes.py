"""Liveness probes: one real tiny request per model the role serves, through the server's gRPC port."""

from __future__ import annotations

from dataclasses import dataclass

from qwen3vl_epd.wire import PROBE_ID_PREFIX, request_inputs


@dataclass
class Probe:
    """One real request per model the role serves, through the server's gRPC port."""

    url: str
    models: list[str]
    timeout_s: float = 3.0

    def failure(self, models: list[str] | None = None) -> str | None:
        """None when every model (of `models`, default all) answered as expected, else what went wrong."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        client = grpcclient.InferenceServerClient(self.url)
        try:
            for model in self.models if models is None else models:
                try:
                    if model == "language":
                        _language_probe(client, self.timeout_s)
                    else:  # the encoder runs its request and rejects the image: nothing is staged
                        _encoder_probe(client, self.timeout_s)
                except InferenceServerException as e:
                    return f"{model}: {e.message()}"
            return None
        finally:
            client.close()


def _encoder_probe(client, timeout_s: float) -> None:
    from tritonclient.utils import InferenceServerException

    try:
        client.infer("encoder", request_inputs("probe", [b"not an image"], None, {}),
                     request_id=PROBE_ID_PREFIX + "encoder", client_timeout=timeout_s)
    except InferenceServerException as e:
        if "cannot decode image" in (e.message() or ""):
            return
        raise


def _language_probe(client, timeout_s: float) -> None:
    """One token of a text-only prompt: the model process, its engine thread and sampling."""
    import queue

    from tritonclient.utils import InferenceServerException

    results = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put(error), stream_timeout=timeout_s)
    try:
        client.async_stream_infer("language", request_inputs("probe", [], None, {"max_tokens": 1}),
                                  request_id=PROBE_ID_PREFIX + "language")
        try:
            error = results.get(timeout=timeout_s)
        except queue.Empty:
            raise InferenceServerException(f"no answer within {timeout_s:g} s") from None
        if error is not None:
            raise error
    finally:
        client.stop_stream(cancel_requests=True)
