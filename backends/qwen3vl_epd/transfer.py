"""Mooncake transfer of the five buffers: handle codec, encoder-side staging, language-side pull."""

from __future__ import annotations

import json
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from .buffers import AUX_WIDTH, MultimodalDataBuffers
from .encoder import EncodedPrompt, clip_spans, visual_rows_before
from .errors import HandleError, HandleExpiredError, PeerError, PoolFullError

PROTOCOL_VERSION = 1
MAGIC = 0x45504400  # "EPD\0"; the low byte carries the version
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CODES = {name: i + 1 for i, name in enumerate(DTYPES)}

# aux row fields (int64)
MAGIC_VERSION, NONCE, GENERATION, LENGTH, VISUAL, DEEPSTACK, HIDDEN, DTYPE, DELTA, IMAGES, SLOT = range(11)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


class MooncakeTransport:
    """A Mooncake TransferEngine bound to this host; session id `host:rpc_port`."""

    def __init__(self, host: str = "127.0.0.1", protocol: str = "tcp", device: str = "",
                 metadata_server: str = "P2PHANDSHAKE"):
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        rc = self.engine.initialize(host, metadata_server, protocol, device)
        if rc != 0:
            raise RuntimeError(f"Mooncake initialize({host!r}, {metadata_server!r}, {protocol!r}) failed: {rc}")
        self.session_id = f"{host}:{self.engine.get_rpc_port()}"

    def register(self, buffers: MultimodalDataBuffers) -> None:
        location = "cpu" if buffers.device.type == "cpu" else f"cuda:{buffers.device.index or 0}"
        for name, t in buffers.regions().items():
            if self.engine.register_memory(t.data_ptr(), t.numel() * t.element_size(), location) != 0:
                raise RuntimeError(f"Mooncake could not register buffer {name}")

    def unregister(self, buffers: MultimodalDataBuffers) -> None:
        for t in buffers.regions().values():
            self.engine.unregister_memory(t.data_ptr())

    def read(self, peer: str, local: list[int], remote: list[int], lengths: list[int], what: str) -> None:
        """One batch read; PeerError naming the peer when it fails."""
        if lengths and self.engine.batch_transfer_sync_read(peer, local, remote, lengths) < 0:
            raise PeerError(f"encoder peer {peer} is unreachable or died while reading {what}")

    def write(self, peer: str, local: int, remote: int, length: int, what: str) -> None:
        if self.engine.transfer_sync_write(peer, local, remote, length) < 0:
            raise PeerError(f"encoder peer {peer} is unreachable or died while writing {what}")


