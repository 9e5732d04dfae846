"""What scripts/serve shows of tritonserver's output: warnings and errors that mean something, a
line per model as it loads; not the info chatter, nor what a machine without a GPU always logs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

# glog lines (tritonserver and Mooncake alike): I/W/E/F, date, time, thread, file:line] message
GLOG = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ ([\w.]+:\d+)\] (.*)$")
LOADED = re.compile(r'successfully loaded \'(\w+)\'')
OURS = re.compile(r'^"?(qwen3vl_epd\.[\w.]+: .*?)"?$')

# Logged on every start of a machine without a GPU, or by Mooncake's tcp setup; none needs action.
EXPECTED = [
    "CudaDriverHelper has not been initialized",
    "unable to create stream for ensemble: CUDA driver",
    "pinned system memory",
    "Failed to initialize NVML",
    "DCGM unable to start",
    "Logging before InitGoogleLogging",
    "Using default malloc/free for protocol",
    "No RDMA devices found",
    "Local segment descriptor not found",
    "Memory allocator already initialized",
]


def has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def cpu_only_flags() -> list[str]:
    """tritonserver options that keep it from looking for CUDA memory and GPU metrics."""
    return ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0", "--allow-gpu-metrics=false"]


class Console:
    """filter(line) → the line to show (possibly reworded), or None."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def filter(self, line: str) -> str | None:
        line = line.rstrip("\n")
        if self.verbose:
            return line
        if any(text in line for text in EXPECTED) or line.startswith(("+", "|")) or not line.strip():
            return None  # the expected noise, and the info tables tritonserver prints at start
        found = GLOG.match(line)
        if found is None:
            return line
        level, _, message = found.groups()
        if level == "I":
            loaded = LOADED.search(message)
            if loaded:
                return f"loaded model {loaded.group(1)}"
            ours = OURS.match(message)  # our package's own info lines (start-up summaries)
            return ours.group(1) if ours else None
        return line
