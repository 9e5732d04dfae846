"""The handle (what goes through Triton instead of the tensors) and the aux header it must match."""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import asdict, dataclass

import torch

from qwen3vl_epd.errors import HandleError, HandleExpiredError
from qwen3vl_epd.prompt.prefix import HASH_TOKENS
from qwen3vl_epd.transfer.blocks import blocks_for
from qwen3vl_epd.transfer.buffers import AUX_WIDTH
from qwen3vl_epd.transfer.signing import HandleKeys

PROTOCOL_VERSION = 4
MAGIC = 0x45504400  # "EPD\0"; the low byte carries the version
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CODES = {name: i + 1 for i, name in enumerate(DTYPES)}

# aux row fields (int64)
MAGIC_VERSION, NONCE, GENERATION, LENGTH, VISUAL, DEEPSTACK, HIDDEN, DTYPE, DELTA, IMAGES, SLOT = range(11)
# the fields a reader compares with its handle besides nonce and generation
HEADER_FIELDS = (MAGIC_VERSION, LENGTH, VISUAL, DEEPSTACK, HIDDEN, DTYPE)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass
class Handle:
    """Where and how to read one staged request (docs/design.md), signed by the encoder over every field."""

    peer: str
    slot: int
    nonce: int
    generation: int
    length: int
    num_visual: int
    num_deepstack: int
    hidden_size: int
    dtype: str
    block_tokens: int
    block_visual: int
    token_blocks: list[int]
    visual_blocks: list[int]
    mrope_delta: int
    visual_spans: list[list[int]]
    addresses: dict[str, int]  # base address of each remote buffer
    expires_ms: int  # unix time after which no reader may open it (the encoder's handle_ttl_s)
    prefix_hashes: str = ""  # base64 of the prompt's prefix hash chain (prefix.block_hashes)
    version: int = PROTOCOL_VERSION
    signature: str = ""  # HMAC-SHA256 of every other field

    def encode(self, keys: HandleKeys) -> bytes:
        """Signed JSON."""
        fields = asdict(self)
        fields["signature"] = keys.sign(signing_payload(fields))
        return json.dumps(fields, separators=(",", ":")).encode()

    @property
    def identity(self) -> tuple:
        """What makes a handle unique: a language server opens each one at most once."""
        return self.peer, self.slot, self.generation, self.nonce

    @property
    def name(self) -> str:
        return f"handle(peer={self.peer}, slot={self.slot}, generation={self.generation})"

    @property
    def block_hashes(self) -> list[bytes]:
        raw = base64.b64decode(self.prefix_hashes)
        return [raw[i:i + 32] for i in range(0, len(raw), 32)]

    @classmethod
    def decode(cls, data: bytes | str, keys: HandleKeys) -> Handle:
        """Verify the signature, then parse and check the handle's own consistency and expiry;
        HandleError when unsigned, forged, tampered, malformed or expired."""
        try:
            raw = json.loads(data)
        except Exception as e:
            raise HandleError(f"malformed handle: {e}") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("signature"), str) or not keys.verify(
                signing_payload(raw), raw["signature"]):
            raise HandleError("handle signature is missing or wrong: the handle is unsigned, forged, tampered "
                              "with, or signed with a key this server does not accept")
        try:
            if raw.get("version") != PROTOCOL_VERSION:
                raise HandleError(
                    f"handle version {raw.get('version')!r} is not supported (this server speaks {PROTOCOL_VERSION})")
            h = cls(**raw)
        except HandleError:
            raise
        except Exception as e:
            raise HandleError(f"malformed handle: {e}") from None
        h._check()
        if time.time() * 1000 > h.expires_ms:
            raise HandleError(f"{h.name} expired {time.time() - h.expires_ms / 1000:.1f} s ago")
        return h

    def _check(self) -> None:
        ints = [self.slot, self.nonce, self.generation, self.length, self.num_visual, self.num_deepstack,
                self.hidden_size, self.block_tokens, self.block_visual, self.mrope_delta, self.expires_ms]
        problems = []
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            problems.append("integer fields are not all integers")
        elif min(self.slot, self.length, self.num_visual, self.num_deepstack) < 0 or min(
                self.block_tokens, self.block_visual, self.hidden_size, self.length) <= 0:
            problems.append("negative or zero sizes")
        elif len(self.token_blocks) != blocks_for(self.length, self.block_tokens):
            problems.append(f"{len(self.token_blocks)} token blocks for {self.length} tokens")
        elif len(self.visual_blocks) != blocks_for(self.num_visual, self.block_visual):
            problems.append(f"{len(self.visual_blocks)} visual blocks for {self.num_visual} visual rows")
        elif sum(n for _, n in self.visual_spans) != self.num_visual:
            problems.append("image spans do not add up to the visual rows")
        try:
            hashed = len(base64.b64decode(self.prefix_hashes, validate=True))
        except (binascii.Error, TypeError, ValueError):
            hashed = -1
        if hashed % 32 or hashed // 32 > self.length // HASH_TOKENS:
            problems.append("prefix hashes do not fit the prompt")
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r}")
        if not isinstance(self.peer, str) or self.peer.count(":") != 1:
            problems.append(f"peer {self.peer!r} is not host:port")
        needed = {"fill_ids", "mrope_positions", "embeddings", "aux", "release"}
        if not isinstance(self.addresses, dict) or not needed <= set(self.addresses):
            problems.append("buffer addresses missing")
        if problems:
            raise HandleError(f"malformed handle: {'; '.join(problems)}")


def signing_payload(fields: dict) -> bytes:
    """What the signature covers: every field but the signature, in a canonical JSON."""
    return json.dumps({k: v for k, v in fields.items() if k != "signature"}, sort_keys=True,
                      separators=(",", ":")).encode()


def aux_row(h: Handle) -> list[int]:
    """The aux header the encoder writes into the handle's slot, and a reader expects to find there."""
    row = [0] * AUX_WIDTH
    row[MAGIC_VERSION], row[NONCE], row[GENERATION] = MAGIC | PROTOCOL_VERSION, h.nonce, h.generation
    row[LENGTH], row[VISUAL], row[DEEPSTACK], row[HIDDEN] = h.length, h.num_visual, h.num_deepstack, h.hidden_size
    row[DTYPE], row[DELTA], row[IMAGES], row[SLOT] = DTYPE_CODES[h.dtype], h.mrope_delta, len(h.visual_spans), h.slot
    return row


def check_header(h: Handle, aux: list[int], what: str) -> None:
    """The header read from the encoder's slot must be this handle's: same generation (not
    reclaimed), same nonce (not forged or reused), same shape."""
    if aux[GENERATION] != h.generation:
        raise HandleExpiredError(
            f"{h.name} expired: the encoder reclaimed slot {h.slot} (now generation {aux[GENERATION]}); "
            f"it was already released or outlived handle_ttl_s ({what})")
    if aux[NONCE] != h.nonce:
        raise HandleError(f"{h.name}: nonce mismatch, the handle is forged or reused ({what})")
    expected = aux_row(h)
    got, want = [aux[i] for i in HEADER_FIELDS], [expected[i] for i in HEADER_FIELDS]
    if got != want:
        raise HandleError(f"{h.name}: header {got} does not match the handle {want} ({what})")
