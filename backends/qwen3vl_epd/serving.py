"""The two served halves, independent of Triton: EncoderService (prompt + images → handle) and
LanguageService (handle + sampling → streamed text)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from transformers import AutoTokenizer

from .buffers import BufferConfig, MultimodalDataBuffers
from .checkpoint import load_config
from .detokenizer import Detokenizer
from .encoder import VisionEncoder
from .errors import EpdError, InvalidInputError
from .language import LanguageModel
from .processor import Limits, Processor
from .sampling import SamplingParams, sampling_params
from .settings import Settings
from .transfer import MooncakeTransport, Puller, Stager


def _buffers(s: Settings, hidden: int, deepstack: int, dtype, **overrides) -> MultimodalDataBuffers:
    cfg = BufferConfig(s.block_tokens, s.block_visual, s.num_token_blocks, s.num_visual_blocks, s.num_slots)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return MultimodalDataBuffers(hidden, deepstack, dtype, cfg, s.device)


def _transport(s: Settings) -> MooncakeTransport:
    return MooncakeTransport(s.mooncake_host, s.mooncake_protocol, s.mooncake_device, s.mooncake_metadata_server)


@dataclass
class EncodeRequest:
    text: str | None  # None: the required field is missing
    images: list[bytes] = field(default_factory=list)
    raw_prompt: bool = False
    sampling: dict = field(default_factory=dict)  # checked here so a bad request costs no image work


@dataclass
class Encoded:
    handle: bytes
    num_input_tokens: int


class EncoderService:
    """Processor + vision tower + Stager; a background thread reclaims released and expired slots."""

    def __init__(self, settings: Settings, reclaim_interval_s: float = 0.02,
                 on_change: Callable[[dict], None] = lambda in_use: None):
        self.settings = s = settings
        self.on_change = on_change  # gets buffers.in_use() whenever it may have changed
        limits = Limits(s.max_image_bytes, s.max_image_pixels, s.max_images, s.max_model_len)
        self.processor = Processor(s.checkpoint_dir, limits)
        self.encoder = VisionEncoder(s.checkpoint_dir, s.torch_dtype(self.processor.config), s.device)
        self.buffers = _buffers(s, self.encoder.hidden_size, self.encoder.num_deepstack, self.encoder.dtype)
        self.stager = Stager(self.buffers, _transport(s), s.handle_ttl_s, s.alloc_wait_s)
        self.encode_seconds, self.encode_count = 0.0, 0
        self._stop = threading.Event()
        self._reclaimer = threading.Thread(target=self._reclaim_loop, args=(reclaim_interval_s,), daemon=True)
        self._reclaimer.start()

    def _reclaim_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if self.stager.reclaim():
                self.on_change(self.buffers.in_use())

    def encode(self, requests: list[EncodeRequest]) -> list[Encoded | EpdError]:
        """One packed vision forward for the batch; a bad request fails alone."""
        t0 = time.perf_counter()
        results: list[Encoded | EpdError | None] = [None] * len(requests)
        processed = {}
        s = self.settings
        for i, r in enumerate(requests):
            try:
                if r.text is None:
                    raise InvalidInputError("text_input: required input is missing")
                sampling_params(s.default_max_tokens, s.max_tokens_limit, **r.sampling)
                processed[i] = self.processor.process(r.text, r.images, r.raw_prompt)
            except EpdError as e:
                results[i] = e
        encoded = self.encoder.encode(list(processed.values()))
        for i, prompt in zip(processed, encoded):
            try:
                results[i] = Encoded(self.stager.stage(prompt).encode(), prompt.length)
            except EpdError as e:
                results[i] = e
        self.encode_seconds += time.perf_counter() - t0
        self.encode_count += len(requests)
        self.on_change(self.buffers.in_use())
        return results

    def close(self) -> None:
        self._stop.set()
        self._reclaimer.join()
        self.stager.close()


@dataclass
class Piece:
    """One streamed response: new text, and on the last one the finish reason."""

    text: str
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int


class LanguageService:
    """Text model + Puller + detokenizer; one request at a time (the engine issue batches them)."""

    def __init__(self, settings: Settings):
        self.settings = s = settings
        self.model = LanguageModel(s.checkpoint_dir, s.torch_dtype(load_config(s.checkpoint_dir)), s.device)
        self.tokenizer = AutoTokenizer.from_pretrained(s.checkpoint_dir, local_files_only=True)
        rows = s.chunk_tokens  # local memory: one chunk of tokens and of visual rows
        self.buffers = _buffers(s, self.model.hidden_size, self.model.num_deepstack, self.model.dtype,
                                num_token_blocks=-(-rows // s.block_tokens) * 2,
                                num_visual_blocks=-(-rows // s.block_visual) * 2)
        self.puller = Puller(self.buffers, _transport(s), s.chunk_tokens,
                             set(s.allowed_encoder_hosts) or None, s.alloc_wait_s)
        self.ttft_seconds, self.ttft_count, self.output_tokens = 0.0, 0, 0
        self.lock = threading.Lock()

    def sampling(self, **fields) -> SamplingParams:
        """Request fields (absent: None) → validated SamplingParams."""
        return sampling_params(self.settings.default_max_tokens, self.settings.max_tokens_limit, **fields)

    def release(self, handle: bytes) -> None:
        """Give the encoder its slot back without reading (the request failed before the pull)."""
        self.puller.open(handle).close()

    def generate(self, handle: bytes, params: SamplingParams, cancelled: Callable[[], bool] = lambda: False,
                 arrived: float | None = None) -> Iterator[Piece]:
        """Pull, prefill, decode; yields text pieces, the last one with its finish reason."""
        arrived = time.perf_counter() if arrived is None else arrived
        with self.lock, self.puller.open(handle) as session:
            n_in = session.handle.length
            room = self.settings.max_model_len - n_in
            params.max_tokens = min(params.max_tokens, room) if room > 0 else 0
            detok, n_out, reason = Detokenizer(self.tokenizer, params.stop), 0, "length"
            if params.max_tokens == 0:
                yield Piece("", "length", n_in, 0)
                return
            for token in self.model.stream(session.chunks(), params):
                if n_out == 0:
                    session.close()  # prefill is done: the encoder can reuse its blocks now
                    self.ttft_seconds += time.perf_counter() - arrived
                    self.ttft_count += 1
                n_out += 1
                self.output_tokens += 1
                if token in self.model.eos_ids:
                    reason = "stop"
                    break
                text = detok.add(token)
                if detok.stopped:
                    reason = "stop"
                    if text:
                        yield Piece(text, None, n_in, n_out)
                    break
                if cancelled():
                    reason = "cancelled"
                    break
                if text:
                    yield Piece(text, None, n_in, n_out)
            yield Piece(detok.flush() if reason != "cancelled" else "", reason, n_in, n_out)

    def close(self) -> None:
        self.puller.close()
