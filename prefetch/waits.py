"""Counting the reads that waited on the network: how many, and for how long.

A read waits on the store when one of its chunks is neither on the node nor already
fetched: it then waits for a fetch of its own or for one in flight (prefetch's or
another read's). That is the critical path of a boot; the stats report it as
`metrics.read_waits` and `metrics.read_wait_seconds` (the whole time those reads took,
from the daemon's receiving them to their answer).

The filesystem model tells its read observers which chunks a read needs, then enters
its read trackers around the fetch, with no checkpoint between the two (both on the
trio thread); so the observer notes the chunks and the tracker decides, when the read
starts, whether it must wait: a chunk in flight, or one the node cache does not hold
(an index lookup, once per chunk: a chunk found on the node is remembered).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from casfs.fetch import Fetcher
from casfs.manifest.reader import ChunkRef

log = logging.getLogger(__name__)
MAX_KNOWN = 1 << 20  # chunks remembered as on the node (bounded memory)


class ReadWaits:
    """An ImageFS read observer (`observe`) and read tracker (`reading`)."""

    def __init__(self, fetcher: Fetcher) -> None:
        self.fetcher = fetcher
        self.metrics = fetcher.metrics
        self._local: set[str] = set()  # chunks seen on the node
        self._pending: list[ChunkRef] | None = None
        self._ino = 0
        self._started = time.monotonic()

    def observe(self, ino: int, chunks: list[ChunkRef]) -> None:
        self._pending = chunks
        self._ino = ino

    def _must_wait(self, chunks: list[ChunkRef]) -> bool:
        unknown: list[str] = []
        for c in chunks:
            if c.digest in self._local:
                continue
            if self.fetcher.in_flight(c.digest):
                return True
            unknown.append(c.digest)
        if not unknown:
            return False
        try:
            present = self.fetcher.cache.contains_many(unknown)
        except Exception:  # noqa: BLE001 - counting must never fail a read
            return False
        if len(self._local) + len(unknown) > MAX_KNOWN:
            self._local.clear()
        waits = False
        for digest, have in zip(unknown, present, strict=True):
            if have:
                self._local.add(digest)
            else:
                waits = True
        return waits

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        chunks, self._pending = self._pending, None
        ino = self._ino
        waits = chunks is not None and self._must_wait(chunks)
        start = time.monotonic()
        try:
            yield
        finally:
            if waits:
                took = time.monotonic() - start
                self.metrics.read_waits += 1
                self.metrics.read_wait_seconds += took
                if log.isEnabledFor(logging.DEBUG):
                    assert chunks is not None
                    log.debug("read of inode %d (chunk at %d, %d chunks) waited %.1f ms, "
                              "%.3f s after the mount", ino, chunks[0].offset, len(chunks),
                              took * 1000, start - self._started)
