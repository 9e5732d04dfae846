"""Engine: continuous batching on its own thread; pulls each prompt chunk just before it runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ..detokenizer import Detokenizer
from ..errors import EpdError, HandleError, InvalidInputError, UnavailableError
from ..language import LanguageModel
from ..sampling import SamplingParams
from ..transfer import Puller
from .kv_cache import PagedKVCache
from .model_runner import ModelRunner
from .scheduler import Scheduler
from .sequence import Piece, Sequence, Status


class Engine:
    """submit() from any thread; the loop thread schedules, pulls, runs, samples and emits."""

    def __init__(self, model: LanguageModel, puller: Puller, tokenizer, kv_cache_tokens: int = 65536,
                 kv_block_size: int = 16, max_batched_tokens: int = 2048, max_running: int = 256,
                 max_model_len: int = 32768, on_step: Callable[[], None] = lambda: None,
                 cancel_check_s: float = 0.02):
        tc = model.config.text_config
        blocks = -(-kv_cache_tokens // kv_block_size)
        self.kv = PagedKVCache(tc.num_hidden_layers, blocks, kv_block_size, tc.num_key_value_heads, tc.head_dim,
                               model.dtype, model.device)
        self.model, self.puller, self.tokenizer = model, puller, tokenizer
        self.scheduler = Scheduler(self.kv, max(max_batched_tokens, 1), max_running)
        self.runner = ModelRunner(model)
        self.max_model_len = max_model_len
        self.on_step = on_step  # after every step, on the engine thread (metrics)
        self.cancel_check_s, self._cancel_checked = cancel_check_s, 0.0
        self.ttft_seconds, self.ttft_count, self.output_tokens = 0.0, 0, 0
        self.steps = self.mixed_steps = 0  # mixed: prompt chunks and decode tokens in one forward
        self._inbox: list[Sequence] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="epd-engine", daemon=True)
        self._thread.start()

    def submit(self, handle: bytes, params: SamplingParams, emit: Callable[[Piece], None],
               cancelled: Callable[[], bool] = lambda: False, arrived: float | None = None) -> None:
        """Validate the handle (EpdError here, before anything is queued) and queue the request."""
        session = self.puller.open(handle)
        try:
            if self._stopping:
                raise UnavailableError("language model is shutting down")
            room = self.max_model_len - session.handle.length
            if room <= 0:
                raise InvalidInputError(f"prompt is {session.handle.length} tokens, over the max model length "
                                        f"of {self.max_model_len}")
            params.max_tokens = min(params.max_tokens, room)
            need = self.kv.blocks_for(session.handle.length + params.max_tokens)
            if need > self.kv.num_blocks:
                raise InvalidInputError(
                    f"max_tokens: prompt ({session.handle.length}) + max_tokens ({params.max_tokens}) needs "
                    f"{need * self.kv.block_size} KV tokens, over the KV cache capacity of "
                    f"{self.kv.num_blocks * self.kv.block_size}")
        except EpdError:
            session.close()
            raise
        seq = Sequence(session, params, Detokenizer(self.tokenizer, params.stop), emit, cancelled,
                       time.perf_counter() if arrived is None else arrived, self.puller.chunk_tokens)
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()

    def in_use(self) -> dict:
        return {"kv_blocks": self.kv.in_use(), **self.puller.buffers.in_use()}

    def idle(self) -> bool:
        with self._wake:
            return not self._inbox and not self.scheduler.has_work()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._inbox and not self.scheduler.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._inbox and not self.scheduler.has_work():
                    return
                for seq in self._inbox:
                    self.scheduler.add(seq)
                self._inbox.clear()
            try:
                self.step()
            except Exception as e:  # a bug must not leave requests hanging: fail everything in flight
                for seq in self.scheduler.all():
                    self._finish(seq, None, EpdError(f"internal error in the engine: {e!r}"))
            self.on_step()

    def step(self) -> None:
        """One forward of prompt chunks and decode tokens, then the cancellation check."""
        self._run_batch()
        now = time.monotonic()
        if now - self._cancel_checked >= self.cancel_check_s:
            # is_cancelled() is a round trip to the server process: not for every sequence every
            # step, and after the forward, so that a new request's first token never waits on it.
            self._cancel_checked = now
            for seq in self.scheduler.all():
                if seq.cancelled():
                    self._finish(seq, "cancelled")

    def _run_batch(self) -> None:
        prefills, decodes = self.scheduler.schedule()
        if not prefills and not decodes:
            time.sleep(0.001)  # everything waits for KV held by sequences being cancelled
            return
        chunks = []
        for seq in prefills:
            try:
                chunks.append(self.runner.prepare(seq, seq.session.read_chunk(seq.next_chunk)))
            except ValueError as e:  # rows that disagree with their tokens fail this request, not the batch
                self._finish(seq, None, HandleError(f"{seq.session.handle.name}: chunk {seq.next_chunk}: {e}"))
            except EpdError as e:
                self._finish(seq, None, e)
        if not chunks and not decodes:
            return
        sampling, logits = self.runner.run(chunks, decodes)
        self.steps += 1
        self.mixed_steps += bool(chunks and decodes)
        for seq in (p.seq for p in chunks):
            seq.session.release_chunk()
            seq.next_chunk += 1
            if seq.next_chunk == seq.num_chunks:
                seq.session.close()  # prompt done: the encoder may reuse its blocks now
                seq.status = Status.DECODE
        # Greedy rows in one argmax; sampled rows each with their own seeded generator.
        greedy = logits.argmax(-1).tolist()
        for i, seq in enumerate(sampling):
            self._append(seq, greedy[i] if seq.params.temperature <= 0 else seq.sampler(logits[i]))

    def _append(self, seq: Sequence, token: int) -> None:
        if not seq.tokens:
            seq.first_token_at = time.perf_counter()
            self.ttft_seconds += seq.first_token_at - seq.arrived
            self.ttft_count += 1
        seq.tokens.append(token)
        self.output_tokens += 1
        if token in self.model.eos_ids and not seq.params.ignore_eos:
            return self._finish(seq, "stop")
        text = seq.detokenizer.add(token)
        if seq.detokenizer.stopped:
            return self._finish(seq, "stop", text=text)
        if len(seq.tokens) >= seq.params.max_tokens:
            return self._finish(seq, "length", text=text)
        if text:
            self._emit(seq, Piece(text, None, seq.prompt_len, len(seq.tokens)))

    def _finish(self, seq: Sequence, reason: str | None, error: EpdError | None = None, text: str = "") -> None:
        """Free everything the sequence holds, then send its last piece."""
        self.scheduler.finish(seq)
        seq.session.close()
        if error is None and reason != "cancelled":
            text += seq.detokenizer.flush()
        self._emit(seq, Piece(text, reason, seq.prompt_len, len(seq.tokens), error))

    @staticmethod
    def _emit(seq: Sequence, piece: Piece) -> None:
        """A failing emit (the client is gone) stops that sequence, never the engine."""
        try:
            seq.emit(piece)
        except Exception:
            seq.cancelled = lambda: True

    def stop(self, drain_timeout_s: float = 10.0) -> None:
        """Finish what is in flight (up to the timeout), cancel the rest, join the thread."""
        deadline = time.monotonic() + drain_timeout_s
        with self._wake:
            self._stopping = True
            self._wake.notify()
        while not self.idle() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._wake:
            leftover = list(self._inbox)
            self._inbox.clear()
            for seq in leftover:
                self.scheduler.add(seq)
        for seq in self.scheduler.all():
            seq.cancelled = lambda: True
        with self._wake:
            self._wake.notify()
        self._thread.join(timeout=30)