@dataclass
class Handle:
    """What goes through Triton instead of the tensors (DESIGN §4): where and how to read them."""

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
    image_spans: list[list[int]]
    addresses: dict[str, int]  # base address of each remote buffer
    version: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @property
    def name(self) -> str:
        return f"handle(peer={self.peer}, slot={self.slot}, generation={self.generation})"

    @classmethod
    def decode(cls, data: bytes | str) -> Handle:
        """Parse and check the handle's own consistency; HandleError when malformed."""
        try:
            raw = json.loads(data)
            if raw.get("version") != PROTOCOL_VERSION:
                raise HandleError(
                    f"handle version {raw.get('version')!r} is not supported (this server speaks {PROTOCOL_VERSION})")
            h = cls(**raw)
        except HandleError:
            raise
        except Exception as e:
            raise HandleError(f"malformed handle: {e}") from None
        h._check()
        return h

    def _check(self) -> None:
        ints = [self.slot, self.nonce, self.generation, self.length, self.num_visual, self.num_deepstack,
                self.hidden_size, self.block_tokens, self.block_visual, self.mrope_delta]
        problems = []
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            problems.append("integer fields are not all integers")
        elif min(self.slot, self.length, self.num_visual, self.num_deepstack) < 0 or min(
                self.block_tokens, self.block_visual, self.hidden_size, self.length) <= 0:
            problems.append("negative or zero sizes")
        elif len(self.token_blocks) != -(-self.length // self.block_tokens):
            problems.append(f"{len(self.token_blocks)} token blocks for {self.length} tokens")
        elif len(self.visual_blocks) != -(-self.num_visual // self.block_visual):
            problems.append(f"{len(self.visual_blocks)} visual blocks for {self.num_visual} visual rows")
        elif sum(n for _, n in self.image_spans) != self.num_visual:
            problems.append("image spans do not add up to the visual rows")
        if self.dtype not in DTYPES:
            problems.append(f"unknown dtype {self.dtype!r}")
        if not isinstance(self.peer, str) or self.peer.count(":") != 1:
            problems.append(f"peer {self.peer!r} is not host:port")
        needed = {"fill_ids", "mrope_positions", "embeddings", "aux", "release"}
        if not isinstance(self.addresses, dict) or not needed <= set(self.addresses):
            problems.append("buffer addresses missing")
        if problems:
            raise HandleError(f"malformed handle: {'; '.join(problems)}")


def local_hosts() -> set[str]:
    """Names and addresses of this host: the default encoder allow-list."""
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        names.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return names


def _wait_allocate(buffers: MultimodalDataBuffers, tokens: int, visual: int, slot: bool, wait_s: float, who: str,
                   before_retry=None):
    """Back-pressure: retry for up to wait_s, then PoolFullError."""
    deadline = time.monotonic() + wait_s
    while True:
        got = buffers.allocate(tokens, visual, slot)
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            raise PoolFullError(
                f"{who} buffers full: need {tokens} token rows and {visual} visual rows, "
                f"in use {buffers.in_use()}, waited {wait_s:g} s")
        if before_retry is not None:
            before_retry()
        time.sleep(0.002)


@dataclass
class _Staged:
    nonce: int
    token_blocks: list[int]
    visual_blocks: list[int]
    staged_at: float


class Stager:
    """Encoder side: stages EncodedPrompts in registered buffers, hands out handles, reclaims slots."""

    def __init__(self, buffers: MultimodalDataBuffers, transport: MooncakeTransport,
                 handle_ttl_s: float = 120.0, alloc_wait_s: float = 5.0):
        self.buffers, self.transport = buffers, transport
        self.handle_ttl_s, self.alloc_wait_s = handle_ttl_s, alloc_wait_s
        self._staged: dict[int, _Staged] = {}
        self._generation = [0] * buffers.config.num_slots
        self._lock = threading.Lock()
        transport.register(buffers)

    def close(self) -> None:
        """Unregister the buffers; outstanding handles then fail to read."""
        self.transport.unregister(self.buffers)

    def stage(self, prompt: EncodedPrompt) -> Handle:
        b = self.buffers
        if prompt.embeddings.shape[1] != b.hidden_size or prompt.deepstack.shape[1] != b.num_deepstack * b.hidden_size:
            raise ValueError("encoded prompt does not match the buffer dimensions")
        self.reclaim()
        slot, tok, vis = _wait_allocate(b, prompt.length, prompt.num_visual, True, self.alloc_wait_s, "encoder",
                                        before_retry=self.reclaim)
        b.scatter(tok, vis, prompt.fill_ids, prompt.mrope_positions, prompt.embeddings, prompt.deepstack)
        nonce = secrets.randbits(62) + 1
        with self._lock:
            self._generation[slot] += 1
            gen = self._generation[slot]
            b.release[slot] = 0
            b.aux[slot] = torch.tensor(self._aux(nonce, gen, prompt, slot), dtype=torch.int64)
            self._staged[slot] = _Staged(nonce, tok, vis, time.monotonic())
        return Handle(
            peer=self.transport.session_id, slot=slot, nonce=nonce, generation=gen,
            length=prompt.length, num_visual=prompt.num_visual, num_deepstack=b.num_deepstack,
            hidden_size=b.hidden_size, dtype=dtype_name(b.dtype), block_tokens=b.config.block_tokens,
            block_visual=b.config.block_visual, token_blocks=tok, visual_blocks=vis,
            mrope_delta=prompt.mrope_delta, image_spans=[list(s) for s in prompt.image_spans],
            addresses={k: t.data_ptr() for k, t in b.regions().items()},
        )

    def _aux(self, nonce, gen, prompt, slot) -> list[int]:
        b = self.buffers
        row = [0] * AUX_WIDTH
        row[MAGIC_VERSION], row[NONCE], row[GENERATION] = MAGIC | PROTOCOL_VERSION, nonce, gen
        row[LENGTH], row[VISUAL], row[DEEPSTACK], row[HIDDEN] = (
            prompt.length, prompt.num_visual, b.num_deepstack, b.hidden_size)
        row[DTYPE], row[DELTA], row[IMAGES], row[SLOT] = (
            DTYPE_CODES[dtype_name(b.dtype)], prompt.mrope_delta, len(prompt.image_spans), slot)
        return row

    def reclaim(self, now: float | None = None) -> int:
        """Free slots whose nonce a reader wrote back, and slots older than handle_ttl_s."""
        now = time.monotonic() if now is None else now
        freed = 0
        with self._lock:
            for slot, s in list(self._staged.items()):
                released = int(self.buffers.release[slot]) == s.nonce
                if released or now - s.staged_at > self.handle_ttl_s:
                    # New generation first, so a reader still in flight sees the slot change under it.
                    self._generation[slot] += 1
                    self.buffers.aux[slot, GENERATION] = self._generation[slot]
                    self.buffers.aux[slot, NONCE] = 0
                    del self._staged[slot]
                    self.buffers.free(slot, s.token_blocks, s.visual_blocks)
                    freed += 1
        return freed


@dataclass
class PullStats:
    bytes_read: int = 0
    reads: int = 0
    seconds: float = 0.0
    entries: list[int] = field(default_factory=list)  # batch entries per read, last few


class Puller:
    """Language side: validates handles and reads the five buffers chunk by chunk."""

    def __init__(self, buffers: MultimodalDataBuffers, transport: MooncakeTransport, chunk_tokens: int = 2048,
                 allowed_hosts: set[str] | None = None, alloc_wait_s: float = 5.0):
        self.buffers, self.transport = buffers, transport
        self.chunk_tokens, self.alloc_wait_s = chunk_tokens, alloc_wait_s
        self.allowed_hosts = local_hosts() if allowed_hosts is None else set(allowed_hosts)
        self.stats = PullStats()
        transport.register(buffers)

    def close(self) -> None:
        self.transport.unregister(self.buffers)

    def open(self, data: bytes | str) -> PullSession:
        """Check the handle against this model and the allow-list; the session reads chunks."""
        h = Handle.decode(data)
        b = self.buffers
        ours = (b.hidden_size, b.num_deepstack, dtype_name(b.dtype))
        theirs = (h.hidden_size, h.num_deepstack, h.dtype)
        if ours != theirs:
            raise HandleError(
                f"{h.name} is for a model with hidden size {theirs[0]}, {theirs[1]} DeepStack levels, "
                f"dtype {theirs[2]}; this language model has {ours[0]}, {ours[1]}, {ours[2]}")
        host = h.peer.rsplit(":", 1)[0]
        if "*" not in self.allowed_hosts and host not in self.allowed_hosts:
            raise HandleError(f"{h.name}: encoder host {host!r} is not in the allowed encoder hosts")
        return PullSession(self, h)

    def pull(self, data: bytes | str) -> EncodedPrompt:
        """The whole prompt, read chunk by chunk, then the encoder slot released."""
        with self.open(data) as session:
            return session.read_all()


class PullSession:
    """One handle being read: chunk k is read when asked for; close() releases the encoder slot."""

    def __init__(self, puller: Puller, handle: Handle):
        self.puller, self.handle = puller, handle
        self.buffers = puller.buffers
        self.slot = _wait_allocate(self.buffers, 0, 0, True, puller.alloc_wait_s, "language")[0]
        self._held = None  # (token blocks, visual blocks) of the chunk last read
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def num_chunks(self) -> int:
        return -(-self.handle.length // self.puller.chunk_tokens)

    def read_chunk(self, k: int) -> EncodedPrompt:
        """Tokens [k*chunk, (k+1)*chunk) with their own embedding and DeepStack rows. The result may
        view local blocks: it is valid until the next read_chunk or close (memory stays one chunk)."""
        h, step = self.handle, self.puller.chunk_tokens
        start, end = k * step, min((k + 1) * step, h.length)
        v0, v1 = visual_rows_before(h.image_spans, start), visual_rows_before(h.image_spans, end)
        self.release_chunk()
        b = self.buffers
        _, tok, vis = _wait_allocate(b, end - start, v1 - v0, False, self.puller.alloc_wait_s, "language")
        self._held = (tok, vis)
        try:
            self._read(start, end, v0, v1, tok, vis)
        except Exception:
            self.release_chunk()
            raise
        fill, mrope, emb, ds = b.gather(tok, vis, end - start, v1 - v0)
        return EncodedPrompt(
            fill_ids=fill, mrope_positions=mrope, embeddings=emb, deepstack=ds, mrope_delta=h.mrope_delta,
            image_spans=clip_spans(h.image_spans, start, end),
        )

    def release_chunk(self) -> None:
        """Free the local blocks of the chunk last read (its views become invalid)."""
        if self._held is not None:
            self.buffers.free(None, *self._held)
            self._held = None

    def chunks(self) -> Iterator[EncodedPrompt]:
        """Chunk k is read only when the consumer asks for it (after prefilling chunk k-1)."""
        for k in range(self.num_chunks):
            yield self.read_chunk(k)

    def read_all(self) -> EncodedPrompt:
        """The whole prompt as tensors of its own (copied out of the local blocks)."""
        parts = [(c.fill_ids.clone(), c.mrope_positions.clone(), c.embeddings.clone(), c.deepstack.clone())
                 for c in self.chunks()]
        fill, mrope, emb, ds = (torch.cat(x) if len(parts) > 1 else x[0] for x in zip(*parts))
        return EncodedPrompt(
            fill_ids=fill, mrope_positions=mrope, embeddings=emb, deepstack=ds,
            mrope_delta=self.handle.mrope_delta, image_spans=[tuple(s) for s in self.handle.image_spans],
        )

    def _read(self, start, end, v0, v1, tok, vis) -> None:
        h, b, t0 = self.handle, self.buffers, time.perf_counter()
        local, remote, lengths = [], [], []

        def add(name, row_bytes, remote_blocks, remote_block, local_blocks, local_block, first, n):
            for r, l, count in _runs(remote_blocks, remote_block, first, local_blocks, local_block, n):
                local.append(getattr(b, name).data_ptr() + l * row_bytes)
                remote.append(h.addresses[name] + r * row_bytes)
                lengths.append(count * row_bytes)

        esize = b.embeddings.element_size()
        bt, bv = b.config.block_tokens, b.config.block_visual
        add("fill_ids", 4, h.token_blocks, h.block_tokens, tok, bt, start, end - start)
        add("mrope_positions", 12, h.token_blocks, h.block_tokens, tok, bt, start, end - start)
        add("embeddings", h.hidden_size * esize, h.visual_blocks, h.block_visual, vis, bv, v0, v1 - v0)
        if h.num_deepstack:
            ds_row = h.num_deepstack * h.hidden_size * esize
            add("deepstack", ds_row, h.visual_blocks, h.block_visual, vis, bv, v0, v1 - v0)
        aux_bytes = AUX_WIDTH * 8
        local.append(b.aux[self.slot].data_ptr())
        remote.append(h.addresses["aux"] + h.slot * aux_bytes)
        lengths.append(aux_bytes)
        what = f"tokens {start}..{end} of {h.name}"
        self.puller.transport.read(h.peer, local, remote, lengths, what)
        self._check_aux(what)
        # Re-read the header: a slot reclaimed while the rows were in flight must not pass.
        self.puller.transport.read(h.peer, local[-1:], remote[-1:], lengths[-1:], what)
        self._check_aux(what)
        st = self.puller.stats
        st.bytes_read += sum(lengths) + lengths[-1]  # the batch plus the header re-read
        st.reads += 1
        st.seconds += time.perf_counter() - t0
        st.entries = (st.entries + [len(lengths)])[-16:]

    def _check_aux(self, what: str) -> None:
        h, aux = self.handle, self.buffers.aux[self.slot].tolist()
        if aux[GENERATION] != h.generation:
            raise HandleExpiredError(
                f"{h.name} expired: the encoder reclaimed slot {h.slot} (now generation {aux[GENERATION]}); "
                f"it was already released or outlived handle_ttl_s ({what})")
        if aux[NONCE] != h.nonce:
            raise HandleError(f"{h.name}: nonce mismatch, the handle is forged or reused ({what})")
        expected = [MAGIC | PROTOCOL_VERSION, h.length, h.num_visual, h.num_deepstack, h.hidden_size,
                    DTYPE_CODES[h.dtype]]
        got = [aux[MAGIC_VERSION], aux[LENGTH], aux[VISUAL], aux[DEEPSTACK], aux[HIDDEN], aux[DTYPE]]
        if got != expected:
            raise HandleError(f"{h.name}: header {got} does not match the handle {expected} ({what})")

    def close(self, release: bool = True) -> None:
        """Release the encoder slot by writing its nonce into the encoder's release array; free ours."""
        if self.closed:
            return
        self.closed = True
        h, b = self.handle, self.buffers
        try:
            if release:
                b.aux[self.slot, NONCE] = h.nonce
                src = b.aux[self.slot].data_ptr() + NONCE * 8
                try:
                    release = h.addresses["release"] + h.slot * 8
                    self.puller.transport.write(h.peer, src, release, 8, f"release of {h.name}")
                except PeerError:
                    pass  # the encoder is gone; its TTL reclaim (or its exit) frees the slot
        finally:
            self.release_chunk()
            b.aux[self.slot] = 0
            b.slot_pool.free([self.slot])


def _runs(remote_blocks, remote_block, first, local_blocks, local_block, n):
    """(remote row, local row, count) runs contiguous on both sides: remote rows first.., local 0.."""
    out, r, l = [], first, 0
    while l < n:
        rp = remote_blocks[r // remote_block] * remote_block + r % remote_block
        lp = local_blocks[l // local_block] * local_block + l % local_block
        count = min(remote_block - r % remote_block, local_block - l % local_block, n - l)
        if out and out[-1][0] + out[-1][2] == rp and out[-1][1] + out[-1][2] == lp:
            out[-1][2] += count
        else:
            out.append([rp, lp, count])
        r, l = r + count, l + count
    return out
