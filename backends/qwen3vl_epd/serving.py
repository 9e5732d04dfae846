"""The two served halves, independent of Triton: EncoderService (prompt + images → handle) and
LanguageService (prompt + images, or a handle, + sampling → streamed Pieces)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .block_allocator import blocks_for
from .buffers import BufferConfig, MultimodalDataBuffers
from .checkpoint import load_config
from .encoder import VisionEncoder, encoded_prompt
from .encoder_cache import EncoderCache
from .encoder_pool import EncoderPool
from .engine.engine import Engine
from .engine.local_prompt import LocalPrompt
from .engine.sequence import Piece
from .errors import EpdError, HandleExpiredError, InvalidInputError, PeerError
from .language import LanguageModel
from .messages import parse_messages
from .processor import Limits, Processor
from .sampling import SamplingParams, sampling_params
from .settings import Settings
from .transfer import HandleKeys, MooncakeTransport, Puller, Stager


def _buffers(s: Settings, hidden: int, deepstack: int, dtype, **overrides) -> MultimodalDataBuffers:
    cfg = BufferConfig(block_tokens=s.block_tokens, block_visual=s.block_visual, num_token_blocks=s.num_token_blocks,
                       num_visual_blocks=s.num_visual_blocks, num_slots=s.num_slots)
    return MultimodalDataBuffers(hidden, deepstack, dtype, dataclasses.replace(cfg, **overrides), s.device)


def _transport(s: Settings) -> MooncakeTransport:
    return MooncakeTransport(s.mooncake_host, s.mooncake_protocol, s.mooncake_device, s.mooncake_metadata_server,
                             timeout_s=s.transfer_timeout_s, ports=s.mooncake_ports)


# Encodes of one request, the first included: a pull that fails because its encoder died (before
# any token was sent) is encoded again, by another encoder of the pool.
ENCODE_ATTEMPTS = 3


@dataclass
class EncodeRequest:
    text: str | None  # None: the required field is missing
    images: list[bytes] = field(default_factory=list)
    raw_prompt: bool = False
    sampling: dict = field(default_factory=dict)  # checked here so a bad request costs no image work
    messages: str | None = None  # a conversation (JSON, OpenAI chat layout) instead of text_input


def _limits(s: Settings) -> Limits:
    return Limits(s.max_image_bytes, s.max_image_pixels, s.max_images, s.max_model_len)


def check_request(text: str | None, sampling: dict, settings: Settings | None = None) -> None:
    """The request's own fields (text_input present, sampling in range); InvalidInputError if not."""
    s = settings or Settings()
    if text is None:
        raise InvalidInputError("text_input: required input is missing")
    sampling_params(s.default_max_tokens, s.max_tokens_limit, **sampling)


class EncoderService:
    """Processor + vision tower + Stager; a background thread reclaims released and expired slots
    (and reports metrics, which keeps their round trips to the server off the request path)."""

    def __init__(self, settings: Settings, reclaim_interval_s: float = 0.02,
                 on_tick: Callable[[], None] = lambda: None):
        self.settings = s = settings
        s.apply_threads()
        self.on_tick = on_tick  # called from the background thread after each reclaim (metrics)
        self.processor = Processor(s.checkpoint_dir, _limits(s))
        self.encoder = VisionEncoder(s.checkpoint_dir, s.torch_dtype(self.processor.config), s.device)
        self.buffers = _buffers(s, self.encoder.hidden_size, self.encoder.num_deepstack, self.encoder.dtype)
        self.cache = EncoderCache(int(s.encoder_cache_mb * 2**20)) if s.encoder_cache_mb > 0 else None
        self.stager = Stager(self.buffers, _transport(s), HandleKeys.load(s.handle_key_file),
                             handle_ttl_s=s.handle_ttl_s, alloc_wait_s=s.alloc_wait_s)
        self.encode_seconds, self.encode_count = 0.0, 0
        self._stop = threading.Event()
        self._reclaimer = threading.Thread(target=self._reclaim_loop, args=(reclaim_interval_s,), daemon=True)
        self._reclaimer.start()

    def _reclaim_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.stager.reclaim()
            self.on_tick()

    def encode(self, requests: list[EncodeRequest]) -> list[bytes | EpdError]:
        """Handles (or errors) for a batch: one packed vision forward; a bad request fails alone."""
        t0 = time.perf_counter()
        results: list[bytes | EpdError | None] = [None] * len(requests)
        processed = {}
        s = self.settings
        for i, r in enumerate(requests):
            try:
                check_request(r.text, r.sampling, s)
                processed[i] = self.processor.process(r.text, r.images, r.raw_prompt, self.cache)
            except EpdError as e:
                results[i] = e
        encoded = self.encoder.encode(list(processed.values()), self.cache)
        for i, prompt in zip(processed, encoded):
            try:
                results[i] = self.stager.stage(prompt)
            except EpdError as e:
                results[i] = e
        self.encode_seconds += time.perf_counter() - t0
        self.encode_count += len(requests)
        return results

    def close(self) -> None:
        self._stop.set()
        self._reclaimer.join()
        self.stager.close()


