"""The blob upload pipeline: chunks are hashed, checked against the store, compressed
and uploaded on worker threads, with bounded memory in flight.

The reading thread only decompresses and parses tar; everything per-chunk runs
here, so indexing uses both cores and many uploads overlap their latency.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from casfs.digest import hash_bytes
from casfs.store import Store
from casfs.store.content import compress

# Told (digest, stored form) of a chunk, on the upload thread (indexer.dirpack).
StoredHook = Callable[[str, bytes], None]


@dataclass
class UploadStats:
    chunks: int = 0
    bytes: int = 0  # uncompressed bytes hashed
    new_blobs: int = 0
    uploaded_bytes: int = 0  # compressed bytes written to the store
    new_bytes: int = 0  # uncompressed bytes of the new blobs


class BlobUploader:
    """Turns chunks into stored blobs; submit() returns a future of the digest."""

    def __init__(self, store: Store, workers: int = 16, max_pending_bytes: int = 128 << 20) -> None:
        self.store = store
        self.stats = UploadStats()
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="upload")
        self._room = threading.Semaphore(max(1, max_pending_bytes >> 16))
        self._lock = threading.Lock()
        self._seen: set[str] = set()

    def submit(self, data: bytes, on_stored: StoredHook | None = None) -> Future[str]:
        """Upload a chunk unless the store has it; `on_stored` also gets its stored form."""
        units = max(1, len(data) >> 16)
        for _ in range(units):
            self._room.acquire()
        fut = self._pool.submit(self._store_chunk, data, on_stored)
        fut.add_done_callback(lambda _f: self._release(units))
        return fut

    def _release(self, units: int) -> None:
        for _ in range(units):
            self._room.release()

    def _store_chunk(self, data: bytes, on_stored: StoredHook | None) -> str:
        digest = hash_bytes(data)
        packed = None
        if on_stored is not None:
            packed = compress(data)
            on_stored(digest, packed)
        with self._lock:
            self.stats.chunks += 1
            self.stats.bytes += len(data)
            if digest in self._seen:
                return digest
            self._seen.add(digest)
        _, uploaded = self.store.put_blob(data, digest, packed)
        if uploaded:
            with self._lock:
                self.stats.new_blobs += 1
                self.stats.uploaded_bytes += uploaded
                self.stats.new_bytes += len(data)
        return digest

    def close(self, cancel: bool = False) -> None:
        self._pool.shutdown(wait=True, cancel_futures=cancel)
