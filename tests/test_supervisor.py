"""The supervisor's watch of model processes, on real processes standing in for stubs."""

import os
import signal
import subprocess
import sys
import time

import pytest

from qwen3vl_epd.ops.supervisor import Stub, stub_fault

pytestmark = pytest.mark.unit


def test_a_stub_that_dies_or_stops_is_a_fault_named_by_its_instance():
    region = f"triton_python_backend_shm_region_test-{os.getpid()}"
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", region])
    stubs = {process.pid: Stub(region, "language_0_0")}
    try:
        assert stub_fault(stubs) is None
        os.kill(process.pid, signal.SIGSTOP)
        time.sleep(0.2)
        assert stub_fault(stubs) == f"model process language_0_0 (pid {process.pid}) is stopped"
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.2)
        assert stub_fault(stubs) is None
        process.kill()
        time.sleep(0.2)  # a zombie until reaped: dead all the same
        assert stub_fault(stubs) == f"model process language_0_0 (pid {process.pid}) died"
        process.wait()
        assert stub_fault(stubs) == f"model process language_0_0 (pid {process.pid}) died"
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
