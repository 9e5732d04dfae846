"""EncoderService: the encoder half without Triton (prompt + images → a signed handle)."""

from __future__ import annotations

import ctypes
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen3vl_epd.cpu_threads import cores, idle_cores, set_thread_count
from qwen3vl_epd.encoder.cache import EncoderCache
from qwen3vl_epd.encoder.vision import VisionEncoder
from qwen3vl_epd.errors import EpdError, InvalidInputError
from qwen3vl_epd.language.sampling import sampling_params
from qwen3vl_epd.liveness import Progress
from qwen3vl_epd.prompt.limits import Limits
from qwen3vl_epd.prompt.processor import Processor
from qwen3vl_epd.prompt.video_processing import VideoOptions
from qwen3vl_epd.settings import EncoderSettings, Settings
from qwen3vl_epd.transfer.buffers import BufferConfig, MultimodalDataBuffers
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.stager import Stager
from qwen3vl_epd.transfer.transport import MooncakeTransport

log = logging.getLogger(__name__)
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


@dataclass
class EncodeJob:
    """One encode request as the encoder model receives it (from a language server's pool)."""

    text: str | None  # None: the required field is missing
    images: list[bytes] = field(default_factory=list)
    raw_prompt: bool = False
    sampling: dict = field(default_factory=dict)  # checked here so a bad request costs no image work
    videos: list[bytes] = field(default_factory=list)
    video_options: VideoOptions = field(default_factory=VideoOptions)
    language_idle: bool = False  # its language server, on this host, computed nothing as it sent this


