"""The torch and Mooncake builds scripts/setup installs: CUDA ones where there is an NVIDIA GPU
(or EPD_DEVICE=cuda…), CPU ones otherwise (or EPD_DEVICE=cpu). Standard library only: it runs
before the venv exists. Prints the kind, then one line of pip arguments per install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

TORCH = "torch==2.13.0"
MOONCAKE_VERSION = "0.3.13.post1"
# Same version, same `mooncake.engine` import; only the CUDA build reads and writes GPU memory.
MOONCAKE = {"cpu": "mooncake-transfer-engine-non-cuda", "cuda": "mooncake-transfer-engine"}


def has_nvidia_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def device_kind(env: dict[str, str], gpu: bool) -> str:
    """EPD_DEVICE decides when set (cpu, cuda, cuda:N); else the machine does."""
    device = env.get("EPD_DEVICE", "")
    if device == "cpu":
        return "cpu"
    if device == "cuda" or device.startswith("cuda:"):
        return "cuda"
    if device:
        raise SystemExit(f"EPD_DEVICE: {device!r} is not cpu, cuda or cuda:N")
    return "cuda" if gpu else "cpu"


def installs(kind: str) -> list[list[str]]:
    """pip arguments, one install each. CUDA torch comes from the package index alone (--isolated:
    a local CPU wheel on find-links would otherwise win, its +cpu version sorting higher)."""
    torch = ["--isolated", TORCH] if kind == "cuda" else [TORCH]
    return [torch, [f"{MOONCAKE[kind]}=={MOONCAKE_VERSION}"]]


def other_mooncake(kind: str) -> str:
    """The build to remove when switching: both install the same `mooncake` package."""
    return MOONCAKE["cpu" if kind == "cuda" else "cuda"]


if __name__ == "__main__":
    kind = device_kind(dict(os.environ), has_nvidia_gpu())
    print(kind)
    print(other_mooncake(kind))
    for args in installs(kind):
        print(" ".join(args))
    sys.exit(0)
