"""PullSession: one verified handle being read, chunk by chunk, on the Puller's transfer workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

import torch

from ..block_allocator import blocks_for
from ..buffers import AUX_WIDTH
from ..encoder import EncodedPrompt, clip_spans, visual_rows_before
from ..errors import HandleError, HandleExpiredError, PeerError
from .handle import GENERATION, HEADER_FIELDS, NONCE, Handle, aux_row
from .transport import MooncakeTransport

if TYPE_CHECKING:
    from .puller import Puller


class PullSession:
    """One handle being read. The engine calls fetch(k) every step until chunk k has arrived; the
    reads run on the Puller's workers. close() releases the encoder slot."""

    def __init__(self, puller: Puller, handle: Handle):
        self.puller, self.handle = puller, handle
        self.buffers = puller.buffers
        self.slot = self.buffers.allocate_waiting(0, 0, True, puller.alloc_wait_s, "language")[0]
        self.probed = handle.peer in puller.good_peers
        self._job: Future | None = None  # the transfer in flight
        self._job_what, self._job_deadline = "", 0.0
        self._probe_transport: MooncakeTransport | None = None
        self._held = None  # (token blocks, visual blocks) of the chunk in flight or last read
        self._owned = True  # False once the header disagreed: the slot is not ours to release
        self._lock = threading.Lock()
        self.closed = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        release = self.close()
        if release is not None:
            release.result()

    @property
    def num_chunks(self) -> int:
        return blocks_for(self.handle.length, self.puller.chunk_tokens)

    @property
    def length(self) -> int:
        return self.handle.length

    @property
    def mrope_delta(self) -> int:
        return self.handle.mrope_delta

    @property
    def name(self) -> str:
        return self.handle.name

    @property
    def block_hashes(self) -> list[bytes]:
        return self.handle.block_hashes

    def fetch(self, start: int, end: int, wait_for_blocks: bool = False) -> EncodedPrompt | None:
        """Tokens [start, end) with their own visual and DeepStack rows once they have arrived,
        else None and their transfer is under way (a cached prefix is never read). Raises what the
        transfer raised, and PeerError once it is over timeout_s. The result views local blocks:
        valid until the next chunk is fetched or the session closes."""
        if self._job is not None:
            if not self._job.done():
                if time.monotonic() > self._job_deadline:
                    self._overdue()
                return None
            job, self._job = self._job, None
            if job.result() == "probe":
                self.probed = True
            else:
                return self._gather(start, end)
        if not self.probed:
            self._probe_transport = self.puller.spare()
            self._start("probe", self._probe)
            return None
        h = self.handle
        end = min(end, h.length)
        v0, v1 = visual_rows_before(h.image_spans, start), visual_rows_before(h.image_spans, end)
        self.release_chunk()
        b = self.buffers
        if wait_for_blocks:
            got = b.allocate_waiting(end - start, v1 - v0, False, self.puller.alloc_wait_s, "language")
        else:
            got = b.allocate(end - start, v1 - v0, False)  # none free: the engine asks again next step
        if got is None:
            return None
        self._held = got[1:]
        self._start(f"tokens {start}..{end}", self._read, start, end, v0, v1, *self._held)
        return None

    def read_chunk(self, k: int) -> EncodedPrompt:
        """Chunk k of chunk_tokens, waited for (tests, benchmarks, Puller.pull)."""
        step = self.puller.chunk_tokens
        while (chunk := self.fetch(k * step, (k + 1) * step, wait_for_blocks=True)) is None:
            wait([self._job], timeout=max(0.0, self._job_deadline - time.monotonic()) + 0.01)
        return chunk

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

    def release_chunk(self) -> None:
        """Free the local blocks of the chunk last read (its views become invalid)."""
        if self._held is not None:
            self.buffers.free(None, *self._held)
            self._held = None

    def close(self) -> Future | None:
        """Release the encoder slot (a one-sided write of its nonce, on a worker) and free ours; the
        release's future, or None. A transfer still in flight frees what it holds when it returns."""
        with self._lock:
            if self.closed:
                return None
            self.closed = True
            if self._job is not None and not self._job.done():
                if self.probed:  # a chunk read: it writes into our blocks and slot until it returns
                    self._job.add_done_callback(lambda _: self._free())
                else:  # a header probe holds no block and no slot of ours
                    self._free()
                return None
        self._job = None
        if not self._owned:
            self._free()
            return None
        self.release_chunk()
        self.buffers.aux[self.slot, NONCE] = self.handle.nonce
        return self.puller.submit(self._release)

    def _release(self) -> None:
        h = self.handle
        try:
            src = self.buffers.aux[self.slot].data_ptr() + NONCE * 8
            self.puller.transport.write(h.peer, src, h.addresses["release"] + h.slot * 8, 8, f"release of {h.name}")
        except PeerError:
            pass  # the encoder is gone; its TTL reclaim (or its exit) frees the slot
        finally:
            self._free()

    def _free(self) -> None:
        self.release_chunk()
        self.buffers.aux[self.slot] = 0
        self.buffers.slot_pool.free([self.slot])

    def _start(self, what: str, fn, *args) -> None:
        self._job_what = f"{what} of {self.handle.name}"
        self._job_deadline = time.monotonic() + self.puller.timeout_s
        self._job = self.puller.submit(fn, *args)

    def _overdue(self) -> None:
        peer, what = self.handle.peer, self._job_what
        if not self.probed:  # stuck in Mooncake's handshake: refuse new work for this peer until it returns
            self.puller.retire(self._probe_transport)
            self.puller.stalled_peers[peer] = what
            self._job.add_done_callback(lambda _: self.puller.stalled_peers.pop(peer, None))
        raise PeerError(f"encoder peer {peer} did not answer within {self.puller.timeout_s:g} s ({what})")

    def _probe(self) -> str:
        """First contact with a peer: its header for this handle, read on the spare engine into a row
        of its own. Mooncake's handshake waits 60 s for a peer that accepts and never answers (no
        setting shortens it); there, nothing but other first contacts waits with it."""
        h, p = self.handle, self.puller
        transport, row = self._probe_transport, torch.zeros(AUX_WIDTH, dtype=torch.int64)
        transport.register({"probe": row})
        try:
            aux_bytes = AUX_WIDTH * 8
            self._transfer([row.data_ptr()], [h.addresses["aux"] + h.slot * aux_bytes], [aux_bytes], transport)
            self._check_aux(row.tolist())
        finally:
            transport.unregister({"probe": row})
        p.good_peers.add(h.peer)
        with p.stats.lock:
            p.stats.probes += 1
        return "probe"

    def _read(self, start, end, v0, v1, tok, vis) -> str:
        h, b = self.handle, self.buffers
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
        self._transfer(local, remote, lengths)
        self._check_aux(b.aux[self.slot].tolist())
        # Re-read the header: a slot reclaimed while the rows were in flight must not pass.
        self._transfer(local[-1:], remote[-1:], lengths[-1:])
        self._check_aux(b.aux[self.slot].tolist())
        return "chunk"

    def _transfer(self, local, remote, lengths, transport: MooncakeTransport | None = None) -> None:
        t0 = time.perf_counter()
        try:
            (transport or self.puller.transport).read(self.handle.peer, local, remote, lengths, self._job_what)
        except PeerError:
            self.puller.good_peers.discard(self.handle.peer)
            self._owned = False  # no release write to a peer that just failed: its TTL reclaims the slot
            raise
        self.puller.stats.add(sum(lengths), len(lengths), time.perf_counter() - t0)

    def _gather(self, start: int, end: int) -> EncodedPrompt:
        h = self.handle
        end = min(end, h.length)
        v0, v1 = visual_rows_before(h.image_spans, start), visual_rows_before(h.image_spans, end)
        fill, mrope, emb, ds = self.buffers.gather(*self._held, end - start, v1 - v0)
        return EncodedPrompt(
            fill_ids=fill, mrope_positions=mrope, embeddings=emb, deepstack=ds, mrope_delta=h.mrope_delta,
            image_spans=clip_spans(h.image_spans, start, end),
        )

    def _check_aux(self, aux: list[int]) -> None:
        h, what = self.handle, self._job_what
        if aux[GENERATION] != h.generation:
            self._owned = False
            raise HandleExpiredError(
                f"{h.name} expired: the encoder reclaimed slot {h.slot} (now generation {aux[GENERATION]}); "
                f"it was already released or outlived handle_ttl_s ({what})")
        if aux[NONCE] != h.nonce:
            self._owned = False
            raise HandleError(f"{h.name}: nonce mismatch, the handle is forged or reused ({what})")
        expected = aux_row(h)
        got, want = [aux[i] for i in HEADER_FIELDS], [expected[i] for i in HEADER_FIELDS]
        if got != want:
            self._owned = False
            raise HandleError(f"{h.name}: header {got} does not match the handle {want} ({what})")


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
