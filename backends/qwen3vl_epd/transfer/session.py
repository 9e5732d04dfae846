"""PullSession: one verified handle being read, chunk by chunk, on the Puller's transfer workers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait

import torch

from qwen3vl_epd.errors import HandleError, HandleExpiredError, PeerError
from qwen3vl_epd.prompt.encoded import EncodedPrompt, chunk_rows, clip_spans
from qwen3vl_epd.transfer.blocks import blocks_for, contiguous_runs
from qwen3vl_epd.transfer.buffers import AUX_WIDTH
from qwen3vl_epd.transfer.handle import NONCE, Handle, check_header
from qwen3vl_epd.transfer.link import PullLink
from qwen3vl_epd.transfer.transport import MooncakeTransport


class PullSession:
    """One handle being read. The engine calls fetch(k) every step until chunk k has arrived; the
    reads run on the link's workers. close() releases the encoder slot."""

    def __init__(self, link: PullLink, handle: Handle):
        self.link, self.handle = link, handle
        self.buffers = link.buffers
        self.slot = self.buffers.allocate_waiting(0, 0, True, link.alloc_wait_s, "language")[0]
        self.contacted = handle.peer in link.peers.good  # else a first-contact read goes first
        self._job: Future | None = None  # the transfer in flight
        self._job_what, self._job_deadline = "", 0.0
        self._contact_transport: MooncakeTransport | None = None
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
        return blocks_for(self.handle.length, self.link.chunk_tokens)

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
            if job.result() == "first contact":
                self.contacted = True
            else:
                return self._gather(start, end)
        if not self.contacted:
            self._contact_transport = self.link.peers.spare()
            self._start("first contact", self._first_contact)
            return None
        h = self.handle
        end, v0, v1 = chunk_rows(h.visual_spans, h.length, start, end)
        self.release_chunk()
        b = self.buffers
        if wait_for_blocks:
            got = b.allocate_waiting(end - start, v1 - v0, False, self.link.alloc_wait_s, "language")
        else:
            got = b.allocate(end - start, v1 - v0, False)  # none free: the engine asks again next step
        if got is None:
            return None
        self._held = got[1:]
        self._start(f"tokens {start}..{end}", self._read, start, end, v0, v1, *self._held)
        return None

    def read_chunk(self, k: int) -> EncodedPrompt:
        """Chunk k of chunk_tokens, waited for (tests, benchmarks, Puller.pull)."""
        step = self.link.chunk_tokens
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
            mrope_delta=self.handle.mrope_delta, visual_spans=[tuple(s) for s in self.handle.visual_spans],
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
                if self.contacted:  # a chunk read: it writes into our blocks and slot until it returns
                    self._job.add_done_callback(lambda _: self._free())
                else:  # a first-contact read holds no block and no slot of ours
                    self._free()
                return None
        self._job = None
        if not self._owned:
            self._free()
            return None
        self.release_chunk()
        self.buffers.aux[self.slot, NONCE] = self.handle.nonce
        return self.link.submit(self._release)

    def _release(self) -> None:
        h = self.handle
        try:
            src = self.buffers.aux[self.slot].data_ptr() + NONCE * 8
            self.link.transport.write(h.peer, src, h.addresses["release"] + h.slot * 8, 8, f"release of {h.name}")
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
        self._job_deadline = time.monotonic() + self.link.timeout_s
        self._job = self.link.submit(fn, *args)

    def _overdue(self) -> None:
        peer, what = self.handle.peer, self._job_what
        if not self.contacted:  # stuck in Mooncake's handshake: refuse new work for this peer until it returns
            self.link.peers.stall(peer, what, self._contact_transport, self._job)
        raise PeerError(f"encoder peer {peer} did not answer within {self.link.timeout_s:g} s ({what})")

    def _first_contact(self) -> str:
        """First contact with a peer: its header for this handle, read on the spare engine into a row
        of its own. Mooncake's handshake waits 60 s for a peer that accepts and never answers (no
        setting shortens it); there, nothing but other first contacts waits with it."""
        h, link = self.handle, self.link
        transport, row = self._contact_transport, torch.zeros(AUX_WIDTH, dtype=torch.int64)
        transport.register({"first contact": row})
        try:
            aux_bytes = AUX_WIDTH * 8
            self._transfer([row.data_ptr()], [h.addresses["aux"] + h.slot * aux_bytes], [aux_bytes], transport)
            self._check_aux(row.tolist())
        finally:
            transport.unregister({"first contact": row})
        link.peers.good.add(h.peer)
        with link.stats.lock:
            link.stats.first_contacts += 1
        return "first contact"

    def _read(self, start, end, v0, v1, tok, vis) -> str:
        h, b = self.handle, self.buffers
        local, remote, lengths = [], [], []

        def add(name, row_bytes, remote_blocks, remote_block, local_blocks, local_block, first, n):
            for r, l, count in contiguous_runs(remote_blocks, remote_block, first, local_blocks, local_block, n):
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
            (transport or self.link.transport).read(self.handle.peer, local, remote, lengths, self._job_what)
        except PeerError:
            self.link.peers.good.discard(self.handle.peer)
            self._owned = False  # no release write to a peer that just failed: its TTL reclaims the slot
            raise
        self.link.stats.add(sum(lengths), len(lengths), time.perf_counter() - t0)

    def _gather(self, start: int, end: int) -> EncodedPrompt:
        h = self.handle
        end, v0, v1 = chunk_rows(h.visual_spans, h.length, start, end)
        fill, mrope, emb, ds = self.buffers.gather(*self._held, end - start, v1 - v0)
        return EncodedPrompt(
            fill_ids=fill, mrope_positions=mrope, embeddings=emb, deepstack=ds, mrope_delta=h.mrope_delta,
            visual_spans=clip_spans(h.visual_spans, start, end),
        )

    def _check_aux(self, aux: list[int]) -> None:
        try:
            check_header(self.handle, aux, self._job_what)
        except (HandleError, HandleExpiredError):
            self._owned = False  # the slot is not ours to release
            raise
