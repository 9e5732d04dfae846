"""The supervisor's watch of model processes, on real processes standing in for stubs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from qwen3vl_epd.ops.supervisor import Stub, stub_fault

pytestmark = pytest.mark.unit


def settled(stubs, want, timeout=10.0):
    """stub_fault(stubs) once it says `want`, or what it says at the deadline (a signal, an exec and
    a reap take their time on a loaded machine)."""
    deadline = time.monotonic() + timeout
    while (got := stub_fault(stubs)) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    return got


def test_a_stub_that_dies_or_stops_is_a_fault_named_by_its_instance():
    region = f"triton_python_backend_shm_region_test-{os.getpid()}"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", region])
    stubs = {process.pid: Stub(region, "language_0_0")}
    try:
        assert settled(stubs, None) is None  # once the child has exec'd (its cmdline names the region)
        os.kill(process.pid, signal.SIGSTOP)
        stopped = f"model process language_0_0 (pid {process.pid}) is stopped"
        assert settled(stubs, stopped) == stopped
        os.kill(process.pid, signal.SIGCONT)
        assert settled(stubs, None) is None
        process.kill()
        died = f"model process language_0_0 (pid {process.pid}) died"
        assert settled(stubs, died) == died  # a zombie until reaped: dead all the same
        process.wait()
        assert stub_fault(stubs) == died
    finally:
        process.kill()
        process.wait()


def test_a_reused_pid_is_not_that_stub():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert stub_fault({process.pid: Stub("another-region", "encoder_0_0")}) == \
            f"model process encoder_0_0 (pid {process.pid}) died"
    finally:
        process.kill()
        process.wait()
