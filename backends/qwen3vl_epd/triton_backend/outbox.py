"""The language model's way out: responses leave on their own thread, Triton is asked on another
whether live requests were cancelled; both tell the service what happened to a request."""

from __future__ import annotations

import dataclasses
import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from qwen3vl_epd.language.request import LanguageRequest, Phase, Piece, TokenLogprob

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Reply:
    """Where one request's responses go: its Triton response sender, and Triton's is_cancelled,
    which must never run once the final response is sent (tritonserver frees the request then,
    and asking it segfaults the server)."""

    sender: object
    is_cancelled: Callable[[], bool] = lambda: False
    request: LanguageRequest | None = None
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancelled(self) -> bool:
        with self.lock:
            return not self.closed and self.is_cancelled()

    def close(self) -> None:
        """Before the final response: no is_cancelled starts after this, none is still running."""
        with self.lock:
            self.closed = True


def merge_pieces(batch: list[tuple[object, Piece]]) -> list[tuple[object, Piece]]:
    """Queued (sender, piece) pairs with consecutive plain pieces of one sender joined into one;
    the order within each sender is kept, and errors and final pieces are never merged into."""
    out: list[tuple[object, Piece]] = []
    last: dict[int, int] = {}  # sender id → index in out of its latest piece
    for sender, piece in batch:
        i = last.get(id(sender))
        plain = piece.error is None and piece.finish_reason != "cancelled"
        if i is not None and plain and out[i][1].finish_reason is None and out[i][1].error is None:
            out[i] = (sender, dataclasses.replace(piece, text=out[i][1].text + piece.text,
                                                  logprobs=out[i][1].logprobs + piece.logprobs))
        else:
            last[id(sender)] = len(out)
            out.append((sender, piece))
    return out


def accumulate(stream: bool, put: Callable[[Piece], None]) -> Callable[[Piece], None]:
    """A request's sink: every piece when streaming, else one piece with the whole text at the end."""
    if stream:
        return put
    texts: list[str] = []
    logprobs: list = []

    def respond(piece: Piece) -> None:
        if piece.error is not None or piece.finish_reason == "cancelled":
            put(piece)
        else:
            texts.append(piece.text)
            logprobs.extend(piece.logprobs)
            if piece.finish_reason:
                put(dataclasses.replace(piece, text="".join(texts), logprobs=logprobs))

    return respond


class Outbox:
    """A send is a blocking round trip to the server process; the engine's next forward should
    not wait for it, so sends run here. A send that fails (the client is gone) cancels its request."""

    def __init__(self, send: Callable[[object, Piece], None], cancel: Callable[[LanguageRequest], None]):
        self.send, self.cancel = send, cancel
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="epd-outbox", daemon=True)
        self._thread.start()

    def put(self, reply: Reply, piece: Piece) -> None:
        self._queue.put((reply, piece))

    def close(self) -> None:
        self._queue.put(None)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while not self._queue.empty() and (item := self._queue.get()) is not None:
                batch.append(item)
            for reply, piece in merge_pieces(batch):
                if piece.final:
                    reply.close()
                try:
                    self.send(reply.sender, piece)
                except Exception:  # the client is gone: its generation stops
                    if reply.request is not None and not piece.final:
                        self.cancel(reply.request)
            if item is None:
                return


class CancelWatch:
    """Asks Triton whether each live request was cancelled (a round trip each, so this often at
    most: `interval_s`) and tells the service; a request is forgotten once it is done."""

    def __init__(self, interval_s: float, cancel: Callable[[LanguageRequest], None]):
        self.interval_s, self.cancel = max(interval_s, 0.001), cancel
        self._live: dict[LanguageRequest, Callable[[], bool]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="epd-cancel-watch", daemon=True)
        self._thread.start()

    def add(self, request: LanguageRequest, is_cancelled: Callable[[], bool]) -> None:
        with self._lock:
            self._live[request] = is_cancelled

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                live = list(self._live.items())
            for request, is_cancelled in live:
                try:
                    gone = request.phase is Phase.DONE or is_cancelled()
                except Exception:
                    log.exception("request %s: is_cancelled failed; cancelling it", request.id)
                    gone = True
                if gone:
                    with self._lock:
                        self._live.pop(request, None)
                    if request.phase is not Phase.DONE:
                        self.cancel(request)


def logprobs_json(logprobs: list[TokenLogprob]) -> bytes:
    """The `token_logprobs` output: one {token_id, token, logprob, top_logprobs} per token."""
    return json.dumps([{"token_id": t.token_id, "token": t.token, "logprob": t.logprob,
                        "top_logprobs": [{"token_id": i, "token": s, "logprob": lp} for i, s, lp in t.top]}
                       for t in logprobs]).encode()
