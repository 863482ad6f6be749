"""What an image looks like as a read-only filesystem: lookups, attributes, directory
listings, links, xattrs and file content, answered from a manifest and the fetcher.

This is the model the FUSE adapter (casfs.fuse_ops) translates to and from the
kernel's protocol; tests drive it without mounting. It raises FsError with an
errno for filesystem conditions and lets FetchFailed / ManifestError through
for the adapter to log and turn into EIO. It maps a read to chunk ranges; getting
their bytes (cache, store, retries) is the fetcher's job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import stat
from collections.abc import Callable, Iterator

from casfs.errors import FsError
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.manifest.reader import ChunkRef, Inode
from casfs.metrics import MountMetrics
from casfs.ranges import ranges_of

__all__ = ["STATS_XATTR", "FsError", "ImageFS"]

STATS_XATTR = b"user.casfs.stats"

ReadObserver = Callable[[int, list[ChunkRef]], None]
ReadTracker = Callable[[], contextlib.AbstractContextManager[object]]
ListObserver = Callable[[int], None]


class ImageFS:
    """A read-only view of one manifest."""

    def __init__(self, manifest: Manifest, fetcher: Fetcher, metrics: MountMetrics,
                 extra_stats: Callable[[], dict] | None = None, *,
                 security_xattrs: bool = True) -> None:
        self.manifest = manifest
        # security.* xattrs (file capabilities, labels) are shown only where the mount
        # honours setuid: a capability is a privilege like a setuid bit.
        self.security_xattrs = security_xattrs
        self.fetcher = fetcher
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
        return [name for name in self.manifest.xattrs(ino) if self._shown(name)]

    def _shown(self, name: bytes) -> bool:
        return self.security_xattrs or not name.startswith(b"security.")

    def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == 1 and name == STATS_XATTR:
            return json.dumps(self.stats()).encode()
        value = self.manifest.xattrs(ino).get(name) if self._shown(name) else None
        if value is None:
            raise FsError(errno.ENODATA)
        return value

    def stats(self) -> dict:
        out = {"metrics": self.metrics.as_dict(), "cache": self.fetcher.cache_stats()}
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

    async def read(self, ino: int, offset: int, size: int) -> bytes | bytearray:
        """Bytes [offset, offset+size) of file ino (fewer at its end)."""
        self.metrics.reads += 1
        chunks = self.manifest.chunks_for_range(ino, offset, size)
        if not chunks:
            return b""
        for observe in self.read_observers:
            observe(ino, chunks)
        ranges = ranges_of(chunks, offset, min(offset + size, self.manifest.inode(ino).size))
        if not self.read_trackers:
            data = await self.fetcher.read(ranges)
        else:
            with contextlib.ExitStack() as stack:
                for track in self.read_trackers:
                    stack.enter_context(track())
                data = await self.fetcher.read(ranges)
        self.metrics.read_bytes += len(data)
        return data

