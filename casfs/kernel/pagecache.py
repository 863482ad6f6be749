"""Warming, as kernel mode needs it: the page cache filled ahead of a boot, not chunks
verified for the daemon.

In FUSE mode, warming a cached chunk means reading and hashing it once, so that the
daemon's reads of it are then served on its loop (casfs.fetch). In kernel mode the kernel
reads the node's files itself and never asks the daemon: verifying there would only spend
the CPU the boot needs. What helps instead is what the kernel would otherwise wait for:
the files' bytes in the page cache, in the order the boot will read them. So a kernel
mount's fetcher "warms" a chunk by asking the kernel to read ahead (POSIX_FADV_WILLNEED)
the file the kernel serves it from: the chunk file for a file of one chunk, the range of
the whole object for a file of several. The kernel reads asynchronously; nothing is
hashed, nothing waits.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.manifest.objects import multi_chunk_files, object_name_of

# digest -> (object name, offset in the object, length), for chunks of files of several
Located = dict[str, tuple[str, int, int]]


def object_ranges(manifest: Manifest) -> Located:
    """Where each chunk of a file of several chunks sits in that file's object (the
    first such file wins: any object holding the chunk holds the same bytes). Blocking."""
    out: Located = {}
    for ino in multi_chunk_files(manifest):
        chunks = manifest.chunks(ino)
        name = object_name_of(chunks)
        for c in chunks:
            out.setdefault(c.digest, (name, c.offset, c.length))
    return out


class KernelFetcher(Fetcher):
    """A fetcher whose warm() reads ahead into the page cache (see the module docstring)."""

    def __init__(self, *args: Any, manifest: Manifest, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.manifest = manifest
        self._located: Located | None = None
        self._locating = trio.Lock()  # the boot's first warms all want the table: build it once
        self.readahead_bytes = 0  # bytes asked to be read ahead (a counter for stats)

    async def warm(self, digests: Sequence[str]) -> int:
        if self._located is None:
            async with self._locating:
                if self._located is None:
                    self._located = await trio.to_thread.run_sync(object_ranges, self.manifest)
        n = await trio.to_thread.run_sync(self._read_ahead, list(digests),
                                          limiter=self.disk_limiter)
        self.metrics.warmed_chunks += n
        return n

    def _read_ahead(self, digests: list[str]) -> int:
        assert self._located is not None
        done = 0
        for digest in digests:
            where = self._located.get(digest)
            # The object the kernel reads, else the chunk file (what the view reads
            # while the object is not whole yet).
            if where is not None and _willneed(self.cache.object_path(where[0]), where[1],
                                               where[2]):
                done += 1
                self.readahead_bytes += where[2]
            elif _willneed(self.cache.chunk_path(digest), 0, 0):
                done += 1
        return done


def _willneed(path: Path, offset: int, length: int,
              advise: Callable[[int, int, int, int], None] = os.posix_fadvise) -> bool:
    """Ask the kernel to read [offset, offset+length) of path ahead (length 0: all of it).
    False when the file is not there (not on the node: the view will serve it)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        with contextlib.suppress(OSError):
            advise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        return True
    finally:
        os.close(fd)
