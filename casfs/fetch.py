"""Getting chunks to local disk: the cache first, then the store, each chunk fetched
once however many readers want it at the same time.

All blocking work (LMDB, file I/O, the store's network calls, zstd and BLAKE3)
runs in worker threads under capacity limiters; the trio loop only waits.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import trio

from casfs.cache import ChunkCache
from casfs.errors import CasfsError
from casfs.metrics import MountMetrics
from casfs.store import Store
from casfs.store.content import verify_blob

log = logging.getLogger(__name__)


class FetchFailed(CasfsError):
    """A chunk could not be fetched from the store."""


class _Flight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.path: Path | bytes | None = None
        self.error: BaseException | None = None


class Fetcher:
    """Makes chunks available locally. `get(digest)` returns a cache path, or the
    bytes themselves when the cache could not keep them (disk full)."""

    def __init__(
        self, store: Store, cache: ChunkCache, metrics: MountMetrics, *,
        fetch_concurrency: int = 32, disk_concurrency: int = 8,
    ) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.net_limiter = trio.CapacityLimiter(fetch_concurrency)
        self.disk_limiter = trio.CapacityLimiter(disk_concurrency)
        self._flights: dict[str, _Flight] = {}

    async def get(self, digest: str) -> Path | bytes:
        path = await trio.to_thread.run_sync(self.cache.lookup, digest, limiter=self.disk_limiter)
        if path is not None:
            self.metrics.cache_hits += 1
            return path
        self.metrics.cache_misses += 1
        flight = self._flights.get(digest)
        if flight is not None:
            self.metrics.fetch_joined += 1
            await flight.done.wait()
        else:
            flight = self._flights[digest] = _Flight()
            try:
                flight.path = await self._fetch(digest)
            except BaseException as exc:
                flight.error = exc
            finally:
                del self._flights[digest]
                flight.done.set()
        if flight.error is not None:
            if isinstance(flight.error, CasfsError):
                raise FetchFailed(str(flight.error)) from flight.error
            raise flight.error
        assert flight.path is not None
        return flight.path

    async def _fetch(self, digest: str) -> Path | bytes:
        start = time.monotonic()
        try:
            packed = await trio.to_thread.run_sync(
                self.store.get_blob_compressed, digest, limiter=self.net_limiter
            )
            data = await trio.to_thread.run_sync(verify_blob, digest, packed)
        except CasfsError as exc:
            self.metrics.fetch_errors += 1
            log.error("fetching chunk %s from %s failed: %s", digest, self.store.url, exc)
            raise
        self.metrics.fetches += 1
        self.metrics.fetched_bytes += len(packed)
        self.metrics.fetch_latency.observe(time.monotonic() - start)
        path = await trio.to_thread.run_sync(self.cache.insert, digest, data, limiter=self.disk_limiter)
        return path if path is not None else data
