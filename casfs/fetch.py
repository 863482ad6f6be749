"""Getting chunk bytes, the one owner of it: the node cache first (on the loop when that
cannot block, else in a thread), then the store, each chunk fetched once however many
readers want it at the same time. The filesystem model and prefetch both go through
here, never around it to the cache.

Two kinds of caller: on-demand reads (a process is waiting) and prefetch (nobody
is yet). They use separate capacity limiters, so prefetch can never queue ahead
of a read; a read that wants a chunk prefetch is already fetching joins that
fetch instead of repeating it, and if the prefetch fails the read fetches the
chunk itself. Prefetch may fetch a group of chunks with one ranged GET of a pack.

All blocking work (LMDB, file I/O, the store's network calls, zstd and BLAKE3)
runs in worker threads under capacity limiters; the trio loop only waits.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Sequence

import trio

from casfs.cache import ChunkCache
from casfs.errors import CasfsError, FetchFailed, ObjectNotFound
from casfs.metrics import MountMetrics
from casfs.ranges import ChunkRange, PackedChunk, PackRange
from casfs.store import Store
from casfs.store.content import verify_blob

log = logging.getLogger(__name__)


UNPACK_BYTES = 512 << 10
RECENT_CHUNKS = 16  # fetched chunks kept in memory for reads that just missed them
RECENT_BYTES = 16 << 20  # ... and at most this many bytes of them


def _pieces(items: Sequence[PackedChunk], size: int) -> list[list[PackedChunk]]:
    """Chunks of a pack range cut into runs of about `size` stored bytes."""
    out: list[list[PackedChunk]] = []
    run: list[PackedChunk] = []
    held = 0
    for item in items:
        run.append(item)
        held += item.length
        if held >= size:
            out.append(run)
            run, held = [], 0
    if run:
        out.append(run)
    return out


class _Flight:
    def __init__(self, prefetch: bool) -> None:
        self.done = trio.Event()
        self.prefetch = prefetch
        self.data: bytes | None = None
        self.error: BaseException | None = None


class Fetcher:
    """The one owner of getting chunk bytes: `read(ranges)` serves a read from the cache
    (on the loop when it cannot block, else in one thread hop) and fetches what the
    cache lacks from the store, each chunk once however many readers want it; prefetch
    brings chunks to the node ahead of reads, below them in priority."""

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
        # The last chunks fetched, by digest: a read that missed in the cache just before
        # a fetch of its chunk ended (and its flight was gone) takes the bytes from here
        # instead of fetching the chunk a second time.
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._recent_bytes = 0
        self.prefetched: set[str] = set()  # inserted by prefetch, not yet read
        self.missing_packs: set[str] = set()  # packs the store answered 404 for

    # -- reads -------------------------------------------------------------------------

    async def read(self, ranges: Sequence[ChunkRange], *,
                   prefetch: bool = False) -> bytes | bytearray:
        """The bytes of these chunk ranges, concatenated: from the page cache without
        blocking when this process holds every chunk open and its bytes are resident;
        else the cached chunks in one thread hop and the others fetched (verified,
        cached). `prefetch`: nobody waits on it (prefetch's own limiter, no hit count)."""
        hot = self.cache.read_nowait(ranges)
        if hot is not None:
            self._count_hits([r.digest for r in ranges], prefetch)
            return hot
        parts = await trio.to_thread.run_sync(self.cache.read_parts, ranges,
                                              limiter=self.disk_limiter)
        self._count_hits([r.digest for r, p in zip(ranges, parts, strict=True) if p is not None],
                         prefetch)
        missing = [i for i, p in enumerate(parts) if p is None]
        if missing:
            if not prefetch:
                self.metrics.cache_misses += len(missing)

            async def one(i: int) -> None:
                r = ranges[i]
                chunk = await self._chunk(r.digest, prefetch)
                parts[i] = chunk[r.start : r.start + r.length]

            async with trio.open_nursery() as nursery:
                for i in missing:
                    nursery.start_soon(one, i)
        return b"".join(p for p in parts if p is not None)

    def _count_hits(self, digests: list[str], prefetch: bool) -> None:
        """Reads served from the cache (and which of them prefetch brought)."""
        if prefetch:
            return
        self.metrics.cache_hits += len(digests)
        for digest in digests:
            if digest in self.prefetched:
                self.prefetched.discard(digest)
                self.metrics.prefetch_hits += 1

    def cache_stats(self) -> dict[str, int]:
        """The node cache's counters as this process sees them, with its size and cap."""
        out = dict(self.cache.stats.__dict__)
        out["bytes"] = self.cache.total_bytes()
        out["max_bytes"] = self.cache.max_bytes
        return out

    def in_flight(self, digest: str) -> bool:
        return digest in self._flights

    # -- prefetch ----------------------------------------------------------------------

    async def prefetch(self, digest: str, *, warm: bool = False) -> None:
        """Bring a chunk to the node unless the cache already has it. A cached chunk is
        not verified here (reading a cached file to hash it is what a guess should not
        cost; the read that uses it verifies it), unless `warm`: a reader streaming
        through the file will want it next, so verify it now (read, hash, hold open)."""
        if warm:
            if await self.warm([digest]):
                return
        elif (await self.present([digest]))[0]:
            return
        await self._chunk(digest, prefetch=True)

    async def present(self, digests: Sequence[str]) -> list[bool]:
        """Whether the cache holds each chunk (its index says so; not verified): a hint."""
        return await trio.to_thread.run_sync(self.cache.contains_many, list(digests),
                                             limiter=self.disk_limiter)

    async def warm(self, digests: Sequence[str]) -> int:
        """Verify cached chunks ahead of the reads that will want them (read, hash, hold
        open: those reads are then served on the loop from the page cache). Returns how
        many were cached and verified; the others are left for a fetch."""

        def verify() -> int:
            return sum(1 for d in digests if self.cache.lookup(d, count=False) is not None)

        n = await trio.to_thread.run_sync(verify, limiter=self.disk_limiter)
        self.metrics.warmed_chunks += n
        return n

    async def room_left(self, share: float) -> bool:
        """Whether the cache holds less than `share` of its cap (prefetch stops short of
        evicting what the boot uses)."""
        total = await trio.to_thread.run_sync(self.cache.total_bytes, limiter=self.disk_limiter)
        return total < self.cache.max_bytes * share

    def cached_bytes(self, digest: str) -> bytes | None:
        """A chunk's bytes if the cache holds it (verified), else None. Blocking."""
        path = self.cache.lookup(digest, count=False)
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError:
            self.cache.invalidate(digest)
            return None

    # -- fetching ------------------------------------------------------------------------

    def _keep(self, digest: str, data: bytes) -> None:
        if not self.cache.contains_many([digest])[0]:
            self.cache.insert(digest, data)

    def _remember(self, digest: str, data: bytes) -> None:
        old = self._recent.pop(digest, None)
        self._recent_bytes += len(data) - (len(old) if old is not None else 0)
        self._recent[digest] = data
        while self._recent and (len(self._recent) > RECENT_CHUNKS
                                or self._recent_bytes > RECENT_BYTES):
            _, dropped = self._recent.popitem(last=False)
            self._recent_bytes -= len(dropped)

    async def _chunk(self, digest: str, prefetch: bool) -> bytes:
        """A chunk's verified bytes: joined to a fetch already under way, else fetched.
        A read that joined a prefetch which then failed fetches the chunk itself."""
        recent = self._recent.get(digest)
        if recent is not None:
            # Fetched a moment ago (between this read's miss and now), or its cache file
            # vanished since: the verified bytes, put back in the cache if it lacks them.
            await trio.to_thread.run_sync(self._keep, digest, recent, limiter=self.disk_limiter)
            return recent
        joined = False
        while (flight := self._flights.get(digest)) is not None:
            if not prefetch and not joined:
                self.metrics.fetch_joined += 1
                if flight.prefetch:
                    self.metrics.prefetch_joined += 1
            joined = True
            await flight.done.wait()
            if flight.error is None:
                assert flight.data is not None
                return flight.data
            if not flight.prefetch or prefetch:
                raise FetchFailed(str(flight.error)) from flight.error
            # The prefetch this read joined failed: fetch the chunk for the read,
            # unless another waiting read already started that fetch (then join it).
        flight = self._flights[digest] = _Flight(prefetch)
        try:
            flight.data = await self._fetch(digest, prefetch)
            self._remember(digest, flight.data)
        except BaseException as exc:
            flight.error = exc
            if isinstance(exc, CasfsError) and not isinstance(exc, FetchFailed):
                raise FetchFailed(str(exc)) from exc
            raise
        finally:
            if self._flights.get(digest) is flight:
                del self._flights[digest]
            flight.done.set()
        return flight.data

    def _fetch_blocking(self, digest: str) -> tuple[bytes, int, bool]:
        """GET a chunk, decompress and verify it, and insert it into the cache, on one
        worker thread: (verified bytes, stored bytes fetched, whether it was cached).
        One thread hop per chunk rather than three, and the compressed copy is dropped
        as soon as it is decompressed, so a wide readahead window holds little more
        than the bytes still on the wire."""
        packed = self.store.get_blob_compressed(digest)
        stored = len(packed)
        data = verify_blob(digest, packed)
        del packed
        return data, stored, self.cache.insert(digest, data) is not None

    async def _fetch(self, digest: str, prefetch: bool) -> bytes:
        start = time.monotonic()
        limiter = self.prefetch_limiter if prefetch else self.net_limiter
        try:
            data, stored, cached = await trio.to_thread.run_sync(
                self._fetch_blocking, digest, limiter=limiter)
        except CasfsError as exc:
            self.metrics.fetch_errors += 1
            # A read's failure is logged once, as EIO, by the FUSE adapter.
            (log.warning if prefetch else log.error)(
                "fetching chunk %s from %s failed: %s", digest, self.store.url, exc)
            raise
        self.metrics.fetch_latency.observe(time.monotonic() - start)
        if prefetch:
            self.metrics.prefetch_requests += 1
            self.metrics.prefetch_bytes += stored
            if cached:
                self.prefetched.add(digest)
                self.metrics.prefetch_chunks += 1
        else:
            self.metrics.fetches += 1
            self.metrics.fetched_bytes += stored
        # The bytes, not the new file: under a small cap another insert may evict the
        # file before the waiting reads get to it.
        return data

    async def get_pack_range(self, run: PackRange) -> int:
        """Prefetch chunks stored back to back in a pack with one ranged GET.

        Chunks already cached or in flight are left out of the range where they
        sit at its ends. A pack the store does not have (deleted, or never written)
        is remembered, and its chunks fetched one by one instead. Returns how many
        chunks were inserted.
        """
        pack = run.pack
        present = await self.present([it.digest for it in run.items])
        wanted = [it for it, have in zip(run.items, present, strict=True)
                  if not have and it.digest not in self._flights]
        if not wanted:
            return 0
        if pack in self.missing_packs:
            return await self._get_singly([it.digest for it in wanted])
        start = wanted[0].offset
        end = wanted[-1].offset + wanted[-1].length
        flights = {}
        for it in wanted:
            flights[it.digest] = self._flights[it.digest] = _Flight(prefetch=True)
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
                batch: Sequence[PackedChunk],
            ) -> list[tuple[str, bytes | None, BaseException | None]]:
                out: list[tuple[str, bytes | None, BaseException | None]] = []
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
                for digest, blob, error in results:
                    flight = flights[digest]
                    flight.data, flight.error = blob, error
                    flight.done.set()
                    if self._flights.get(digest) is flight:
                        del self._flights[digest]
                    if error is None:
                        assert blob is not None
                        self._remember(digest, blob)
                        inserted += 1
                        self.prefetched.add(digest)
                        self.metrics.prefetch_chunks += 1
                    else:
                        log.warning("pack %s: chunk %s rejected: %s", pack, digest, error)
        except BaseException as exc:
            for flight in flights.values():
                if flight.data is None and flight.error is None:
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
                if flight.data is None and flight.error is None:
                    flight.error = FetchFailed("prefetch cancelled")
                if self._flights.get(digest) is flight:
                    del self._flights[digest]
                flight.done.set()
        if pack in self.missing_packs:
            inserted += await self._get_singly(
                [d for d, f in flights.items() if f.data is None])
        return inserted

    async def _get_singly(self, digests: list[str]) -> int:
        """Prefetch these chunks one GET each (prefetch's limiter bounds them)."""
        done = 0

        async def one(digest: str) -> None:
            nonlocal done
            try:
                await self._chunk(digest, prefetch=True)
                done += 1
            except CasfsError:
                pass  # logged by _fetch; a read that wants it fetches it again

        async with trio.open_nursery() as nursery:
            for digest in digests:
                nursery.start_soon(one, digest)
        return done
