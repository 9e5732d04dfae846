"""Model settings: config.pbtxt `parameters`, each overridden by an `EPD_<NAME>` environment variable
(EPD_CHECKPOINT, EPD_ENCODERS, ...), which is how `scripts/serve --role` configures a server."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = REPO_ROOT / "checkpoints" / "tiny"
ENV_PREFIX = "EPD_"


@dataclass
class Settings:
    """What both sides read; EncoderSettings and LanguageSettings add their own. The defaults here
    are the only ones: config.pbtxt files and the README state the same (a test checks)."""

    checkpoint: str = ""  # empty: the embedded tiny checkpoint
    dtype: str = "auto"  # auto: the checkpoint's dtype
    device: str = "cpu"
    # Mooncake
    mooncake_host: str = "127.0.0.1"  # the address peers reach this process at; "auto": the default route's
    mooncake_protocol: str = "tcp"
    mooncake_device: str = ""
    mooncake_metadata_server: str = "P2PHANDSHAKE"
    mooncake_ports: str = ""  # "MIN-MAX": the range both Mooncake listeners take their ports from (firewalls)
    handle_key_file: str = ""  # empty: EPD_HANDLE_KEY_FILE, EPD_HANDLE_KEY, else a key per server (signing.py)
    transfer_timeout_s: float = 5.0  # bound on a Mooncake connect, read or write; then UNAVAILABLE
    # buffers: rows per block (the encoder's pools are sized in EncoderSettings)
    block_tokens: int = 64
    block_visual: int = 64
    alloc_wait_s: float = 5.0  # back-pressure: wait this long for a full pool, then UNAVAILABLE
    # request limits
    max_model_len: int = 32768
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256

    @classmethod
    def from_parameters(cls, params: dict, env: dict | None = None) -> Settings:
        """From config.pbtxt parameters ({"key": {"string_value": "..."}} or plain strings), then the
        environment's EPD_<NAME> overrides."""
        env = os.environ if env is None else env
        values = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, raw in params.items():
            if key not in types:
                raise ValueError(f"unknown parameter {key!r}; known: {', '.join(sorted(types))}")
            text = raw["string_value"] if isinstance(raw, dict) else str(raw)
            values[key] = _convert(types[key], text, key)
        for key, kind in types.items():
            text = env.get(ENV_PREFIX + key.upper())
            if text:
                values[key] = _convert(kind, text, ENV_PREFIX + key.upper())
        return cls(**values)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint or str(DEFAULT_CHECKPOINT)

    def torch_dtype(self, config):
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        dt = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None) or torch.float32
        return getattr(torch, dt) if isinstance(dt, str) else dt


    def summary(self) -> str:
        """Every setting as name=value, for the start-up log line."""
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


@dataclass
class EncoderSettings(Settings):
    # The vision tower's intra-op threads (0: for each batch, every core when its language servers
    # on this host computed nothing as they sent it, else the cores the host leaves idle, at least one).
    torch_threads: int = 0
    num_token_blocks: int = 512
    num_visual_blocks: int = 256
    num_slots: int = 64
    handle_ttl_s: float = 120.0
    encoder_cache_mb: float = 1024.0  # encoder outputs kept per image content (0: no cache)
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    max_video_bytes: int = 64 * 1024 * 1024
    max_video_seconds: float = 600.0
    max_video_frames: int = 768  # frames sampled from one clip (the reference's own maximum)
    max_video_pixels: int = 8_294_400  # per frame, from the header: 3840x2160
    max_videos: int = 4
    max_visual_tokens: int = 32768  # image and video tokens of one prompt, after resizing


@dataclass
class LanguageSettings(Settings):
    # The engine thread's intra-op threads (0: one per core, one for a model with hidden size below
    # 512), the only thread here that computes in parallel; one fewer while a local encoder works.
    torch_threads: int = 0
    allowed_encoder_hosts: list[str] = field(default_factory=list)  # hosts or CIDR; empty: this host only
    # the encoder pool: a gRPC target, e.g. "ipv4:10.0.1.2:8001,10.0.2.2:8001" or "dns:///enc:8001"
    encoders: str = "127.0.0.1:8001"
    encode_timeout_s: float = 600.0  # bound on one encode (a large image on a CPU tower takes minutes)
    encoder_wait_s: float = 10.0  # how long a request waits for a reachable encoder, then UNAVAILABLE
    transfer_workers: int = 8  # threads that run the Mooncake reads and release writes
    chunk_tokens: int = 2048  # prompt tokens pulled and prefilled per chunk
    # engine
    kv_cache_tokens: int = 65536  # KV cache budget, in tokens, allocated at start
    kv_block_size: int = 16  # scripts/serve --device cuda makes it 256, the paged flash-attention unit
    attention_backend: str = "auto"  # auto: flash on CUDA (fp16/bf16, kv_block_size % 256 == 0), else sdpa
    prefix_cache: bool = True  # reuse the KV of full prompt blocks other requests computed (LRU)
    max_batched_tokens: int = 512  # tokens per forward: decode tokens plus prompt chunks (the first chunk always runs)
    max_running: int = 256
    max_queued_requests: int = 1024  # requests waiting for the engine (and prompts with images held); more: UNAVAILABLE
    max_queue_s: float = 600.0  # a request not admitted within this gets UNAVAILABLE (retry)
    # is_cancelled() is a round trip to the server, each live request's this often at most: at 20 ms,
    # 16 streams made 800 a second, 6% of a core on a 2-core host that the engine's step paid for.
    cancel_check_ms: float = 200.0


def pbtxt_parameters(config_pbtxt: str | Path) -> dict[str, str]:
    """The `parameters` of a config.pbtxt, for tools that read a model's settings without Triton."""
    text = Path(config_pbtxt).read_text()
    return dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}', text))


def _convert(kind: str, text: str, key: str):
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind.startswith("list"):
            return [s.strip() for s in text.split(",") if s.strip()]
        return text
    except ValueError:
        raise ValueError(f"parameter {key!r}: {text!r} is not a valid {kind}") from None
