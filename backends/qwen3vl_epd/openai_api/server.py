"""The OpenAI-compatible server: /v1/models, /v1/chat/completions, /v1/completions and its own
/metrics over aiohttp, each choice one gRPC stream to the `language` model; a client that leaves
cancels its streams, so the engine stops."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

import grpc
from aiohttp import web

from qwen3vl_epd.openai_api import answers
from qwen3vl_epd.openai_api import protocol as api
from qwen3vl_epd.openai_api.images import fetch_remote_media
from qwen3vl_epd.openai_api.metrics import DoorMetrics
from qwen3vl_epd.openai_api.protocol import OpenAIError
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
    max_video_bytes: int = 64 * 1024 * 1024
    fetch_timeout_s: float = 10.0
    max_body_bytes: int = 256 * 1024 * 1024  # eight 20 MiB images as base64 fit


class ChatServer:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.created = int(time.time())
        self.client = None  # made on the event loop (grpc.aio channels belong to one)
        self.counters = DoorMetrics()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
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
        """Every request counted in the door's metrics, its status included."""
        self.counters.start(request)
        status = 500  # a bug, or a client gone mid-answer
        try:
            response = await self._answered(request, handler)
            status = response.status
            return response
        except web.HTTPException as e:  # aiohttp's own (an unknown path)
            status = e.status
            raise
        finally:
            self.counters.request(request, status)

    async def _answered(self, request: web.Request, handler) -> web.StreamResponse:
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
        return web.json_response(answers.models(self.config.served_model, self.created))

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.config.served_model:
            raise OpenAIError(404, f"The model '{name}' does not exist; this server serves '{self.config.served_model}'",
                              "invalid_request_error", "model", "model_not_found")
        return web.json_response(answers.model_object(name, self.created))

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.counters.render(), content_type="text/plain")

    async def health(self, request: web.Request) -> web.Response:
        try:
            ready = await self.client.is_model_ready(self.config.model)
        except Exception:
            ready = False
        return web.Response(status=200 if ready else 503, text="ok" if ready else "not ready")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        chat = api.chat_request(await _body(request), self.config.served_model)
        await fetch_remote_media(chat, self.config)
        return await self._answer(request, chat, answers.CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._answer(request, api.text_request(await _body(request), self.config.served_model),
                                  answers.TEXT)

    async def _answer(self, request, req, kind: str) -> web.StreamResponse:
        """n choices, each one stream to the language model. The others start once the first has
        answered: its prompt's KV blocks are in the prefix cache by then, and they share them."""
        cid, model = answers.completion_id(kind), self.config.served_model
        choices = [answers.Choice(kind, i, req.logprobs, req.tools is not None) for i in range(req.n)]
        gens = [self._generate(*req.inputs(0), req.stream)]
        try:
            first = await anext(gens[0])  # errors of the request itself still get their HTTP status
            self.counters.first_token(request)
            gens += [self._generate(*req.inputs(i), req.stream) for i in range(1, req.n)]
            if not req.stream:
                outs = [first, *await asyncio.gather(*(anext(g) for g in gens[1:]))]
                self.counters.tokens(outs[0].num_input_tokens, sum(o.num_output_tokens for o in outs))
                return web.json_response(answers.whole(
                    kind, cid, model, [c.whole(o) for c, o in zip(choices, outs)],
                    answers.usage(outs[0].num_input_tokens, sum(o.num_output_tokens for o in outs))))
            return await self._stream(request, req, kind, cid, choices, first, gens)
        finally:
            for g in gens:
                await g.aclose()

    async def _stream(self, request, req, kind, cid, choices, first: Response, gens) -> web.StreamResponse:
        """Server-sent events: each choice's chunks as its responses arrive, usage if asked, [DONE]."""
        model = self.config.served_model
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(obj) -> None:
            await response.write(f"data: {json.dumps(obj)}\n\n".encode())

        arrivals: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen, out: Response | None = None) -> None:
            try:
                while out is None or not out.finish_reason:
                    if out is not None:
                        await arrivals.put((i, out))
                    out = await anext(gen)
                await arrivals.put((i, out))
            except OpenAIError as e:
                await arrivals.put((i, e))

        pumps = [asyncio.create_task(pump(0, gens[0], first))]
        pumps += [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens[1:], 1)]
        try:
            for c in choices:
                if entries := c.opening():
                    await send(answers.chunk(kind, cid, model, entries))
            done, prompt_tokens, completion_tokens = 0, 0, 0
            while done < len(choices):
                i, out = await arrivals.get()
                if isinstance(out, OpenAIError):  # after the headers went out, an error travels as an event
                    await send(out.body())
                    break
                for entry in choices[i].stream(out):
                    await send(answers.chunk(kind, cid, model, [entry]))
                if out.finish_reason:
                    done += 1
                    prompt_tokens, completion_tokens = out.num_input_tokens, completion_tokens + out.num_output_tokens
            else:
                self.counters.tokens(prompt_tokens, completion_tokens)
                if req.include_usage:
                    await send(answers.chunk(kind, cid, model, [], answers.usage(prompt_tokens, completion_tokens)))
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _generate(self, prompt: str | None, fields: dict, stream: bool):
        """The model's responses for one request; OpenAIError for its errors. Leaving early (the
        client went away, or the handler was cancelled) cancels the gRPC stream, and so the request."""
        finished = asyncio.Event()

        async def requests():
            inputs = request_inputs(prompt, [], stream, fields)
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



async def _body(request: web.Request):
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.invalid(f"the request body is not valid JSON: {e}") from None


def serve(config: ServerConfig, host: str, port: int) -> None:
    """Run the server until SIGTERM/SIGINT; in-flight streams are cancelled on the way out."""
    web.run_app(ChatServer(config).app(), host=host, port=port, print=None, access_log=None,
                handler_cancellation=True, shutdown_timeout=5)
