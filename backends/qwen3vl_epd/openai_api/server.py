"""The OpenAI-compatible server: /v1/models and /v1/chat/completions over aiohttp, each request one
gRPC stream to the `language` model; a client that leaves cancels its stream, so the engine stops."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass

import grpc
from aiohttp import ClientError, ClientSession, ClientTimeout, web

from qwen3vl_epd.openai_api import protocol as api
from qwen3vl_epd.openai_api.protocol import OpenAIError
from qwen3vl_epd.openai_api.tools import CallStream, parse_calls
from qwen3vl_epd.wire import Response, request_inputs, response_of

RETRY_AFTER_S = 1


@dataclass
class ServerConfig:
    triton_url: str = "127.0.0.1:8001"
    served_model: str = "qwen3-vl"
    model: str = "language"  # the Triton model this server calls
    api_key: str | None = None
    allow_remote_images: bool = False
    max_image_bytes: int = 20 * 1024 * 1024
    fetch_timeout_s: float = 10.0
    max_body_bytes: int = 256 * 1024 * 1024  # eight 20 MiB images as base64 fit


class ChatServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.created = int(time.time())
        self.client = None  # made on the event loop (grpc.aio channels belong to one)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/health", self.health)
        app.on_startup.append(self._connect)
        app.on_cleanup.append(self._close)
        return app

    async def _connect(self, app) -> None:
        import tritonclient.grpc.aio as grpcclient

        self.client = grpcclient.InferenceServerClient(self.config.triton_url)

    async def _close(self, app) -> None:
        await self.client.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """API key check, and every OpenAIError as OpenAI's error object."""
        key = self.config.api_key
        try:
            if key and request.path.startswith("/v1/") and request.headers.get("Authorization") != f"Bearer {key}":
                raise OpenAIError(401, "Incorrect API key provided", "invalid_request_error", code="invalid_api_key")
            return await handler(request)
        except OpenAIError as e:
            # 503 is back-pressure or a restart: the client may retry, and is told when.
            headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
            return web.json_response(e.body(), status=e.status, headers=headers)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(api.models(self.config.served_model, self.created))

    async def health(self, request: web.Request) -> web.Response:
        try:
            ready = await self.client.is_model_ready(self.config.model)
        except Exception:
            ready = False
        return web.Response(status=200 if ready else 503, text="ok" if ready else "not ready")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.invalid(f"the request body is not valid JSON: {e}") from None
        chat = api.chat_request(body, self.config.served_model)
        await self._fetch_remote_images(chat)
        cid = api.completion_id()
        outputs = self._generate(chat)
        try:
            first = await anext(outputs)  # errors of the request itself still get their HTTP status
            if not chat.stream:
                text, calls = parse_calls(first.text) if chat.tools else (first.text, [])
                return web.json_response(api.completion(
                    cid, self.config.served_model, text, "tool_calls" if calls else first.finish_reason,
                    first.num_input_tokens, first.num_output_tokens,
                    api.logprobs_object(first.logprobs) if chat.logprobs else None, calls))
            return await self._stream(request, chat, cid, first, outputs)
        finally:
            await outputs.aclose()

    async def _stream(self, request, chat, cid, first: Response, outputs) -> web.StreamResponse:
        """Server-sent events: a role chunk, content chunks, the finish chunk, usage if asked, [DONE]."""
        model = self.config.served_model
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(obj) -> None:
            await response.write(f"data: {json.dumps(obj)}\n\n".encode())

        await send(api.chunk(cid, model, {"role": "assistant", "content": ""}))
        out, calls = first, CallStream() if chat.tools else None
        try:
            while True:
                text = calls.feed(out.text) if calls else out.text
                if text or out.logprobs:
                    logprobs = api.logprobs_object(out.logprobs) if chat.logprobs else None
                    await send(api.chunk(cid, model, {"content": text}, logprobs=logprobs))
                if out.finish_reason:
                    reason = out.finish_reason
                    if calls:
                        rest, parsed = calls.finish()
                        if rest:
                            await send(api.chunk(cid, model, {"content": rest}))
                        for i, call in enumerate(parsed):  # one delta per call, as the SDK assembles them
                            await send(api.chunk(cid, model, {"tool_calls": [{"index": i, **call}]}))
                        reason = "tool_calls" if parsed else reason
                    await send(api.chunk(cid, model, {}, reason))
                    if chat.include_usage:
                        await send(api.chunk(cid, model, None, usage_=api.usage(out.num_input_tokens,
                                                                                out.num_output_tokens)))
                    break
                out = await anext(outputs)
        except OpenAIError as e:  # after the headers went out, an error travels as an event
            await send(e.body())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _generate(self, chat: api.ChatRequest):
        """The model's responses for one request; OpenAIError for its errors. Leaving early (the
        client went away, or the handler was cancelled) cancels the gRPC stream, and so the request."""
        finished = asyncio.Event()

        async def requests():
            inputs = request_inputs(None, [], chat.stream, chat.fields())
            yield {"model_name": self.config.model, "inputs": inputs, "request_id": uuid.uuid4().hex}
            await finished.wait()  # the stream stays open until the last response

        call = self.client.stream_infer(requests())
        try:
            async for result, error in call:
                if error is not None:
                    raise OpenAIError.from_model(error.message())
                out = response_of(result)
                yield out
                if out.finish_reason:
                    return
            raise OpenAIError(502, f"{self.config.model}: the stream ended without a final response", "internal_error")
        except grpc.RpcError as e:
            raise OpenAIError(503, f"{self.config.model}: the connection to tritonserver at {self.config.triton_url} "
                              f"failed ({e.code().name}: {e.details()}); retry", "service_unavailable") from None
        finally:
            finished.set()
            call.cancel()

    async def _fetch_remote_images(self, chat: api.ChatRequest) -> None:
        """http(s) image URLs → data: URLs, when enabled; refused otherwise."""
        if not chat.remote_images:
            return
        if not self.config.allow_remote_images:
            param = chat.remote_images[0][0]
            raise api.invalid(f"{param}: remote image URLs are not fetched by this server; send the image as a "
                              "data: URL (or start the OpenAI server with --allow-remote-images)", param)
        timeout = ClientTimeout(total=self.config.fetch_timeout_s)
        async with ClientSession(timeout=timeout) as session:
            for param, image_url in chat.remote_images:
                image_url["url"] = await self._fetch(session, param, image_url["url"])

    async def _fetch(self, session: ClientSession, param: str, url: str) -> str:
        limit = self.config.max_image_bytes
        try:
            async with session.get(url) as reply:
                if reply.status != 200:
                    raise api.invalid(f"{param}: fetching {url} answered HTTP {reply.status}", param)
                data = await reply.content.read(limit + 1)
        except (ClientError, asyncio.TimeoutError) as e:
            raise api.invalid(f"{param}: fetching {url} failed: {e or type(e).__name__}", param) from None
        if len(data) > limit:
            raise api.invalid(f"{param}: {url} is over the limit of {limit} encoded bytes", param)
        return "data:image;base64," + base64.b64encode(data).decode()


def serve(config: ServerConfig, host: str, port: int) -> None:
    """Run the server until SIGTERM/SIGINT; in-flight streams are cancelled on the way out."""
    web.run_app(ChatServer(config).app(), host=host, port=port, print=None, access_log=None,
                handler_cancellation=True, shutdown_timeout=5)