TRIM_BATCHES, TRIM_IDLE_S = 16, 10.0


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system. Batches of images of every size, between
    long-lived cache entries, fragment glibc's heap: without this the encoder's memory grew by a
    third over 500 requests (tests/test_busy.py's soak); with it, it stays flat."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def batch_threads(setting: int, language_idle: bool = False, staged: int = 0) -> int:
    """A batch's threads: `setting`, or for 0 every core when its senders computed nothing and
    nothing staged here awaits its pull, else the cores idle as it starts (at least one). Alone on
    a 2-core host the tower encodes in 0.45 s on two threads against 1.0 s on one; beside a busy
    language model on the same cores, two threads each would stall each other's parallel ops. The
    senders' word counts because the host's own count of running tasks includes the client and
    the door handing the request on; but a sender idle as it sent, with embeddings staged here and
    not yet released, is about to prefill them (tiny checkpoint, images at 4: a batch queued behind
    the last one met that prefill and took 4-5 times as long, TTFT p99 0.7-0.9 s against 0.3)."""
    if setting:
        return setting
    return cores() if language_idle and not staged else max(1, idle_cores())


class BlockPace:
    """Called between the vision tower's blocks: a block slower per patch than the fastest seen at
    its thread count (and batch size) by SLOWER means other threads now contend for the cores (its
    language server began a step after the batch took every core), and the rest of the batch runs
    on one thread fewer. Three threads on two cores ran three images in 2.6 s against 0.8 s alone
    (moderate checkpoint). The host's count of running tasks could not tell: it counts tasks this
    container does not see. A block shorter than MIN_BLOCK_S is not judged: its time is mostly
    noise (the tiny checkpoint's blocks take under a millisecond)."""

    SLOWER, MIN_BLOCK_S = 1.6, 0.005

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock, self.fastest = clock, {}  # (threads, patches' bit length) → seconds per patch
        self.patches, self.last = 1, None

    def start(self, patches: int) -> None:
        self.patches, self.last = max(patches, 1), None

    def __call__(self) -> None:
        now, last = self.clock(), self.last
        self.last = now
        if last is None or now - last < self.MIN_BLOCK_S:
            return
        threads, pace = torch.get_num_threads(), (now - last) / self.patches
        key = (threads, self.patches.bit_length())
        best = self.fastest.get(key)
        if threads > 1 and best is not None and pace > self.SLOWER * best:
            set_thread_count(threads - 1)
            return
        self.fastest[key] = pace if best is None else min(best, pace)


def check_request(text: str | None, sampling: dict, settings: Settings | None = None) -> None:
    """The request's own fields (text_input present, sampling in range); InvalidInputError if not."""
    s = settings or Settings()
    if text is None:
        raise InvalidInputError("text_input: required input is missing")
    sampling_params(s.default_max_tokens, s.max_tokens_limit, **sampling)


class EncoderService:
    """Processor + vision tower + Stager; a background thread reclaims released and expired slots
    (and reports metrics, which keeps their round trips to the server off the request path)."""

    def __init__(self, settings: EncoderSettings, reclaim_interval_s: float = 0.02,
                 on_tick: Callable[[], None] = lambda: None):
        self.settings = s = settings
        torch.set_num_threads(1)  # loading: each batch then takes its own (batch_threads)
        self.on_tick = on_tick  # called from the background thread after each reclaim (metrics)
        self.processor = Processor(s.checkpoint_dir, Limits.of(s))
        shared_cores = torch.device(s.device).type == "cpu" and not s.torch_threads
        self.pace = BlockPace()
        self.encoder = VisionEncoder(s.checkpoint_dir, s.torch_dtype(self.processor.config), s.device,
                                     between_blocks=self.pace if shared_cores else None)
        self.buffers = MultimodalDataBuffers(self.encoder.hidden_size, self.encoder.num_deepstack, self.encoder.dtype,
                                             BufferConfig.of(s), s.device)
        self.cache = EncoderCache(int(s.encoder_cache_mb * 2**20)) if s.encoder_cache_mb > 0 else None
        self.stager = Stager(self.buffers, MooncakeTransport.from_settings(s), HandleKeys.load(s.handle_key_file),
                             handle_ttl_s=s.handle_ttl_s, alloc_wait_s=s.alloc_wait_s)
        self.encode_seconds, self.encode_count = 0.0, 0
        self.vision_batches, self.vision_done = 0, 0.0  # batches that ran the tower, when the last ended
        self.trimmed_at = 0  # vision_batches at the last heap trim
        self.progress = Progress()  # batches done, for the supervisor's liveness rule (liveness.py)
        self.processor.on_progress = self.progress.advance  # a long clip's decode is not a hang
        self._stop = threading.Event()
        log.info("encoder ready: checkpoint %s, dtype %s, device %s, staging pools %s; settings: %s",
                 s.checkpoint_dir, self.encoder.dtype, s.device, self.buffers.capacity(), s.summary())
        self._reclaimer = threading.Thread(target=self._reclaim_loop, args=(reclaim_interval_s,), daemon=True)
        self._reclaimer.start()

    def _reclaim_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:  # this thread frees slots: it must outlive any bug in one round
                self._round()
            except Exception:
                log.exception("encoder background round failed")

    def _round(self) -> None:
        self.stager.reclaim()
        # While no batch runs (a trim holds the heap's locks for 10-20 ms), after TRIM_BATCHES
        # vision batches or once idle for TRIM_IDLE_S after one: the next batch faults in every
        # page a trim gave back (moderate checkpoint, one image: 9-12 k faults, 40-70 ms more).
        new, idle = self.vision_batches - self.trimmed_at, time.monotonic() - self.vision_done
        if not self.progress.busy and (new >= TRIM_BATCHES or (new and idle >= TRIM_IDLE_S)):
            self.trimmed_at = self.vision_batches
            trim_heap()
        self.on_tick()

    def encode(self, jobs: list[EncodeJob]) -> list[bytes | EpdError]:
        """Handles (or errors) for a batch: one packed vision forward; a bad request fails alone."""
        t0 = time.perf_counter()
        s = self.settings
        idle = bool(jobs) and all(j.language_idle for j in jobs)
        set_thread_count(batch_threads(s.torch_threads, idle, self.buffers.slot_pool.in_use()))
        self.progress.begin()
        results: list[bytes | EpdError | None] = [None] * len(jobs)
        processed = {}
        for i, r in enumerate(jobs):
            try:
                check_request(r.text, r.sampling, s)
                processed[i] = self.processor.process(r.text, r.images, r.raw_prompt, self.cache, r.videos,
                                                      r.video_options)
            except EpdError as e:
                results[i] = e
        # patches of the images and clips not cached
        patches = sum(p.pixel_values.shape[0] + p.pixel_values_videos.shape[0] for p in processed.values())
        self.progress.units = patches
        self.pace.start(patches)
        encoded = self.encoder.encode(list(processed.values()), self.cache)
        for i, prompt in zip(processed, encoded):
            try:
                results[i] = self.stager.stage(prompt)
            except EpdError as e:
                results[i] = e
        seconds = time.perf_counter() - t0
        self.encode_seconds += seconds
        self.encode_count += len(jobs)
        if patches:
            self.vision_batches, self.vision_done = self.vision_batches + 1, time.monotonic()
        self.progress.done(seconds, patches)
        return results

    def close(self) -> None:
        self._stop.set()
        self._reclaimer.join()
        self.stager.close()
