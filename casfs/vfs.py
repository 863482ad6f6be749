"""What an image looks like as a read-only filesystem: lookups, attributes, directory
listings, links, xattrs and file content, answered from a manifest and the fetcher.

This is the model the FUSE adapter (casfs.fuse_ops) translates to and from the
kernel's protocol; tests drive it without mounting. It raises FsError with an
errno for filesystem conditions and lets FetchFailed / ManifestError through
for the adapter to log and turn into EIO.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

from casfs.cache import ChunkCache
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.manifest.reader import ChunkRef, Inode
from casfs.metrics import MountMetrics

STATS_XATTR = b"user.casfs.stats"

ReadObserver = Callable[[int, list[ChunkRef]], None]
ReadTracker = Callable[[], contextlib.AbstractContextManager[object]]
ListObserver = Callable[[int], None]


class FsError(Exception):
    def __init__(self, errno_: int) -> None:
        super().__init__(os.strerror(errno_))
        self.errno = errno_


def _read_parts(parts: list[tuple[Path | bytes, int, int]]) -> bytes:
    """Concatenate byte ranges of local chunk files (or of in-memory chunks)."""
    out = []
    for src, start, length in parts:
        if isinstance(src, bytes):
            out.append(src[start : start + length])
            continue
        fd = os.open(src, os.O_RDONLY)
        try:
            data = os.pread(fd, length, start)
        finally:
            os.close(fd)
        if len(data) != length:
            # Truncated on disk since it was verified: never serve short (wrong) data.
            raise FileNotFoundError(errno.ENOENT, "chunk file shorter than indexed", str(src))
        out.append(data)
    return b"".join(out)


class ImageFS:
    """A read-only view of one manifest."""

    def __init__(self, manifest: Manifest, fetcher: Fetcher, cache: ChunkCache,
                 metrics: MountMetrics, extra_stats: Callable[[], dict] | None = None) -> None:
        self.manifest = manifest
        self.fetcher = fetcher
        self.cache = cache
        self.metrics = metrics
        self.read_observers: list[ReadObserver] = []
        self.read_trackers: list[ReadTracker] = []  # entered for the span of each read
        self.list_observers: list[ListObserver] = []  # told of each directory listing
        self.extra_stats = extra_stats

    # -- metadata --------------------------------------------------------------

    def getattr(self, ino: int) -> Inode:
        self.metrics.getattrs += 1
        return self.manifest.inode(ino)

    def lookup(self, parent: int, name: bytes) -> int:
        """The child's inode, or 0 when the name does not exist."""
        self.metrics.lookups += 1
        if not stat.S_ISDIR(self.manifest.inode(parent).mode):
            raise FsError(errno.ENOTDIR)
        if name == b".":
            return parent
        if name == b"..":
            return self.manifest.inode(parent).parent
        ino = self.manifest.lookup(parent, name)
        if not ino:
            self.metrics.negative_lookups += 1
        return ino

    def readdir(self, ino: int, start: int) -> Iterator[tuple[int, bytes, int, Inode]]:
        """(index, name, inode number, attributes) of each entry from index start."""
        self.metrics.readdirs += 1
        if not stat.S_ISDIR(self.manifest.inode(ino).mode):
            raise FsError(errno.ENOTDIR)
        if start == 0:
            for observe in self.list_observers:
                observe(ino)
        for index, name, child in self.manifest.entries(ino, start):
            yield index, name, child, self.manifest.inode(child)

    def readlink(self, ino: int) -> bytes:
        if not stat.S_ISLNK(self.manifest.inode(ino).mode):
            raise FsError(errno.EINVAL)
        return self.manifest.readlink(ino)

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.manifest.xattrs(ino))

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == 1 and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        value = self.manifest.xattrs(ino).get(name)
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def stats(self) -> dict:
        out = {"metrics": self.metrics.as_dict(), "cache": self.cache.stats.__dict__.copy()}
        out["cache"]["bytes"] = self.cache.total_bytes()
        out["cache"]["max_bytes"] = self.cache.max_bytes
        if self.extra_stats is not None:
            out.update(self.extra_stats())
        return out

    def statfs_counts(self) -> tuple[int, int]:
        """(total content bytes, inodes) for statfs."""
        meta = self.manifest.meta
        total = sum(int(layer.get("size", 0)) for layer in meta.get("layers", []))
        return total, self.manifest.n_inodes

    # -- content ---------------------------------------------------------------

    def open(self, ino: int) -> None:
        self.metrics.opens += 1
        node = self.manifest.inode(ino)
        if stat.S_ISDIR(node.mode):
            raise FsError(errno.EISDIR)
        if not stat.S_ISREG(node.mode):
            raise FsError(errno.ENXIO)

    def _invalidate(self, exc: FileNotFoundError, chunks: list[ChunkRef]) -> None:
        """Make the next lookup re-check the chunk file that failed (all, if unnamed)."""
        name = os.path.basename(exc.filename) if exc.filename else ""
        for c in chunks:
            if not name or c.digest == name:
                self.cache.invalidate(c.digest)

    async def _get_into(self, sources: list[Path | bytes | None], i: int, digest: str,
                        fresh: bool) -> None:
        sources[i] = await self.fetcher.get(digest, fresh=fresh)

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        self.metrics.reads += 1
        chunks = self.manifest.chunks_for_range(ino, offset, size)
        if not chunks:
            return b""
        for observe in self.read_observers:
            observe(ino, chunks)
        end = min(offset + size, self.manifest.inode(ino).size)
        # The hot path, on this thread: chunks this process verified, bytes in the page
        # cache (after a prefetch, or re-reads the kernel dropped). Never blocks.
        ranges = []  # (digest, offset in the chunk, length) of each chunk's part
        for c in chunks:
            lo = max(offset, c.offset) - c.offset
            ranges.append((c.digest, lo, min(end, c.offset + c.length) - c.offset - lo))
        data = self.cache.read_nowait(ranges)
        if data is not None:
            self.fetcher.note_hits([c.digest for c in chunks])
            self.metrics.read_bytes += len(data)
            return data
        with contextlib.ExitStack() as stack:
            for track in self.read_trackers:
                stack.enter_context(track())
            data = await self._read_blocking(chunks, ranges)
        self.metrics.read_bytes += len(data)
        return data

    async def _read_blocking(self, chunks: list[ChunkRef],
                             ranges: list[tuple[str, int, int]]) -> bytes:
        """The same ranges, from cache files (one thread hop) or fetched."""

        def parts_of(sources: list[Path | bytes]) -> list[tuple[Path | bytes, int, int]]:
            return [(src, lo, length)
                    for (_, lo, length), src in zip(ranges, sources, strict=True)]

        def read_if_cached() -> bytes | None:
            # The common warm case in one thread hop: every chunk on disk.
            paths = self.fetcher.cached_paths([c.digest for c in chunks])
            if paths is None:
                return None
            try:
                return _read_parts(parts_of(list(paths)))
            except FileNotFoundError as exc:  # evicted or damaged between lookup and read
                self._invalidate(exc, chunks)
                return None

        data = await trio.to_thread.run_sync(read_if_cached, limiter=self.fetcher.disk_limiter)
        attempts = 0
        while data is None:
            sources: list[Path | bytes | None] = [None] * len(chunks)
            # After a cached file vanished twice (a small cache churning), take bytes.
            fresh = attempts >= 1
            async with trio.open_nursery() as nursery:
                for i, c in enumerate(chunks):
                    nursery.start_soon(self._get_into, sources, i, c.digest, fresh)
            try:
                data = await trio.to_thread.run_sync(
                    _read_parts, parts_of([s for s in sources if s is not None]),
                    limiter=self.fetcher.disk_limiter,
                )
            except FileNotFoundError as exc:
                self._invalidate(exc, chunks)
                attempts += 1
                if attempts >= 3:
                    raise
        return data
