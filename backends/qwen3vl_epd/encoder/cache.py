"""EncoderCache: the vision tower's output per image content, least recently used out first, so
an image that comes back (every turn of a conversation resends it) is encoded once."""

from __future__ import annotations

import threading
from collections import OrderedDict

from qwen3vl_epd.prompt.encoded import CachedImage


class EncoderCache:
    """Bounded by bytes of stored rows. Keys are full SHA-256 digests of the image bytes and the
    settings that shape its patches (Processor.image_key): truncated keys are how others got false hits."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[bytes, CachedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: bytes) -> CachedImage | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: bytes, entry: CachedImage) -> None:
        """Store copies of the rows (a slice would keep its whole batch's output alive)."""
        if len(key) != 32 or entry.nbytes > self.max_bytes:
            return
        entry = CachedImage(entry.grid_thw.clone(), entry.size, entry.embeddings.clone(), entry.deepstack.clone(),
                            entry.timestamps)
        with self._lock:
            old = self._entries.pop(key, None)
            self.bytes -= old.nbytes if old else 0
            self._entries[key] = entry
            self.bytes += entry.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= evicted.nbytes

    def __len__(self) -> int:
        return len(self._entries)
