"""The node's local chunk cache, shared by every mount (and daemon process) on the node.

Layout of the cache directory (format version 2, checked at open; docs/format.md):

    VERSION               "casfs-cache 2"
    index.lmdb/           LMDB: chunk digest (32 bytes) -> (size, last use);
                          b"o" + object name -> (size, last use, BLAKE3 of the content);
                          b"\\0total" -> bytes held
    chunks/<hh>/<hex>     a chunk's uncompressed bytes, so reads are plain preads (a file of
                          one chunk: also its object, read by the kernel in kernel mode)
    objects/<hh>/<name>   a file of several chunks made whole (kernel mode)
    manifests/<hex>       decompressed manifests, mmapped by mounts (never evicted)
    erofs/                kernel mode: each manifest's EROFS image and object table
    view/                 kernel mode: the node view's FUSE mountpoint
    tmp/                  files being written
    logs/                 daemon logs

Version 1 (no objects) is upgraded in place when opened: nothing in it changes.

The directory is its owner's alone (0700, tightened when opened; another user's
directory is refused): it holds every image's content, whatever the image's modes.

An insert is a transaction: the bytes go to a temp file in tmp/, then are renamed
into chunks/ and indexed inside one LMDB write transaction, so a kill -9 at any
point leaves at worst an unindexed file (removed on the next insert of that
digest, or by `casfs cache prune`), never an indexed torn one.

Every change to chunks/ (insert, eviction, dropping a bad file) happens inside
a write transaction, and LMDB lets one writer in at a time across processes, so
an eviction in one daemon never unlinks a file another daemon has just inserted
again and indexed (the file would be gone, its entry kept, and the other daemon,
which verified it, would keep handing out a missing path). Evictions commit the
removal of entries before they unlink files: a reader that finds a looked-up
file gone misses when it looks again.

A chunk file is verified against its digest the first time each process uses
it; a file that was truncated or altered on disk is dropped and fetched again.
A file changed on disk after a process verified it is not noticed by that
process (see invalidate()).

Each process keeps the files of the chunks it verified or inserted most recently open
(at most OPEN_FILES_MAX files and OPEN_BYTES_MAX bytes), so that a read whose bytes are
already in the page cache is served by read_nowait() on the caller's own thread, with a
non-blocking preadv (RWF_NOWAIT) and no index lookup: content is immutable and was
verified, so an open file gives the right bytes even after another process evicted it.

Eviction is least-recently-used over the index, down to 90% of the cap, run by
whichever process's insert crossed it. Last-use times are written at most once
a minute per chunk per process, to keep reads off the LMDB write lock.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from casfs.digest import hash_bytes
from casfs.errors import CacheError
from casfs.locations import default_cache_dir, ensure_private_dir

__all__ = ["CACHE_FORMAT", "CacheStats", "ChunkCache", "default_cache_dir"]

log = logging.getLogger(__name__)

CACHE_FORMAT = "casfs-cache 2"
UPGRADABLE = ("casfs-cache 1",)  # formats this casfs upgrades in place when it opens them
_ENTRY = struct.Struct("<Qd")  # size, last use (unix time); an object's adds its BLAKE3
_TOTAL_KEY = b"\0total"
_OBJECT_PREFIX = b"o"
_TOUCH_EVERY = 60.0
DEFAULT_CACHE_SIZE = 10 << 30
MAP_SIZE = 1 << 32
FULL_WARN_EVERY = 10.0
OPEN_FILES_MAX = 4096
OPEN_BYTES_MAX = 1 << 30


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    inserts: int = 0
    evictions: int = 0
    evicted_bytes: int = 0
    corrupt_dropped: int = 0
    insert_failures: int = 0
    objects_completed: int = 0


_read_buffers = threading.local()


def _read_whole(path: Path, size: int) -> memoryview:
    """The file's bytes (a view of this thread's reusable buffer, valid until its next
    call), read up to one byte past `size` so that a longer file shows as such. Reusing
    the buffer spares a fresh multi-MiB allocation, and the kernel zeroing its pages,
    per verified chunk."""
    buf = getattr(_read_buffers, "buf", None)
    if buf is None or len(buf) < size + 1:
        buf = _read_buffers.buf = bytearray(max(size + 1, 1 << 20))
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = 0
        while got <= size:
            n = os.readv(fd, [view[got : size + 1]])
            if n == 0:
                break
            got += n
    finally:
        os.close(fd)
    return view[:got]


class ChunkCache:
    """Verified chunk files on local disk, indexed in LMDB. Thread-safe; blocking."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_CACHE_SIZE) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._verified: set[str] = set()
        self._verifying: dict[str, threading.Lock] = {}  # digest -> held while hashing
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._open: OrderedDict[str, tuple[int, int]] = OrderedDict()  # digest -> (fd, size)
        self._open_bytes = 0
        self._full_warned = -FULL_WARN_EVERY
        self._full_since_warning = 0
        # Private: the cache holds every image's content, whatever the image's own modes
        # say; only its owner may enter it (another user's directory is refused).
        ensure_private_dir(self.root)
        try:
            for sub in ("chunks", "objects", "manifests", "tmp", "logs"):
                (self.root / sub).mkdir(mode=0o700, exist_ok=True)
            version_file = self.root / "VERSION"
            found = version_file.read_text().strip() if version_file.exists() else None
            if found is not None and found not in (CACHE_FORMAT, *UPGRADABLE):
                raise CacheError(
                    f"cache {self.root} has format {found!r}, this casfs uses {CACHE_FORMAT!r}: "
                    "remove the directory or point --cache-dir elsewhere"
                )
            if found != CACHE_FORMAT:
                tmp = self.root / "tmp" / f"VERSION.{uuid.uuid4().hex}"
                try:
                    tmp.write_text(CACHE_FORMAT + "\n")
                    os.rename(tmp, version_file)
                finally:
                    tmp.unlink(missing_ok=True)  # a full disk leaves no stray temp file
            self.env = lmdb.open(
                str(self.root / "index.lmdb"), map_size=MAP_SIZE, max_dbs=0, sync=False,
                metasync=False, lock=True, max_readers=1024,
            )
        except OSError as exc:
            raise CacheError(f"cannot use cache directory {self.root}: {exc.strerror}") from exc
        except lmdb.Error as exc:
            raise CacheError(f"cannot open cache index in {self.root}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            for fd, _size in self._open.values():
                os.close(fd)
            self._open.clear()
            self._open_bytes = 0
        self.env.close()

    def chunk_path(self, digest: str) -> Path:
        return self.root / "chunks" / digest[:2] / digest

    def object_path(self, name: str) -> Path:
        """Where a multi-chunk file's whole content lives once complete (kernel mode)."""
        return self.root / "objects" / name[:2] / name

    def _key_path(self, key: bytes) -> Path:
        """The file an index key names: a chunk (32-byte key) or an object (b"o" + 32)."""
        if len(key) == 33 and key[:1] == _OBJECT_PREFIX:
            return self.object_path(key[1:].hex())
        return self.chunk_path(key.hex())

    # -- objects (kernel serving: a file's whole content, read by the kernel) -------------

    def has_object(self, name: str) -> bool:
        """Whether a complete object is on the node (its file, as the kernel sees it)."""
        return self.object_path(name).exists()

    def complete_object(self, name: str, chunks: Sequence[tuple[str, int]]) -> bool:
        """Make object `name` whole from its chunks (digest, length), in order, when the
        cache holds every one of them (each verified on the way, as any lookup); the
        object then enters the index like a chunk (counted, evicted least recently used
        first). Blocking. Returns whether the object is complete now.

        Written as a transaction: a temp file filled by in-kernel copies of the chunk
        files, checked for its length, renamed into objects/ and indexed under the
        write lock. A kill -9 leaves at worst a temp file (`prune` removes it)."""
        path = self.object_path(name)
        if path.exists():
            return True
        paths = []
        for digest, _length in chunks:
            found = self.lookup(digest, count=False)
            if found is None:
                return False
            paths.append(found)
        total = sum(length for _, length in chunks)
        tmp = self.root / "tmp" / f"object.{name}.{uuid.uuid4().hex}"
        key = _OBJECT_PREFIX + bytes.fromhex(name)
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for src, (_digest, length) in zip(paths, chunks, strict=True):
                    _copy_whole(src, out, length)
                if os.fstat(out).st_size != total:
                    raise OSError(errno.EIO, "object shorter than its chunks")
                # Its content hash, for `casfs cache verify` (the name is the chunk list's).
                content = _hash_file(out, total)
            finally:
                os.close(out)
            with self.env.begin(write=True) as txn:
                os.rename(tmp, path)
                if txn.get(key) is None:
                    txn.put(_TOTAL_KEY, struct.pack("<Q", self._total(txn) + total))
                txn.put(key, _ENTRY.pack(total, time.time()) + content)
                over = self._total(txn) > self.max_bytes
        except (OSError, lmdb.Error) as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                self._warn_full(name)
            else:
                log.warning("cannot complete object %s: %s", name, exc)
            return False
        self.stats.objects_completed += 1
        if over:
            self._evict_quietly(None)
        return True

    def touch_object(self, name: str) -> None:
        """Note that an object was used (the kernel reads it without telling casfs: the
        mount that opened it says so, at most once a minute per object)."""
        now = time.time()
        if now - self._touched.get("o" + name, 0.0) < _TOUCH_EVERY:
            return
        self._touched["o" + name] = now
        key = _OBJECT_PREFIX + bytes.fromhex(name)
        with self.env.begin() as txn:
            raw = txn.get(key)
        if raw is not None:
            self._touch(key, _ENTRY.unpack_from(raw)[0], now)

    # -- lookups ---------------------------------------------------------------

    def lookup(self, digest: str, *, count: bool = True) -> Path | None:
        """The path of a cached, verified chunk, or None (a miss). count=False: a
        look ahead (prefetch warming a chunk), not a read, so not a hit or miss."""
        key = bytes.fromhex(digest)
        with self.env.begin() as txn:
            raw = txn.get(key)
        if raw is None:
            self.stats.misses += count
            return None
        size, last = _ENTRY.unpack_from(raw)
        path = self.chunk_path(digest)
        if digest not in self._verified and not self._verify_once(digest, path, raw):
            self.stats.misses += count
            return None
        self.stats.hits += count
        now = time.time()
        if now - self._touched.get(digest, last) >= _TOUCH_EVERY:
            self._touch(key, size, now)
            self._touched[digest] = now
        else:
            self._touched.setdefault(digest, last)
        if digest not in self._open:
            self._keep_open(digest, path, size)
        return path

    def read_nowait(self, parts: Sequence[tuple[str, int, int]]) -> bytes | bytearray | None:
        """The bytes of (digest, offset, length) ranges of chunks, or None. Never blocks:
        served only from files this process holds open (verified), when every byte is
        in the page cache and no last-use time is due for an update; anything else is
        None, and the caller takes the blocking path (lookup() in a thread)."""
        now = time.time()
        out: list[bytearray] = []
        with self._lock:
            for digest, start, length in parts:
                entry = self._open.get(digest)
                if entry is None or now - self._touched.get(digest, 0.0) >= _TOUCH_EVERY:
                    return None
                buf = bytearray(length)
                try:
                    n = os.preadv(entry[0], [buf], start, os.RWF_NOWAIT)
                except OSError:  # EAGAIN: not (all) in the page cache
                    return None
                if n != length:
                    return None
                out.append(buf)
                self._open.move_to_end(digest)
        self.stats.hits += len(out)
        return out[0] if len(out) == 1 else b"".join(out)

    def read_parts(self, parts: Sequence[tuple[str, int, int]]) -> list[bytes | None]:
        """The bytes of each (digest, offset, length) range of a chunk, from the cache;
        None for a chunk it does not hold. Blocking. A file that vanished or shrank
        since it was verified (evicted by another process, damaged) is forgotten and
        reported as not held: the cache keeps its own files coherent, so its callers
        never see a half-served read."""
        out: list[bytes | None] = []
        for digest, start, length in parts:
            data = None
            path = self.lookup(digest)
            if path is not None:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        data = os.pread(fd, length, start)
                    finally:
                        os.close(fd)
                except OSError:
                    data = None
                if data is None or len(data) != length:
                    # Truncated or gone since it was verified: never serve short bytes.
                    self.invalidate(digest)
                    self.stats.hits -= 1
                    self.stats.misses += 1
                    data = None
            out.append(data)
        return out

    def _keep_open(self, digest: str, path: Path, size: int) -> None:
        """Hold a verified chunk's file open for read_nowait (LRU, bounded)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        with self._lock:
            if digest in self._open:
                os.close(fd)
                return
            self._open[digest] = (fd, size)
            self._open_bytes += size
            while self._open and (len(self._open) > OPEN_FILES_MAX
                                  or self._open_bytes > OPEN_BYTES_MAX):
                _, (old_fd, old_size) = self._open.popitem(last=False)
                os.close(old_fd)
                self._open_bytes -= old_size

    def _close_open(self, digests: Sequence[str]) -> None:
        """Stop serving chunks from held-open files (caller holds self._lock)."""
        for digest in digests:
            entry = self._open.pop(digest, None)
            if entry is not None:
                os.close(entry[0])
                self._open_bytes -= entry[1]

    def contains_many(self, digests: list[str]) -> list[bool]:
        """Whether each digest has an index entry (no verification: a hint for prefetch)."""
        with self.env.begin() as txn:
            return [txn.get(bytes.fromhex(d)) is not None for d in digests]

    def _verify_once(self, digest: str, path: Path, raw: bytes) -> bool:
        """_verify_file, but a thread that finds another verifying the same chunk (a
        reader catching up with the warming ahead of it) waits for that result instead
        of reading and hashing the file a second time."""
        with self._lock:
            gate = self._verifying.get(digest)
            if gate is None:
                gate = self._verifying[digest] = threading.Lock()
        with gate:
            try:
                if digest in self._verified:
                    return True
                return self._verify_file(digest, path, raw)
            finally:
                with self._lock:
                    if self._verifying.get(digest) is gate:
                        del self._verifying[digest]

    def _verify_file(self, digest: str, path: Path, raw: bytes) -> bool:
        """Check a chunk file against the index entry `raw` just read for it; drop a bad one."""
        size, _ = _ENTRY.unpack_from(raw)
        try:
            data = _read_whole(path, size)
        except OSError:
            data = None
        if data is not None and len(data) == size and hash_bytes(data) == digest:
            with self._lock:
                self._verified.add(digest)
            return True
        # Only if the entry is still the one read: a file evicted by another process
        # since (entry gone), or evicted and inserted again (new entry), is no damage.
        try:
            dropped = self._drop(digest, expect=raw)
        except lmdb.Error as exc:  # the index cannot be written (its disk full): a miss
            log.warning("cache file for chunk %s is bad and its entry cannot be dropped: %s",
                        digest, exc)
            return False
        if dropped:
            state = "missing" if data is None else "truncated" if len(data) != size else "corrupt"
            log.warning("cache file for chunk %s is %s; dropped it (it will be fetched again)",
                        digest, state)
            self.stats.corrupt_dropped += 1
        return False

    def _touch(self, key: bytes, size: int, now: float) -> None:
        try:
            with self.env.begin(write=True) as txn:
                raw = txn.get(key)
                if raw is not None:
                    txn.put(key, _ENTRY.pack(size, now) + raw[_ENTRY.size:])
        except lmdb.Error as exc:
            log.debug("could not record chunk use: %s", exc)

    # -- inserts ---------------------------------------------------------------

    def insert(self, digest: str, data: bytes) -> Path | None:
        """Add verified bytes (the caller has checked the digest). None when the disk
        is full or unwritable: the caller then serves the bytes without caching."""
        path = self.chunk_path(digest)
        tmp = self.root / "tmp" / f"{digest}.{uuid.uuid4().hex}"
        key = bytes.fromhex(digest)
        try:
            path.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with open(fd, "wb") as f:
                f.write(data)
            now = time.time()
            with self.env.begin(write=True) as txn:
                # Renamed under the write lock: see the module docstring.
                os.rename(tmp, path)
                total = self._total(txn)
                if txn.get(key) is None:
                    total += len(data)
                    txn.put(_TOTAL_KEY, struct.pack("<Q", total))
                txn.put(key, _ENTRY.pack(len(data), now))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.stats.insert_failures += 1
            if exc.errno == errno.ENOSPC:
                self._warn_full(digest)
                self._evict_quietly(lambda: int(self.total_bytes() * 0.5))
            else:
                log.warning("cannot write chunk %s to cache: %s", digest, exc.strerror)
            return None
        except lmdb.Error as exc:
            # The rename may have happened and the commit failed (e.g. the index could
            # not grow on a full disk): remove the file unless an entry names it, so a
            # full disk does not fill up further with orphans.
            tmp.unlink(missing_ok=True)
            self._unlink_if_unindexed(key, path)
            log.warning("cannot index chunk %s in cache: %s", digest, exc)
            self.stats.insert_failures += 1
            return None
        with self._lock:
            self._verified.add(digest)
        self._touched[digest] = now
        self._keep_open(digest, path, len(data))
        self.stats.inserts += 1
        if total > self.max_bytes:
            self._evict_quietly(None)
        return path

    def _warn_full(self, digest: str) -> None:
        """One warning per FULL_WARN_EVERY seconds while the disk stays full, not one per
        chunk (a full disk under a busy mount would flood the log)."""
        now = time.monotonic()
        with self._lock:
            self._full_since_warning += 1
            if now - self._full_warned < FULL_WARN_EVERY:
                return
            count, self._full_since_warning, self._full_warned = self._full_since_warning, 0, now
        log.warning("cache disk full; evicting and serving chunks uncached (%d since the last "
                    "warning, the latest %s)", count, digest)

    def _unlink_if_unindexed(self, key: bytes, path: Path) -> None:
        """Remove a chunk file no entry names, under the write lock (a commit with no
        change writes nothing, so this works on a full disk). Best effort: whatever is
        left is an orphan, never served, that `casfs cache prune` removes."""
        try:
            with self.env.begin(write=True) as txn:
                if txn.get(key) is None:
                    path.unlink(missing_ok=True)
        except (lmdb.Error, OSError) as exc:
            log.debug("could not remove unindexed chunk file %s: %s", path, exc)

    def _evict_quietly(self, target: Callable[[], int] | None) -> None:
        """Evict (to target(), or the default), logging instead of raising when the
        index cannot be written: the chunk at hand is served either way."""
        try:
            self.evict(target=None if target is None else target())
        except lmdb.Error as exc:
            log.warning("cannot evict from the cache: %s", exc)

    @staticmethod
    def _total(txn: lmdb.Transaction) -> int:
        raw = txn.get(_TOTAL_KEY)
        return struct.unpack("<Q", raw)[0] if raw else 0

    def total_bytes(self) -> int:
        with self.env.begin() as txn:
            return self._total(txn)

    def entries(self) -> int:
        with self.env.begin() as txn:
            return txn.stat()["entries"] - (1 if txn.get(_TOTAL_KEY) else 0)

    def usage(self) -> dict[str, int]:
        """What the cache holds: chunks and whole objects, counted and summed (a pass
        over the index)."""
        out = {"chunks": 0, "chunk_bytes": 0, "objects": 0, "object_bytes": 0}
        with self.env.begin() as txn:
            for key, raw in txn.cursor():
                if key == _TOTAL_KEY:
                    continue
                size = _ENTRY.unpack_from(raw)[0]
                kind = "objects" if len(key) == 33 and key[:1] == _OBJECT_PREFIX else "chunks"
                out[kind] += 1
                out[kind[:-1] + "_bytes"] += size
        return out

    # -- eviction --------------------------------------------------------------

    def _drop(self, digest: str, expect: bytes | None = None) -> bool:
        """Remove a chunk's entry and file; with `expect`, only while its entry is still
        exactly that. Returns whether it was removed."""
        key = bytes.fromhex(digest)
        with self.env.begin(write=True) as txn:
            raw = txn.get(key)
            if expect is not None and raw != expect:
                return False
            if raw is not None:
                size, _ = _ENTRY.unpack_from(raw)
                txn.delete(key)
                txn.put(_TOTAL_KEY, struct.pack("<Q", max(0, self._total(txn) - size)))
            self.chunk_path(digest).unlink(missing_ok=True)
        with self._lock:
            self._verified.discard(digest)
            self._close_open([digest])
        return True

    def invalidate(self, digest: str) -> None:
        """Forget that this process verified a chunk, so that its next lookup checks the
        file again (and drops the entry if the file is gone or damaged). For a reader
        that could not open or fully read a path lookup() returned."""
        with self._lock:
            self._verified.discard(digest)
            self._close_open([digest])

    def evict(self, target: int | None = None) -> int:
        """Remove least-recently-used chunks until at most target bytes remain
        (default 90% of the cap). Returns bytes freed."""
        target = int(self.max_bytes * 0.9) if target is None else target
        with self.env.begin(write=True) as txn:
            total = self._total(txn)
            if total <= target:
                return 0
            entries = []
            for key, raw in txn.cursor():
                if key == _TOTAL_KEY:
                    continue
                size, last = _ENTRY.unpack_from(raw)
                entries.append((last, size, key))
            entries.sort()
            victims = []
            freed = 0
            for _last, size, key in entries:
                if total - freed <= target:
                    break
                txn.delete(key)
                victims.append(key.hex())
                freed += size
            txn.put(_TOTAL_KEY, struct.pack("<Q", total - freed))
        # The entries are gone first, so a reader that looked a victim up just before and
        # finds its file gone misses when it looks again. The files then go under the
        # write lock, each only while still unindexed: an insert of the same digest since
        # (rename and entry in one write transaction) keeps its file.
        with self._lock:
            self._verified.difference_update(victims)
            self._close_open(victims)
        with self.env.begin(write=True) as txn:
            for digest in victims:
                key = bytes.fromhex(digest)
                if txn.get(key) is None:
                    # An object a running container holds open stays readable: the
                    # kernel keeps an unlinked file's data until its last user closes it.
                    self._key_path(key).unlink(missing_ok=True)
        self.stats.evictions += len(victims)
        self.stats.evicted_bytes += freed
        if victims:
            log.info("evicted %d chunks (%d bytes) from the cache", len(victims), freed)
        return freed

    def verify_all(self, progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """Re-hash every chunk and object file the index names; drop (and count) the ones
        that do not match (their next use fetches or rebuilds them). For kernel mode,
        whose reads the kernel serves from these files without asking casfs. Blocking.
        Returns (files checked, files dropped)."""
        with self.env.begin() as txn:
            entries = [(bytes(k), bytes(v)) for k, v in txn.cursor() if k != _TOTAL_KEY]
        checked = 0
        before = self.stats.corrupt_dropped
        for key, raw in entries:
            checked += 1
            if len(key) == 33 and key[:1] == _OBJECT_PREFIX:
                if not self._object_intact(key, raw):
                    self._drop_object(key, raw)
            elif self._verify_file(key.hex(), self.chunk_path(key.hex()), raw):
                with self._lock:
                    self._verified.add(key.hex())
            if progress is not None:
                progress(checked, len(entries))
        return checked, self.stats.corrupt_dropped - before

    def _object_intact(self, key: bytes, raw: bytes) -> bool:
        size = _ENTRY.unpack_from(raw)[0]
        want = raw[_ENTRY.size:]
        try:
            fd = os.open(self._key_path(key), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            return os.fstat(fd).st_size == size and len(want) == 32 and \
                _hash_file(fd, size) == want
        finally:
            os.close(fd)

    def _drop_object(self, key: bytes, raw: bytes) -> int:
        with self.env.begin(write=True) as txn:
            if txn.get(key) != raw:
                return 0
            size = _ENTRY.unpack_from(raw)[0]
            txn.delete(key)
            txn.put(_TOTAL_KEY, struct.pack("<Q", max(0, self._total(txn) - size)))
            self._key_path(key).unlink(missing_ok=True)
        log.warning("object %s is damaged; dropped it", key[1:].hex())
        self.stats.corrupt_dropped += 1
        return 1

    def prune(self) -> tuple[int, int]:
        """Remove files that no index entry names (left by crashes), and stale temp
        files. Returns (files removed, bytes freed)."""
        removed = freed = 0
        cutoff = time.time() - 3600
        for tmp in (self.root / "tmp").iterdir():
            try:
                st = tmp.stat()
                if st.st_mtime < cutoff:
                    tmp.unlink()
                    removed += 1
                    freed += st.st_size
            except OSError:
                pass
        with self.env.begin() as txn:
            for kind, prefix in (("chunks", b""), ("objects", _OBJECT_PREFIX)):
                removed, freed = self._prune_dir(txn, self.root / kind, prefix, removed, freed)
        return removed, freed

    @staticmethod
    def _prune_dir(txn: lmdb.Transaction, top: Path, prefix: bytes, removed: int,
                   freed: int) -> tuple[int, int]:
        if not top.is_dir():
            return removed, freed
        for sub in top.iterdir():
            for f in sub.iterdir():
                try:
                    if txn.get(prefix + bytes.fromhex(f.name)) is None:
                        size = f.stat().st_size
                        f.unlink()
                        removed += 1
                        freed += size
                except (OSError, ValueError):
                    pass
        return removed, freed


def _copy_whole(src: Path, out: int, length: int) -> None:
    """Append a chunk file's `length` bytes to the open file `out` (copied in the kernel)."""
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        left = length
        while left > 0:
            n = os.copy_file_range(fd, out, left)
            if n == 0:
                raise OSError(errno.EIO, "chunk file shorter than indexed", str(src))
            left -= n
    finally:
        os.close(fd)


def _hash_file(fd: int, size: int) -> bytes:
    """BLAKE3 of a file's first `size` bytes, read in pieces (objects can be GBs)."""
    import blake3

    h = blake3.blake3()
    offset = 0
    while offset < size:
        piece = os.pread(fd, min(8 << 20, size - offset), offset)
        if not piece:
            break
        h.update(piece)
        offset += len(piece)
    return h.digest()
