"""A thread's CPU thread counts (OpenMP's and MKL's, which torch keeps apart) and the cores the
host leaves idle: the encoder and the language engine each compute on one thread of their process."""

from __future__ import annotations

import ctypes
import os
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


# MKL keeps its own count, global but for a thread-local override: without it the F.linear of
# more rows than packed.PACKED_ROWS (prefill) ran on one thread in the engine after the others'
# reset to 1, and on two in a step meant to leave a core to the encoder.
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


def take_threads(n: int) -> None:
    """This thread computes with n torch intra-op threads, kept when another thread then sets the
    default back to 1 for every thread that starts using torch later (LanguageService does). With
    libgomp, a second thread's OpenMP pool puts more OpenMP threads than cores in the process, and
    then every pool spins only briefly between parallel ops and sleeps: each op waits to wake its
    workers (measured: a decode step 1.3-1.5× slower with an idle pool beside it)."""
    torch.set_num_threads(n)
    torch.get_num_threads()  # torch fixes a thread's OpenMP count at its first parallel op, or here
    set_thread_count(n)


def cores() -> int:
    return len(os.sched_getaffinity(0))


def procs_running() -> int:
    """Tasks running or ready to run on the host now, the caller included (/proc/stat)."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return cores()  # no such line: assume the host busy


def idle_cores(samples: int = 3) -> int:
    """Cores no other task wants, the least of a few readings (a reading catches threads that
    only pass through): an OpenMP thread spinning between ops counts as wanting its core."""
    running = min(procs_running() for _ in range(samples))
    return max(0, cores() - (running - 1))
