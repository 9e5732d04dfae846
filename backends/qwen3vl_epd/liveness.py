"""Liveness evidence a model process publishes for its supervisor, which no request can hold up:
a heartbeat written by a thread of its own, and progress (batches, engine steps) while it holds work.

The rule (ops/supervisor.py acts on it): a model process is hung when its heartbeat is older than
`heartbeat_s` (frozen, or its interpreter wedged), or when it holds work and has not finished a
unit of it for longer than its bound: `factor` × the units in hand × its slowest recent seconds
per unit, at least `floor_s`, at most `ceiling_s` (and `ceiling_s` before it has any history). A
long forward is busy, not hung; only an idle model is sent a deep probe (a real tiny request), and
a language model with requests waiting on encoders is not idle: a probe's prefill there would
take the cores from the encoder working for it (a lone image's first token 0.15 s later)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

BEAT_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def beat_path(pid: int) -> Path:
    return BEAT_DIR / f"epd-beat-{pid}.json"


@dataclass
class Beat:
    time: float  # wall clock of this beat
    busy: bool  # holds work: an encode batch running, sequences in the engine
    progress: int  # units of work finished: batches, engine steps
    since: float  # wall clock progress last advanced, or the work in hand began
    units: int  # size of the work in hand (patches, tokens); 0: not known yet
    rate: float  # slowest recent seconds per unit; 0: no history yet
    waiting: int = 0  # requests in hand that wait on another model (an encoder): not probed, not judged


@dataclass(frozen=True)
class Bounds:
    heartbeat_s: float = 5.0
    floor_s: float = 10.0
    # Generous: work of the same size can take longer than its rate says (attention grows with the
    # square of an image's patches), and a healthy server killed is what this rule exists to prevent.
    factor: float = 8.0
    ceiling_s: float = 900.0

    def progress_s(self, beat: Beat) -> float:
        """How long the work in hand may go without progress before the process counts as hung."""
        if beat.rate <= 0:
            return self.ceiling_s
        return min(self.ceiling_s, max(self.floor_s, self.factor * max(beat.units, 1) * beat.rate))

    def hung(self, beat: Beat | None, now: float | None = None) -> str | None:
        """Why a process with this beat is hung, else None (None too when it has not beaten yet)."""
        if beat is None:
            return None
        now = time.time() if now is None else now
        if now - beat.time > self.heartbeat_s:
            return f"no heartbeat for {now - beat.time:.1f} s (bound {self.heartbeat_s:g} s)"
        bound = self.progress_s(beat)
        if beat.busy and now - beat.since > bound:
            return f"no progress for {now - beat.since:.1f} s while holding work (bound {bound:.1f} s)"
        return None


def read_beat(pid: int) -> Beat | None:
    try:
        return Beat(**json.loads(beat_path(pid).read_text()))
    except (OSError, ValueError, TypeError):
        return None


class Progress:
    """What the model's execute path reports: work begun (with its size in units), work finished.
    Plain attribute writes, so reporting never waits for the heartbeat thread."""

    def __init__(self):
        self.busy, self.count, self.units, self.waiting = False, 0, 0, 0
        self.since = time.time()
        self.rates: deque[float] = deque(maxlen=32)  # seconds per unit of recent work

    def begin(self, units: int = 0) -> None:
        if not self.busy:
            self.since = time.time()
        self.busy, self.units = True, units

    def advance(self) -> None:
        """The work in hand moved on without finishing a unit (a frame decoded): its bound restarts."""
        self.since = time.time()

    def done(self, seconds: float, units: int, still_busy: bool = False) -> None:
        """A unit of work ended; only work with a size (a forward ran) counts in the rates."""
        self.count += 1
        if units > 0:
            self.rates.append(seconds / units)
        self.since, self.busy, self.units = time.time(), still_busy, 0

    def beat(self) -> Beat:
        return Beat(time.time(), self.busy, self.count, self.since, self.units, max(self.rates, default=0.0),
                    self.waiting)


class Heartbeat:
    """A daemon thread that writes this process's Beat every `interval_s` (atomically: write, rename)."""

    def __init__(self, progress: Progress, interval_s: float = 0.25, pid: int | None = None):
        self.progress, self.interval_s = progress, interval_s
        self.path = beat_path(pid or os.getpid())
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="epd-heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        while True:
            tmp.write_text(json.dumps(asdict(self.progress.beat())))
            os.replace(tmp, self.path)
            if self._stop.wait(self.interval_s):
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)
