"""EngineConfig: the engine's settings in one object, by name (built from Settings' fields of the same names)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    kv_cache_tokens: int = 65536  # KV cache budget, in tokens, allocated at start
    kv_block_size: int = 16
    max_batched_tokens: int = 2048  # tokens per forward: decode tokens plus prompt chunks
    max_running: int = 256
    max_model_len: int = 32768
    cancel_check_ms: float = 20.0  # is_cancelled() is a round trip to the server: this often at most

    @classmethod
    def from_settings(cls, settings) -> EngineConfig:
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})
