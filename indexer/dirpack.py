"""Directory packs, written at index time: a layer's small files, grouped by directory.

A first boot (no trace anywhere yet) reads a package's modules one after another from
the same directories, and one GET per small file at 20 ms each, one after another, is
what makes it slow. While a layer is read, the stored (zstd) form of each of its small
files (at most PACKED_FILE_MAX bytes: one chunk) is spilled to a temporary file; at the
layer's end they are written out sorted by (directory, name) into packs of up to
`pack_bytes`, so one directory's files sit back to back and a mount fetches a whole
directory with one ranged GET (prefetch.heuristics). The layer's pack index
(casfs.packindex) says where each blob sits; it is stored beside the layer record.

The blobs stay in the store as well: packs speed fetching up, the store's meaning does
not depend on them (a mount without the pack index fetches blobs one by one).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from dataclasses import dataclass

from casfs import packindex
from casfs.errors import CasfsError, DirPackError
from casfs.store import Store
from indexer.chunking import SMALL_CHUNK

PACKED_FILE_MAX = SMALL_CHUNK  # files of one chunk
PACK_BYTES = 64 << 20
log = logging.getLogger(__name__)


@dataclass
class PackStats:
    files: int = 0
    packs: int = 0
    bytes: int = 0  # stored bytes written into packs


class DirPacker:
    """Collects one layer's small files (from upload threads), then writes its packs.

    Packing only ever speeds fetching up, so it never fails an index: a spill that
    cannot be written (a full temp disk) or a pack that cannot be stored leaves the
    layer without a pack index (logged; the next index of the layer tries again).
    """

    def __init__(self, store: Store, pack_bytes: int = PACK_BYTES) -> None:
        self.store = store
        self.pack_bytes = pack_bytes
        self.stats = PackStats()
        self._lock = threading.Condition()
        self._spill = tempfile.TemporaryFile(prefix="casfs-dirpack-")
        self._size = 0
        self._writing = 0  # adds between taking their place and finishing their write
        self._closed = False
        self._failed: str | None = None
        # (directory, name, digest, offset in the spill file, stored length)
        self._files: list[tuple[str, str, str, int, int]] = []

    def wants(self, size: int) -> bool:
        return 0 < size <= PACKED_FILE_MAX

    def add(self, path: str, digest: str, stored: bytes) -> None:
        """A small file's blob in stored form (called on upload threads; after close,
        as when the layer failed with uploads still queued, a no-op)."""
        directory, _, name = path.rpartition("/")
        with self._lock:  # only the place is taken under the lock, not the write
            if self._closed or self._failed:
                return
            offset = self._size
            self._size += len(stored)
            self._writing += 1
        try:
            os.pwrite(self._spill.fileno(), stored, offset)
            entry = (directory, name, digest, offset, len(stored))
            error = None
        except OSError as exc:
            entry, error = None, f"cannot spill small files to a temp file: {exc.strerror}"
        with self._lock:
            if entry is not None:
                self._files.append(entry)
            elif self._failed is None:
                self._failed = error
            self._writing -= 1
            self._lock.notify_all()

    def finish(self, what: str) -> bytes | None:
        """Write the packs; the layer's pack index (uncompressed), or None when packing
        failed (logged)."""
        try:
            self._drain()
            if self._failed:
                raise DirPackError(self._failed)
            return self._write_packs()
        except (DirPackError, CasfsError, OSError) as exc:
            log.warning("%s: no directory packs (%s); its files are fetched one by one",
                        what, exc)
            return None
        finally:
            self.close()

    def _write_packs(self) -> bytes:
        packs: list[str] = []
        entries: list[tuple[str, int, int, int]] = []
        buf = bytearray()
        pending: list[tuple[str, int, int]] = []  # (digest, offset in buf, length)
        placed: set[str] = set()

        def flush() -> None:
            if not pending:
                return
            packs.append(self.store.put_pack(bytes(buf)))
            entries.extend((d, len(packs) - 1, off, n) for d, off, n in pending)
            self.stats.packs += 1
            self.stats.bytes += len(buf)
            buf.clear()
            pending.clear()

        for _, _, digest, offset, length in sorted(self._files):
            if digest in placed:  # the same content twice in a layer: packed once
                continue
            placed.add(digest)
            if buf and len(buf) + length > self.pack_bytes:
                flush()
            pending.append((digest, len(buf), length))
            buf += os.pread(self._spill.fileno(), length, offset)
            self.stats.files += 1
        flush()
        return packindex.encode(packs, entries)

    def _drain(self) -> None:
        """Wait for adds that are still writing."""
        with self._lock:
            while self._writing:
                self._lock.wait()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            while self._writing:  # never close the file under a pwrite
                self._lock.wait()
        self._spill.close()
