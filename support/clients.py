"""Client frameworks people point at OpenAI-compatible servers, in a venv of their own (their pins
are not the server's): made on first use under .venv-clients/, remade when the pins change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-clients"
PINS = ["langchain-openai==1.7.4", "langchain-core==1.8.3", "openai==3.57.0"]


def python() -> Path:
    """The clients' venv python, made if missing."""
    stamp, exe = VENV / ".epd-pins", VENV / "bin" / "python"
    if not exe.exists() or not stamp.exists() or stamp.read_text() != " ".join(PINS):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(exe), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS], check=True)
        stamp.write_text(" ".join(PINS))
    return exe
