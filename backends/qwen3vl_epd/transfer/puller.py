"""Language side: validate a handle, then read its five buffers chunk by chunk and release the slot."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..block_allocator import blocks_for
from ..buffers import AUX_WIDTH, MultimodalDataBuffers
from ..encoder import EncodedPrompt, clip_spans, visual_rows_before
from ..errors import HandleError, HandleExpiredError, PeerError
from .handle import GENERATION, HEADER_FIELDS, NONCE, Handle, aux_row, dtype_name
from .transport import MooncakeTransport


def local_hosts() -> set[str]:
    """Names and addresses of this host: the default encoder allow-list."""
    names = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        names.update(a[4][0] for a in socket.getaddrinfo(socket.gethostname(), None))
    except OSError:
        pass
    return names


@dataclass
class PullStats:
    bytes_read: int = 0
    reads: int = 0
    seconds: float = 0.0
    entries: list[int] = field(default_factory=list)  # batch entries per read, last few


class Puller:
    """Opens handles against this model and the allow-list; each open handle is a PullSession."""

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
        self.slot = self.buffers.allocate_waiting(0, 0, True, puller.alloc_wait_s, "language")[0]
        self._held = None  # (token blocks, visual blocks) of the chunk last read
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def num_chunks(self) -> int:
        return blocks_for(self.handle.length, self.puller.chunk_tokens)

    def read_chunk(self, k: int) -> EncodedPrompt:
        """Tokens [k*chunk, (k+1)*chunk) with their own embedding and DeepStack rows. The result may
        view local blocks: it is valid until the next read_chunk or close (memory stays one chunk)."""
        h, step = self.handle, self.puller.chunk_tokens
        start, end = k * step, min((k + 1) * step, h.length)
        v0, v1 = visual_rows_before(h.image_spans, start), visual_rows_before(h.image_spans, end)
        self.release_chunk()
        b = self.buffers
        _, tok, vis = b.allocate_waiting(end - start, v1 - v0, False, self.puller.alloc_wait_s, "language")
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
        expected = aux_row(h)
        got, want = [aux[i] for i in HEADER_FIELDS], [expected[i] for i in HEADER_FIELDS]
        if got != want:
            raise HandleError(f"{h.name}: header {got} does not match the handle {want} ({what})")

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
