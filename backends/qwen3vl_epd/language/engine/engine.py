"""Engine: continuous batching on its own thread; each step is admit → pull → schedule → run →
postprocess. Pulls run on the Puller's transfer workers: a step never waits on a peer."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable

from qwen3vl_epd.errors import EpdError, HandleError, UnavailableError
from qwen3vl_epd.language.detokenizer import Detokenizer
from qwen3vl_epd.language.engine.attention import choose_backend
from qwen3vl_epd.language.engine.kv_cache import PagedKVCache
from qwen3vl_epd.language.engine.model_runner import ModelRunner, PreparedChunk
from qwen3vl_epd.language.engine.scheduler import Scheduler
from qwen3vl_epd.language.engine.sequence import Sequence, Status
from qwen3vl_epd.language.engine.threads import CoreShare
from qwen3vl_epd.language.model import LanguageModel
from qwen3vl_epd.language.request import LanguageRequest, Piece
from qwen3vl_epd.liveness import Progress
from qwen3vl_epd.prompt.source import PromptSource
from qwen3vl_epd.settings import LanguageSettings
from qwen3vl_epd.transfer.blocks import blocks_for
from qwen3vl_epd.transfer.puller import Puller

log = logging.getLogger(__name__)

# With no decode to keep going, a step waits this long for chunks still on their way, so that
# requests arriving together prefill in one forward instead of one after the other.
GATHER_S = 0.002


class Engine:
    """submit() from any thread; the loop thread schedules, pulls, runs, samples and emits."""

    def __init__(self, model: LanguageModel, puller: Puller, tokenizer, config: LanguageSettings,
                 deliver: Callable[[LanguageRequest, Piece], None] | None = None,
                 encoder_busy: Callable[[], bool] = lambda: False):
        """`config`: kv_cache, scheduling and thread settings. `deliver` gets every piece (default:
        the request's send). `encoder_busy`: an encoder on this host works for us (CoreShare)."""
        tc = model.config.text_config
        self.config = config
        self.kv = PagedKVCache(tc.num_hidden_layers, blocks_for(config.kv_cache_tokens, config.kv_block_size),
                               config.kv_block_size, tc.num_key_value_heads, tc.head_dim, model.dtype, model.device,
                               prefix_caching=config.prefix_cache)
        self.model, self.puller, self.tokenizer = model, puller, tokenizer
        self.scheduler = Scheduler(self.kv, config, model.eos_ids)
        self.cores = CoreShare.of(config.torch_threads, tc.hidden_size, encoder_busy)
        self.runner = ModelRunner(model, choose_backend(config.attention_backend, model.device, model.dtype,
                                                        config.kv_block_size, tc.head_dim), self.cores.head)
        self.deliver = deliver or (lambda request, piece: request.send(piece))
        self._arrived = threading.Event()  # a transfer ended: wake a step that has nothing to run
        puller.on_arrival = self._arrived.set
        self.output_tokens = 0
        self.prefix_queried_tokens = self.prefix_hit_tokens = 0  # prompt tokens looked up / found cached
        # (name, seconds) per request, for the histograms; drained by the metrics reporter.
        self.timings: collections.deque[tuple[str, float]] = collections.deque(maxlen=100_000)
        self.steps = self.mixed_steps = 0  # mixed: prompt chunks and decode tokens in one forward
        self.progress = Progress()  # steps done, for the supervisor's liveness rule (liveness.py)
        self._inbox: list[Sequence] = []
        self._cancels: list[LanguageRequest] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._threads_taken = threading.Event()  # then others may reset torch's default (take_threads)
        self._thread = threading.Thread(target=self._loop, name="epd-engine", daemon=True)
        self._thread.start()
        self._threads_taken.wait()

    def submit(self, prompt: bytes | str | PromptSource, request: LanguageRequest) -> None:
        """Check the prompt (a handle, opened here, or a PromptSource) against the limits (EpdError
        here, before anything is queued) and queue the request. A probe (liveness: one token at
        most) goes before the queue; when no KV is free for it, the next forward of the others
        answers it (finish_reason "probe"): a busy engine is alive, not hung."""
        source = self.puller.open(prompt) if isinstance(prompt, (bytes, str)) else prompt
        params, length = request.params, source.length
        try:
            self._check(request, length)
        except EpdError:
            source.close()
            raise
        if request.probe:
            params.max_tokens = 1
        seq = Sequence(params, length, source.mrope_delta, self.puller.chunk_tokens,
                       Detokenizer(self.tokenizer, params.stop), source, request)
        if self.kv.prefix_caching and params.repetition_penalty == 1.0:  # that penalty must see every prompt token
            seq.block_hashes = source.block_hashes
        self.timings.append(("prompt", seq.submitted - seq.arrived))
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()

    def _check(self, request: LanguageRequest, length: int) -> None:
        if self._stopping:
            raise UnavailableError("language model is shutting down")
        self.scheduler.check(request.params, length, len(self._inbox), request.probe)

    def cancel(self, request: LanguageRequest) -> None:
        """A message to the loop: end this request's sequence (queued or running) as cancelled."""
        with self._wake:
            request.cancelled = True
            self._cancels.append(request)
            self._wake.notify()

    def in_use(self) -> dict:
        """Blocks held by requests per pool (cached prefix blocks no request holds are not in use)."""
        return {"kv_blocks": self.kv.in_use(), **self.puller.buffers.in_use()}

    def idle(self) -> bool:
        with self._wake:
            return not self._inbox and not self.scheduler.has_work()

    def _loop(self) -> None:
        self.cores.take()
        self._threads_taken.set()
        while True:
            with self._wake:
                while not self._inbox and not self._cancels and not self.scheduler.has_work() and not self._stopping:
                    self._wake.wait()
                if self._stopping and not self._inbox and not self.scheduler.has_work():
                    return
                cancels, self._cancels = self._cancels, []
                for seq in self._inbox:
                    self.scheduler.add(seq)
                    if seq.request.cancelled:  # cancelled before it got here (while encoding)
                        cancels.append(seq.request)
                self._inbox.clear()
            self.progress.begin()
            t0 = time.perf_counter()
            try:
                self._cancel(cancels)
                self.step()
            except Exception as e:  # a bug must not leave requests hanging: fail everything in flight
                self._fail_all(e)
            self.progress.done(time.perf_counter() - t0, self.progress.units, self.scheduler.has_work())

    def _fail_all(self, e: Exception) -> None:
        """Every sequence in flight ends with INTERNAL naming its request; the log has the traceback."""
        ids = [seq.request.id for seq in self.scheduler.all() if seq.request is not None]
        log.exception("internal error in the engine step; failing requests %s", ", ".join(ids) or "(none)")
        for seq in self.scheduler.all():
            rid = seq.request.id if seq.request is not None else "?"
            self._finish(seq, None, EpdError(f"internal error in the engine (request {rid}): {e!r}"))

    def step(self) -> None:
        """admit → pull → schedule → run → postprocess."""
        now = time.perf_counter()
        for seq in self.scheduler.overdue(now - self.config.max_queue_s):
            self._finish(seq, None, UnavailableError(
                f"waited {now - seq.submitted:.0f} s for the engine (max_queue_s {self.config.max_queue_s:g}); retry"))
        for seq in self.scheduler.admit():
            self.timings.append(("queue", now - seq.submitted))
            self.prefix_queried_tokens += seq.prompt_len if self.kv.prefix_caching else 0
            self.prefix_hit_tokens += seq.cached_tokens
        self._pull()
        prefills, decodes = self.scheduler.schedule()
        chunks = self._prepare(prefills)
        if chunks or decodes:
            self._run(chunks, decodes)
        elif not prefills:  # chunks on their way
            self._arrived.wait(0.002)

    def _pull(self) -> None:
        """Start or collect the transfer of each admitted sequence's next chunk; a failed or overdue
        transfer ends only its own sequence."""
        deadline = time.monotonic() + GATHER_S
        while True:
            self._arrived.clear()
            pending = False
            for seq in self.scheduler.prefilling():
                try:
                    seq.rows = seq.source.fetch(*seq.next_chunk_range())
                except EpdError as e:
                    self._finish(seq, None, e)
                    continue
                pending |= seq.rows is None
            left = deadline - time.monotonic()
            if not pending or left <= 0 or any(s.status is Status.DECODE for s in self.scheduler.running):
                return
            self._arrived.wait(left)

    def _prepare(self, prefills: list[Sequence]) -> list[PreparedChunk]:
        """Each arrived chunk embedded; rows that disagree with their tokens fail that request alone."""
        chunks = []
        for seq in prefills:
            try:
                chunks.append(self.runner.prepare(seq, seq.rows))
            except ValueError as e:
                start, end = seq.next_chunk_range()
                self._finish(seq, None, HandleError(f"{seq.source.name}: tokens {start}..{end}: {e}"))
        return chunks

    def _run(self, chunks: list[PreparedChunk], decodes: list[Sequence]) -> None:
        self.progress.units = len(decodes) + sum(c.seq.next_chunk_tokens() for c in chunks)
        self.cores.step(self.progress.units)
        sampled, logits = self.runner.run(chunks, decodes)
        self.steps += 1
        self.mixed_steps += bool(chunks and decodes)
        tokens, logprobs = self.runner.sample(sampled, logits)
        pieces = self.scheduler.postprocess([c.seq for c in chunks], sampled, tokens, logprobs)
        for seq in sampled:
            if len(seq.tokens) == 1:
                self.timings.append(("ttft", seq.first_token_at - seq.arrived))
        self.output_tokens += len(tokens)
        for seq, piece in pieces + self.scheduler.answer_probes():
            self._emit(seq, piece)

    def _cancel(self, requests: list[LanguageRequest]) -> None:
        """The sequences of cancelled requests end."""
        if requests:
            for seq in self.scheduler.all():
                if seq.request is not None and seq.request.cancelled:
                    self._finish(seq, "cancelled")

    def _finish(self, seq: Sequence, reason: str | None, error: EpdError | None = None) -> None:
        self._emit(seq, self.scheduler.finish(seq, reason, error))

    def _emit(self, seq: Sequence, piece: Piece) -> None:
        """A failing delivery (the client is gone) stops that sequence, never the engine."""
        if piece.final:
            self.timings.append(("request", time.perf_counter() - seq.arrived))
        if seq.request is None:
            return
        try:
            self.deliver(seq.request, piece)
        except Exception:
            log.exception("request %s: its response could not be delivered; cancelling it", seq.request.id)
            self.cancel(seq.request)

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
        with self._wake:
            for seq in self.scheduler.all():
                if seq.request is not None:
                    seq.request.cancelled = True
                    self._cancels.append(seq.request)
            self._wake.notify()
        self._thread.join(timeout=30)