class LanguageService:
    """Text model + Puller + the continuous-batching Engine; the client-facing door. Text-only
    prompts are processed here and never wait behind vision work; prompts with images go to the
    encoder pool (local or remote servers alike, over gRPC) and come back as handles."""

    def __init__(self, settings: Settings, on_step: Callable[[], None] = lambda: None):
        self.settings = s = settings
        s.apply_threads()
        self.model = LanguageModel(s.checkpoint_dir, s.torch_dtype(load_config(s.checkpoint_dir)), s.device)
        self.processor = Processor(s.checkpoint_dir, _limits(s))
        self.tokenizer = self.processor.tokenizer
        self.encoders = EncoderPool(s.encoders, s.encode_timeout_s, s.encoder_wait_s)
        # Each encode blocks a thread for as long as the encoder works; the engine never waits on one.
        self.encode_workers = ThreadPoolExecutor(64, thread_name_prefix="epd-encode")
        # Local multimodal memory: the prompt chunks of one step, twice over for fragmentation.
        rows = max(s.chunk_tokens, s.max_batched_tokens)
        self.buffers = _buffers(s, self.model.hidden_size, self.model.num_deepstack, self.model.dtype,
                                num_token_blocks=blocks_for(rows, s.block_tokens) * 2,
                                num_visual_blocks=blocks_for(rows, s.block_visual) * 2,
                                num_slots=s.max_queued_requests)
        self.puller = Puller(self.buffers, _transport(s), HandleKeys.load(s.handle_key_file),
                             chunk_tokens=s.chunk_tokens, allowed_hosts=set(s.allowed_encoder_hosts) or None,
                             alloc_wait_s=s.alloc_wait_s, timeout_s=s.transfer_timeout_s,
                             workers=s.transfer_workers)
        self.engine = Engine(self.model, self.puller, self.tokenizer, s, on_step)

    def sampling(self, **fields) -> SamplingParams:
        """Request fields (absent: None) → validated SamplingParams."""
        return sampling_params(self.settings.default_max_tokens, self.settings.max_tokens_limit, **fields)

    def release(self, handle: bytes) -> None:
        """Give the encoder its slot back without reading (the request failed before the pull);
        best effort: a handle too broken to open is left to the encoder's TTL."""
        try:
            self.puller.open(handle).close()
        except EpdError:
            pass

    def submit(self, handle: bytes, params: SamplingParams, emit: Callable[[Piece], None],
               cancelled: Callable[[], bool] = lambda: False, arrived: float | None = None) -> None:
        self.engine.submit(handle, params, emit, cancelled, arrived)

    def generate(self, request: EncodeRequest, params: SamplingParams, emit: Callable[[Piece], None],
                 cancelled: Callable[[], bool] = lambda: False, arrived: float | None = None,
                 probe: bool = False) -> None:
        """Queue a prompt: text only, here and now (EpdError when it is bad); with images, returns at
        once and the encode, pull and any retry run on workers, errors arriving through `emit`.
        `probe`: a liveness probe (Engine.submit), text only."""
        request = self.templated(request)
        check_request(request.text, {}, self.settings)
        if not request.images:
            p = self.processor.process(request.text, [], request.raw_prompt)
            rows = self.buffers.embeddings[:0], self.buffers.deepstack[:0]
            prompt = LocalPrompt(encoded_prompt(p, *rows), self.settings.chunk_tokens)
            self.engine.submit(prompt, params, emit, cancelled, arrived, probe)
            return
        job = RemotePrompt(self, request, params, emit, cancelled, arrived)
        self.encode_workers.submit(job.run)

    def templated(self, request: EncodeRequest) -> EncodeRequest:
        """A conversation rendered by the chat template into a raw prompt (encoders see only that)."""
        if request.messages is None:
            return request
        if request.text is not None or request.raw_prompt:
            raise InvalidInputError("messages: send either messages or text_input (with raw_prompt), not both")
        conversation = parse_messages(request.messages, request.images)
        prompt = self.processor.apply_chat_template(conversation.turns)
        return EncodeRequest(prompt, conversation.images, raw_prompt=True)

    def close(self) -> None:
        self.encode_workers.shutdown(wait=False, cancel_futures=True)
        self.engine.stop()
        self.puller.close()
        self.encoders.close()


@dataclass
class RemotePrompt:
    """A prompt with images on its way: encoded by the pool, then pulled by the engine. A request
    whose encoder died before its first token (the handle's peer is gone) is encoded again."""

    service: LanguageService
    request: EncodeRequest
    params: SamplingParams
    emit: Callable[[Piece], None]
    cancelled: Callable[[], bool]
    arrived: float | None
    attempts: int = ENCODE_ATTEMPTS

    def run(self) -> None:
        self.attempts -= 1
        try:
            if self.cancelled():
                self.emit(Piece("", "cancelled", 0, 0))
                return
            r = self.request
            handle = self.service.encoders.encode(r.text, r.images, r.raw_prompt)
            self.service.engine.submit(handle, self.params, self.on_piece, self.cancelled, self.arrived)
        except EpdError as e:
            self.on_piece(Piece("", None, 0, 0, e))

    def on_piece(self, piece: Piece) -> None:
        lost = isinstance(piece.error, (PeerError, HandleExpiredError)) and piece.num_output_tokens == 0
        if lost and self.attempts > 0:
            self.service.encoders.count_retry()
            self.service.encode_workers.submit(self.run)
        else:
            self.emit(piece)


def merge_pieces(batch: list[tuple[object, Piece]]) -> list[tuple[object, Piece]]:
    """Queued (sender, piece) pairs with consecutive plain pieces of one sender joined into one;
    the order within each sender is kept, and errors and final pieces are never merged into."""
    out: list[tuple[object, Piece]] = []
    last: dict[int, int] = {}  # sender id → index in out of its latest piece
    for sender, piece in batch:
        i = last.get(id(sender))
        plain = piece.error is None and piece.finish_reason != "cancelled"
        if i is not None and plain and out[i][1].finish_reason is None and out[i][1].error is None:
            out[i] = (sender, dataclasses.replace(piece, text=out[i][1].text + piece.text))
        else:
            last[id(sender)] = len(out)
            out.append((sender, piece))
    return out
