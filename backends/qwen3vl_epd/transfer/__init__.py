"""Mooncake transfer of the five buffers: the handle, the transport, encoder-side staging, language-side pull."""

import importlib

# Loaded on first use: `signing` alone (what the launcher needs) must not pull in torch and transformers.
_HOME = {"Handle": "handle", "HandleKeys": "signing", "MooncakeTransport": "transport", "PullSession": "session",
         "PullStats": "puller", "Puller": "puller", "Stager": "stager"}
__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
