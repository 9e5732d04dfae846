"""LanguageService: the language half without Triton; the one owner of every language request."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from qwen3vl_epd.checkpoint.reader import load_config
from qwen3vl_epd.errors import EpdError, InvalidInputError, UnavailableError
from qwen3vl_epd.language.encoder_pool import EncoderPool
from qwen3vl_epd.language.engine.engine import Engine
from qwen3vl_epd.language.grammar import Grammars
from qwen3vl_epd.language.model import LanguageModel
from qwen3vl_epd.language.request import LanguageRequest, Phase, Piece, PromptInputs
from qwen3vl_epd.language.sampling import SamplingParams, sampling_params
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.messages import parse_messages, parse_tools
from qwen3vl_epd.prompt.processor import Processor
from qwen3vl_epd.prompt.source import LocalPrompt
from qwen3vl_epd.settings import LanguageSettings
from qwen3vl_epd.transfer.blocks import blocks_for
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from qwen3vl_epd.transfer.puller import Puller
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.transport import MooncakeTransport

log = logging.getLogger(__name__)


class LanguageService:
    """Text model + Puller + the continuous-batching Engine. Text-only prompts are processed here
    and never wait behind vision work; prompts with images or videos go to the encoder pool (local or
    remote servers alike, over gRPC) and come back as handles."""

    def __init__(self, settings: LanguageSettings):
        self.settings = s = settings
        torch.set_num_threads(1)  # loading too: only the engine thread computes in parallel (engine/threads.py)
        self.model = LanguageModel(s.checkpoint_dir, s.torch_dtype(load_config(s.checkpoint_dir)), s.device)
        self.processor = Processor(s.checkpoint_dir, Limits.of(s))
        self.tokenizer = self.processor.tokenizer
        self.encoders = EncoderPool(s.encoders, s.encode_timeout_s, s.encoder_wait_s)
        # Each encode blocks a thread for as long as the encoder works; the engine never waits on one.
        self.encode_workers = ThreadPoolExecutor(64, thread_name_prefix="epd-encode")
        self.encoding, self._lock = 0, threading.Lock()  # prompts on their way to (or on) the encoder pool
        self.buffers = local_buffers(s, self.model)
        self.puller = Puller(self.buffers, MooncakeTransport.from_settings(s), HandleKeys.load(s.handle_key_file),
                             chunk_tokens=s.chunk_tokens, allowed_hosts=set(s.allowed_encoder_hosts) or None,
                             alloc_wait_s=s.alloc_wait_s, timeout_s=s.transfer_timeout_s,
                             workers=s.transfer_workers)
        self.grammars = Grammars(self.tokenizer, self.model.config.text_config.vocab_size)
        self.engine = Engine(self.model, self.puller, self.tokenizer, s, deliver=self._deliver,
                             encoder_busy=lambda: self.encoding > 0 and self.encoders.on_this_host)
        torch.set_num_threads(1)  # the engine's thread keeps its own; every other thread gets one, no pool
        log.info("language model ready: checkpoint %s, dtype %s, device %s, KV cache %d blocks of %d tokens, "
                 "local pools %s; settings: %s", s.checkpoint_dir, self.model.dtype, s.device, self.engine.kv.num_blocks,
                 self.engine.kv.block_size, self.buffers.capacity(), s.summary())

    def sampling(self, **fields) -> SamplingParams:
        """Request fields (absent: None) → validated SamplingParams."""
        return sampling_params(self.settings.default_max_tokens, self.settings.max_tokens_limit, **fields,
                               vocab_size=self.model.config.text_config.vocab_size, grammars=self.grammars)

    def release(self, handle: bytes) -> None:
        """Give the encoder its slot back without reading (the request failed before the pull);
        best effort: a handle too broken to open is left to the encoder's TTL."""
        try:
            self.puller.open(handle).close()
        except EpdError:
            pass

    def start(self, request: LanguageRequest, inputs: PromptInputs | None = None, handle: bytes | None = None) -> None:
        """Queue a request: a handle or a text-only prompt here and now (EpdError when it is bad);
        a prompt with images returns at once, its encode and pull on workers, errors as pieces."""
        if handle is not None:
            self.engine.submit(handle, request)
            return
        s, inputs = self.settings, self.templated(inputs)
        check_text(inputs.text)
        if not inputs.images and not inputs.videos:
            p = self.processor.process(inputs.text, [], inputs.raw_prompt)
            rows = self.buffers.embeddings[:0], self.buffers.deepstack[:0]
            self.engine.submit(LocalPrompt(p.encoded(*rows), s.chunk_tokens), request)
            return
        if self.encoding >= s.max_queued_requests:  # a bounded queue in front of the encoder pool too
            raise UnavailableError(f"the encoder pool is saturated: {self.encoding} prompts wait for an encode "
                                   f"(max_queued_requests {s.max_queued_requests}); retry")
        request.inputs = inputs
        self._encode_later(request)

    def cancel(self, request: LanguageRequest) -> None:
        """The client cancelled or is gone: the engine is told; an encode in flight is not submitted."""
        request.cancelled = True
        self.engine.cancel(request)

    def templated(self, inputs: PromptInputs) -> PromptInputs:
        """A conversation rendered by the chat template into a raw prompt (encoders see only that)."""
        if inputs.messages is None:
            if inputs.tools is not None:
                raise InvalidInputError("tools: needs messages (the chat template renders them)")
            return inputs
        if inputs.text is not None or inputs.raw_prompt:
            raise InvalidInputError("messages: send either messages or text_input (with raw_prompt), not both")
        conversation = parse_messages(inputs.messages, inputs.images, inputs.videos)
        prompt = self.processor.apply_chat_template(conversation.turns, parse_tools(inputs.tools))
        return PromptInputs(prompt, conversation.images, conversation.videos, inputs.video_options, raw_prompt=True)

    def _encode_later(self, request: LanguageRequest) -> None:
        request.phase, request.encodes = Phase.ENCODING, request.encodes + 1
        with self._lock:
            self.encoding += 1
            self.engine.progress.waiting = self.encoding
        self.encode_workers.submit(self._encode, request)

    def _encode(self, request: LanguageRequest) -> None:
        """On an encode worker: the pool's handle, then the engine (which may hand it back, _deliver)."""
        try:
            if request.cancelled:
                request.send(Piece("", "cancelled", 0, 0))
                return
            inputs = request.inputs
            handle = self.encoders.encode(inputs.text, inputs.images, inputs.raw_prompt, inputs.videos,
                                          inputs.video_options, language_idle=self.engine.idle())
            request.phase = Phase.ENGINE
            self.engine.submit(handle, request)
        except EpdError as e:
            request.send(Piece("", None, 0, 0, e))
        except Exception as e:  # a bug: the client gets an error naming the request, the log the traceback
            log.exception("request %s: internal error while encoding", request.id)
            request.send(Piece("", None, 0, 0, EpdError(f"internal error (request {request.id}): {e!r}")))
        finally:
            with self._lock:
                self.encoding -= 1
                self.engine.progress.waiting = self.encoding

    def _deliver(self, request: LanguageRequest, piece: Piece) -> None:
        """Every piece the engine makes; a request whose encoder was lost before its first token
        goes back to the pool instead of to the client."""
        if request.lost_encoder(piece) and not request.cancelled:
            self.encoders.count_retry()
            self._encode_later(request)
            return
        request.send(piece)

    def close(self) -> None:
        self.encode_workers.shutdown(wait=False, cancel_futures=True)
        self.engine.stop()
        self.puller.close()
        self.encoders.close()


def local_buffers(s: LanguageSettings, model: LanguageModel) -> MultimodalDataBuffers:
    """Local multimodal memory: the prompt chunks of one step, twice over for fragmentation."""
    rows = max(s.chunk_tokens, s.max_batched_tokens)
    config = BufferConfig(s.block_tokens, s.block_visual, num_token_blocks=blocks_for(rows, s.block_tokens) * 2,
                          num_visual_blocks=blocks_for(rows, s.block_visual) * 2, num_slots=s.max_queued_requests)
    return MultimodalDataBuffers(model.hidden_size, model.num_deepstack, model.dtype, config, s.device)


def check_text(text: str | None) -> None:
    if text is None:
        raise InvalidInputError("text_input: required input is missing")
