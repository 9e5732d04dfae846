"""The engine thread's CPU threads: the only thread of the process that computes in parallel, and
one that leaves a core to an encoder on this host while that works for it."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from pathlib import Path

import torch

# libgomp's, loaded by torch: sets the calling thread's OpenMP count alone (torch.set_num_threads
# also sets the default every thread that starts using torch later gets).
_OMP_SET_NUM_THREADS = getattr(ctypes.CDLL(None), "omp_set_num_threads", None)


def _mkl(name: str):
    """An MKL entry point of torch's own (linked into libtorch_cpu, Fortran-style: arguments by
    reference); None where this torch has none."""
    try:
        return getattr(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")), name)
    except (OSError, AttributeError):
        return None


# MKL keeps its own count, global but for a thread-local override: the F.linear of more rows than
# packed.PACKED_ROWS (prefill) ran on one thread in the engine after the others' reset to 1.
_MKL_SET_LOCAL, _MKL_MAX_THREADS = _mkl("mkl_set_num_threads_local"), _mkl("mkl_get_max_threads")


def set_thread_count(n: int) -> None:
    """OpenMP's and MKL's counts for the calling thread alone."""
    if _OMP_SET_NUM_THREADS is not None:
        _OMP_SET_NUM_THREADS(n)
    if _MKL_SET_LOCAL is not None:
        _MKL_SET_LOCAL(ctypes.byref(ctypes.c_int(n)))


def mkl_threads() -> int | None:
    """MKL's count for the calling thread."""
    return _MKL_MAX_THREADS() if _MKL_MAX_THREADS is not None else None
# Below this hidden size a layer's products are too small to split: the embedded tiny checkpoint
# (64) served 10-20% fewer tokens/s on two threads than on one, the 325 M one (768) 20-35% more.
PARALLEL_HIDDEN = 512


def engine_threads(setting: int, hidden_size: int) -> int:
    """The engine's threads: `setting`, or for 0 one per core (one for a model below PARALLEL_HIDDEN)."""
    if setting:
        return setting
    return len(os.sched_getaffinity(0)) if hidden_size >= PARALLEL_HIDDEN else 1


def take_threads(n: int) -> None:
    """This thread computes with n torch intra-op threads, kept when another thread then sets the
    default back to 1 for every thread that starts using torch later (LanguageService does). With
    libgomp, a second thread's OpenMP pool puts more OpenMP threads than cores in the process, and
    then every pool spins only briefly between parallel ops and sleeps: each op waits to wake its
    workers (measured: a decode step 1.3-1.5× slower with an idle pool beside it)."""
    torch.set_num_threads(n)
    torch.get_num_threads()  # torch fixes a thread's OpenMP count at its first parallel op, or here
    set_thread_count(n)


class CoreShare:
    """`threads` for each step, one fewer while `encoder_busy()`: both processes
    on every core would stall each parallel op on a thread the other holds (a 2-core host served
    images at 0.6 of the throughput that way)."""

    def __init__(self, threads: int, encoder_busy: Callable[[], bool] = lambda: False):
        self.threads = threads
        self.encoder_busy, self.current = encoder_busy, self.threads

    def take(self) -> None:
        """On the engine's thread, before its first step."""
        take_threads(self.threads)

    def step(self) -> None:
        want = max(1, self.threads - 1) if self.encoder_busy() else self.threads
        if want != self.current:
            set_thread_count(want)
            self.current = want
