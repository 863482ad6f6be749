"""Getting chunks to local disk: the cache first, then the store, each chunk fetched
once however many readers want it at the same time.

Two kinds of caller: on-demand reads (a process is waiting) and prefetch (nobody
is yet). They use separate capacity limiters, so prefetch can never queue ahead
of a read; a read that wants a chunk prefetch is already fetching joins that
fetch instead of repeating it, and if the prefetch fails the read fetches the
chunk itself. Prefetch may fetch a group of chunks with one ranged GET of a pack.

All blocking work (LMDB, file I/O, the store's network calls, zstd and BLAKE3)
runs in worker threads under capacity limiters; the trio loop only waits.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import trio

from casfs.cache import ChunkCache
from casfs.errors import CasfsError, ObjectNotFound
from casfs.metrics import MountMetrics
from casfs.store import Store
from casfs.store.content import verify_blob

log = logging.getLogger(__name__)


UNPACK_BYTES = 512 << 10


def _pieces(items: Sequence[tuple[str, int, int]], size: int) -> list[list[tuple[str, int, int]]]:
    """items (digest, offset, stored length) cut into runs of about `size` stored bytes."""
    out: list[list[tuple[str, int, int]]] = []
    run: list[tuple[str, int, int]] = []
    held = 0
    for item in items:
        run.append(item)
        held += item[2]
        if held >= size:
            out.append(run)
            run, held = [], 0
    if run:
        out.append(run)
    return out


class FetchFailed(CasfsError):
    """A chunk could not be fetched from the store."""


class _Flight:
    def __init__(self, prefetch: bool) -> None:
        self.done = trio.Event()
        self.prefetch = prefetch
        self.path: Path | bytes | None = None
        self.error: BaseException | None = None


class Fetcher:
    """Makes chunks available locally. `get(digest)` returns a cache path for a chunk
    already cached, else the verified bytes it just fetched (also cached, if there is
    room)."""

    def __init__(
        self, store: Store, cache: ChunkCache, metrics: MountMetrics, *,
        fetch_concurrency: int = 32, prefetch_concurrency: int = 48, disk_concurrency: int = 8,
    ) -> None:
        self.store = store
        self.cache = cache
        self.metrics = metrics
        self.net_limiter = trio.CapacityLimiter(fetch_concurrency)
        self.prefetch_limiter = trio.CapacityLimiter(prefetch_concurrency)
        self.disk_limiter = trio.CapacityLimiter(disk_concurrency)
        self._flights: dict[str, _Flight] = {}
        self.prefetched: set[str] = set()  # inserted by prefetch, not yet read
        self.missing_packs: set[str] = set()  # packs the store answered 404 for

    def cached_paths(self, digests: list[str]) -> list[Path] | None:
        """Paths of all the chunks when every one is in the cache, else None. Blocking."""
        paths = []
        for digest in digests:
            path = self.cache.lookup(digest)
            if path is None:
                return None
            paths.append(path)
        self.note_hits(digests)
        return paths

    def note_hits(self, digests: list[str]) -> None:
        """Count reads served from the cache (and which of them prefetch brought)."""
        self.metrics.cache_hits += len(digests)
        for digest in digests:
            if digest in self.prefetched:
                self.prefetched.discard(digest)
                self.metrics.prefetch_hits += 1

    def in_flight(self, digest: str) -> bool:
        return digest in self._flights

    async def prefetch(self, digest: str, *, warm: bool = False) -> None:
        """Bring a chunk to the node unless the cache already has it. A cached chunk is
        not verified here (reading a cached file to hash it is what a guess should not
        cost; the read that uses it verifies it), unless `warm`: a reader streaming
        through the file will want it next, so verify it now (read, hash, hold open)."""
        if warm:
            path = await trio.to_thread.run_sync(
                functools.partial(self.cache.lookup, digest, count=False),
                limiter=self.disk_limiter)
            if path is not None:
                self.metrics.warmed_chunks += 1
                return
        else:
            present = await trio.to_thread.run_sync(
                self.cache.contains_many, [digest], limiter=self.disk_limiter)
            if present[0]:
                return
        await self.get(digest, prefetch=True)

    async def get(self, digest: str, *, prefetch: bool = False, fresh: bool = False) -> Path | bytes:
        """The chunk: a cache path, or its bytes. `fresh` skips the cache lookup and
        always yields bytes (for a read whose cached file keeps vanishing)."""
        path = None if fresh else await trio.to_thread.run_sync(
            self.cache.lookup, digest, limiter=self.disk_limiter)
        if path is not None:
            if not prefetch:
                self.metrics.cache_hits += 1
                if digest in self.prefetched:
                    self.prefetched.discard(digest)
                    self.metrics.prefetch_hits += 1
            return path
        if not prefetch:
            self.metrics.cache_misses += 1
        joined = False
        while (flight := self._flights.get(digest)) is not None:
            if not prefetch and not joined:
                self.metrics.fetch_joined += 1
                if flight.prefetch:
                    self.metrics.prefetch_joined += 1
            joined = True
            await flight.done.wait()
            if flight.error is None:
                assert flight.path is not None
                return flight.path
            if not flight.prefetch or prefetch:
                raise FetchFailed(str(flight.error)) from flight.error
            # The prefetch this read joined failed: fetch the chunk for the read,
            # unless another waiting read already started that fetch (then join it).
        flight = self._flights[digest] = _Flight(prefetch)
        try:
            flight.path = await self._fetch(digest, prefetch)
        except BaseException as exc:
            flight.error = exc
            if isinstance(exc, CasfsError):
                raise FetchFailed(str(exc)) from exc
            raise
        finally:
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            flight.done.set()
        return flight.path

    async def _fetch(self, digest: str, prefetch: bool) -> Path | bytes:
        start = time.monotonic()
        limiter = self.prefetch_limiter if prefetch else self.net_limiter
        try:
            packed = await trio.to_thread.run_sync(
                self.store.get_blob_compressed, digest, limiter=limiter
            )
            data = await trio.to_thread.run_sync(verify_blob, digest, packed)
        except CasfsError as exc:
            self.metrics.fetch_errors += 1
            # A read's failure is logged once, as EIO, by the FUSE adapter.
            (log.warning if prefetch else log.error)(
                "fetching chunk %s from %s failed: %s", digest, self.store.url, exc)
            raise
        self.metrics.fetch_latency.observe(time.monotonic() - start)
        if prefetch:
            self.metrics.prefetch_requests += 1
            self.metrics.prefetch_bytes += len(packed)
        else:
            self.metrics.fetches += 1
            self.metrics.fetched_bytes += len(packed)
        path = await trio.to_thread.run_sync(self.cache.insert, digest, data, limiter=self.disk_limiter)
        if prefetch and path is not None:
            self.prefetched.add(digest)
            self.metrics.prefetch_chunks += 1
        # The bytes, not the new file: under a small cap another insert may evict the
        # file before the waiting reads get to it.
        return data

    async def get_pack_range(
        self, pack: str, offset: int, items: Sequence[tuple[str, int, int]]
    ) -> int:
        """Prefetch chunks stored back to back in a pack with one ranged GET.

        items are (digest, offset in the pack, stored length), in pack order.
        Chunks already cached or in flight are left out of the range where they
        sit at its ends. A pack the store does not have (deleted, or never written)
        is remembered, and its chunks fetched one by one instead. Returns how many
        chunks were inserted.
        """
        present = await trio.to_thread.run_sync(
            self.cache.contains_many, [d for d, _, _ in items], limiter=self.disk_limiter
        )
        wanted = [it for it, have in zip(items, present, strict=True)
                  if not have and it[0] not in self._flights]
        if not wanted:
            return 0
        if pack in self.missing_packs:
            return await self._get_singly([d for d, _, _ in wanted])
        start = wanted[0][1]
        end = wanted[-1][1] + wanted[-1][2]
        flights = {}
        for digest, _, _ in wanted:
            flights[digest] = self._flights[digest] = _Flight(prefetch=True)
        t0 = time.monotonic()
        inserted = 0
        try:
            data = await trio.to_thread.run_sync(
                self.store.get_pack_range, pack, start, end - start, limiter=self.prefetch_limiter
            )
            self.metrics.prefetch_requests += 1
            self.metrics.prefetch_bytes += len(data)
            self.metrics.fetch_latency.observe(time.monotonic() - t0)
            if len(data) != end - start:
                raise FetchFailed(f"pack {pack}: short read ({len(data)} of {end - start} bytes)")

            def unpack_and_store(
                batch: Sequence[tuple[str, int, int]],
            ) -> list[tuple[str, Path | bytes | None, BaseException | None]]:
                out: list[tuple[str, Path | bytes | None, BaseException | None]] = []
                for digest, off, length in batch:
                    try:
                        blob = verify_blob(digest, data[off - start : off - start + length])
                        self.cache.insert(digest, blob)
                        out.append((digest, blob, None))
                    except CasfsError as exc:
                        out.append((digest, None, exc))
                return out

            # In pieces of about UNPACK_BYTES, in pack (= first-access) order, each piece's
            # waiting reads released as soon as it is stored, not when the whole range is.
            for batch in _pieces(wanted, UNPACK_BYTES):
                results = await trio.to_thread.run_sync(unpack_and_store, batch,
                                                        limiter=self.disk_limiter)
                for digest, path, error in results:
                    flight = flights[digest]
                    flight.path, flight.error = path, error
                    flight.done.set()
                    if self._flights.get(digest) is flight:
                        del self._flights[digest]
                    if error is None:
                        inserted += 1
                        self.prefetched.add(digest)
                        self.metrics.prefetch_chunks += 1
                    else:
                        log.warning("pack %s: chunk %s rejected: %s", pack, digest, error)
        except BaseException as exc:
            for flight in flights.values():
                if flight.path is None and flight.error is None:
                    flight.error = exc
            if not isinstance(exc, CasfsError):
                raise
            self.metrics.fetch_errors += 1
            if isinstance(exc, ObjectNotFound):
                log.warning("pack %s is missing from %s; its chunks are fetched one by one",
                            pack, self.store.url)
                self.missing_packs.add(pack)
            else:
                log.warning("prefetch from pack %s failed: %s", pack, exc)
        finally:
            for digest, flight in flights.items():
                if flight.path is None and flight.error is None:
                    flight.error = FetchFailed("prefetch cancelled")
                if self._flights.get(digest) is flight:
                    del self._flights[digest]
                flight.done.set()
        if pack in self.missing_packs:
            inserted += await self._get_singly(
                [d for d, f in flights.items() if f.path is None])
        return inserted

    async def _get_singly(self, digests: list[str]) -> int:
        """Prefetch these chunks one GET each (prefetch's limiter bounds them)."""
        done = 0

        async def one(digest: str) -> None:
            nonlocal done
            try:
                await self.get(digest, prefetch=True)
                done += 1
            except CasfsError:
                pass  # logged by _fetch; a read that wants it fetches it again

        async with trio.open_nursery() as nursery:
            for digest in digests:
                nursery.start_soon(one, digest)
        return done
