"""Encoder side: stage encoded prompts in registered buffers, hand out handles, reclaim slots."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from dataclasses import dataclass

import torch

from qwen3vl_epd.prompt.encoded import EncodedPrompt
from qwen3vl_epd.transfer.buffers import MultimodalDataBuffers
from qwen3vl_epd.transfer.handle import GENERATION, Handle, aux_row, dtype_name
from qwen3vl_epd.transfer.signing import HandleKeys
from qwen3vl_epd.transfer.transport import MooncakeTransport


@dataclass
class _Staged:
    nonce: int
    token_blocks: list[int]
    visual_blocks: list[int]
    staged_at: float


class Stager:
    """Stages EncodedPrompts, one slot each, behind signed handles; a slot is reclaimed once released
    or after handle_ttl_s, and its token rows and header are zeroed then."""

    def __init__(self, buffers: MultimodalDataBuffers, transport: MooncakeTransport, keys: HandleKeys,
                 handle_ttl_s: float = 120.0, alloc_wait_s: float = 5.0):
        self.buffers, self.transport, self.keys = buffers, transport, keys
        self.handle_ttl_s, self.alloc_wait_s = handle_ttl_s, alloc_wait_s
        self._staged: dict[int, _Staged] = {}
        self._generation = [0] * buffers.config.num_slots
        self._lock = threading.Lock()
        transport.register(buffers.regions())

    def close(self) -> None:
        """Unregister the buffers; outstanding handles then fail to read."""
        self.transport.unregister(self.buffers.regions())

    def stage(self, prompt: EncodedPrompt) -> bytes:
        """The signed handle of the staged prompt."""
        b = self.buffers
        if prompt.embeddings.shape[1] != b.hidden_size or prompt.deepstack.shape[1] != b.num_deepstack * b.hidden_size:
            raise ValueError("encoded prompt does not match the buffer dimensions")
        self.reclaim()
        slot, tok, vis = b.allocate_waiting(prompt.length, prompt.num_visual, True, self.alloc_wait_s, "encoder",
                                            before_retry=self.reclaim)
        b.scatter(tok, vis, prompt.fill_ids, prompt.mrope_positions, prompt.embeddings, prompt.deepstack)
        nonce = secrets.randbits(62) + 1
        with self._lock:
            self._generation[slot] += 1
            handle = Handle(
                peer=self.transport.session_id, slot=slot, nonce=nonce, generation=self._generation[slot],
                length=prompt.length, num_visual=prompt.num_visual, num_deepstack=b.num_deepstack,
                hidden_size=b.hidden_size, dtype=dtype_name(b.dtype), block_tokens=b.config.block_tokens,
                block_visual=b.config.block_visual, token_blocks=tok, visual_blocks=vis,
                mrope_delta=prompt.mrope_delta, visual_spans=[list(s) for s in prompt.visual_spans],
                addresses={k: t.data_ptr() for k, t in b.regions().items()},
                expires_ms=int((time.time() + self.handle_ttl_s) * 1000),
                prefix_hashes=base64.b64encode(b"".join(prompt.block_hashes())).decode(),
            )
            b.release[slot] = 0
            b.aux[slot] = torch.tensor(aux_row(handle), dtype=torch.int64)
            self._staged[slot] = _Staged(nonce, tok, vis, time.monotonic())
        return handle.encode(self.keys)

    def reclaim(self, now: float | None = None) -> int:
        """Free slots whose nonce a reader wrote back, and slots older than handle_ttl_s."""
        now = time.monotonic() if now is None else now
        freed = 0
        with self._lock:
            for slot, s in list(self._staged.items()):
                released = int(self.buffers.release[slot]) == s.nonce
                if released or now - s.staged_at > self.handle_ttl_s:
                    # New generation first, so a reader still in flight sees the slot change under it;
                    # then nothing of the request (prompt ids, positions, nonce) stays readable.
                    self._generation[slot] += 1
                    self.buffers.aux[slot, GENERATION] = self._generation[slot]
                    self.buffers.aux[slot, :GENERATION] = 0
                    self.buffers.aux[slot, GENERATION + 1:] = 0
                    self.buffers.release[slot] = 0
                    self.buffers.zero_token_rows(s.token_blocks)
                    del self._staged[slot]
                    self.buffers.free(slot, s.token_blocks, s.visual_blocks)
                    freed += 1
        return freed
