"""The node's FUSE view of content objects: the last data-only layer of every
kernel-mode mount on the node, which overlayfs reads a file's content through when the
node does not hold its object yet.

Its tree is flat and never listed: the root holds 256 directories `00`..`ff`, and
`<hh>/<object name>` is the content of any registered mount's file with that object
name (casfs.manifest.objects). A read is served by that mount's filesystem model, so it
goes through that mount's fetcher, cache and prefetch observers exactly as a read of
the FUSE mode does. Content is immutable: entries and attributes are cached by the
kernel for a long time; a name no mount has is not cached (a later mount may add it).

overlayfs keeps the data layer it resolved at a file's first open for as long as that
inode lives, so the view keeps serving an object after the node completed it on disk:
what a running container opened through the view stays readable through it.

An object's inode number is a function of its name (`object_ino`: 62 bits of it, with
bit 62 set), and the way back is a search of the registered mounts' object tables,
which are sorted by name (`_names_with_prefix`): a new view taking a dead one's
connection over (casfs.failover) answers the numbers the kernel already holds without
any state handed over. Two names sharing those 62 bits (about n^2 / 2^63 for n objects
on the node) would make one number ambiguous: the view then answers it EIO (logged),
never one object's bytes for the other's.

Every request is timed per operation (`times`; node metrics), and a read also in its
mount's own histograms (`ViewSource.times`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

import pyfuse3

from casfs.errors import FsError
from casfs.manifest.objects import RECORD, ObjectTable
from casfs.nodemetrics import OpTimes
from casfs.vfs import ImageFS

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
FIRST_OBJECT_INO = 1024  # below: the root and the 256 prefix directories
OBJECT_INO_BIT = 1 << 62  # every object's number has it (and nothing above)
_INO_MASK = OBJECT_INO_BIT - 1


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Time a request handler into the view's per-operation histograms."""
    import functools

    name = fn.__name__
    clock = time.perf_counter

    @functools.wraps(fn)
    async def wrapper(self: ObjectView, *args: Any) -> Any:
        started = clock()
        try:
            return await fn(self, *args)
        finally:
            self.times.observe(name, clock() - started)

    return wrapper


def object_ino(name: bytes) -> int:
    """The inode number of object `name` (32 raw bytes): its first 62 bits, bit 62 set."""
    return (int.from_bytes(name[:8], "big") >> 2) | OBJECT_INO_BIT


def _names_with_prefix(table: ObjectTable, ino: int) -> list[bytes]:
    """The names in a (sorted) object table whose number is ino."""
    low = ((ino & _INO_MASK) << 2).to_bytes(8, "big")
    buf, size = table.buf, RECORD.size
    count = len(buf) // size
    lo, hi = 0, count
    while lo < hi:  # the first name >= low
        mid = (lo + hi) // 2
        if bytes(buf[mid * size: mid * size + 8]) < low:
            lo = mid + 1
        else:
            hi = mid
    out = []
    while lo < count:
        name = bytes(buf[lo * size: lo * size + 32])
        if object_ino(name) != ino:
            break
        out.append(name)
        lo += 1
    return out
CACHE_TIMEOUT = 86400.0 * 365
KERNEL_NO_OPEN = bool(getattr(pyfuse3, "INODE_FH_WITHOUT_OPEN", False))


class ViewSource(Protocol):
    """A mount the view serves objects of."""

    table: ObjectTable
    fs: ImageFS
    closed: bool
    times: OpTimes

    def served(self, ino: int) -> None:
        """The view is about to serve file `ino` of this mount (it was not local)."""


class ObjectView(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, sources: Callable[[], list[ViewSource]],
                 stats: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.sources = sources  # newest first
        self.stats = stats
        self._resolved: dict[int, tuple[ViewSource, int]] = {}
        self.lookups = 0
        self.reads = 0
        self.misses = 0  # lookups of names no mount has
        self.io_errors = 0
        self.ambiguous = 0  # numbers two object names share (answered EIO)
        self.times = OpTimes()

    # -- names -----------------------------------------------------------------------------

    def _find(self, name: bytes) -> tuple[ViewSource, int] | None:
        for source in self.sources():
            if source.closed:
                continue
            ino = source.table.lookup(name)
            if ino:
                return source, ino
        return None

    def _name_of(self, view_ino: int) -> bytes:
        """The one object name with this number among the registered mounts' tables
        (ENOENT: none; EIO: two)."""
        names: set[bytes] = set()
        for source in self.sources():
            if not source.closed:
                names.update(_names_with_prefix(source.table, view_ino))
        if not names:
            raise FsError(errno.ENOENT)
        if len(names) > 1:
            self.ambiguous += 1
            log.error("object inode %d is shared by %d object names (%s): answered EIO",
                      view_ino, len(names), ", ".join(sorted(n.hex()[:16] for n in names)))
            raise FsError(errno.EIO)
        return names.pop()

    def _resolve(self, view_ino: int) -> tuple[ViewSource, int]:
        hit = self._resolved.get(view_ino)
        if hit is not None and not hit[0].closed:
            return hit
        found = self._find(self._name_of(view_ino))
        if found is None:
            raise FsError(errno.ENOENT)
        self._resolved[view_ino] = found
        return found

    def _attrs(self, ino: int, mode: int, size: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = mode
        a.st_nlink = 1 if stat.S_ISREG(mode) else 2
        a.st_uid = a.st_gid = 0
        a.st_size = size
        a.st_blksize = 4096
        a.st_blocks = (size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = 0
        return a

    def _object_attrs(self, view_ino: int) -> pyfuse3.EntryAttributes:
        source, ino = self._resolve(view_ino)
        return self._attrs(view_ino, stat.S_IFREG | 0o444, source.fs.manifest.inode(ino).size)

    @_timed
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        self.lookups += 1
        if parent_inode == ROOT:
            if len(name) == 2:
                try:
                    return self._attrs(2 + int(name, 16), stat.S_IFDIR | 0o555, 0)
                except ValueError:
                    pass
            return self._negative()
        if not 2 <= parent_inode < 2 + 256:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        try:
            raw = bytes.fromhex(name.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return self._negative()
        if len(raw) != 32 or int(name[:2], 16) != parent_inode - 2:
            return self._negative()
        if self._find(raw) is None:
            self.misses += 1
            return self._negative()
        view_ino = object_ino(raw)
        try:
            if self._name_of(view_ino) != raw:  # another name has this number too
                raise FsError(errno.EIO)
            return self._object_attrs(view_ino)
        except FsError as exc:
            if exc.errno == errno.EIO:
                raise pyfuse3.FUSEError(errno.EIO) from None
            return self._negative()

    @staticmethod
    def _negative() -> pyfuse3.EntryAttributes:
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0
        neg.entry_timeout = 0  # a mount registered later may bring the name
        return neg

    @_timed
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            return self._attrs(ROOT, stat.S_IFDIR | 0o555, 0)
        if 2 <= inode < 2 + 256:
            return self._attrs(inode, stat.S_IFDIR | 0o555, 0)
        try:
            return self._object_attrs(inode)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None

    # -- content ---------------------------------------------------------------------------

    @_timed
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode < FIRST_OBJECT_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if KERNEL_NO_OPEN:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no OPEN or RELEASE again; keep_cache
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.reads += 1
        try:
            source, ino = self._resolve(fh)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        started = time.perf_counter()
        try:
            source.served(ino)
            # a bytearray as is: pyfuse3 takes any buffer, a copy would cost every read
            return cast(bytes, await source.fs.read(ino, off, size))
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:  # noqa: BLE001 - anything else would take the view down
            self.io_errors += 1
            source.fs.metrics.io_errors += 1
            log.error("read of inode %d at %d (object inode %d) failed, returning EIO: %s",
                      ino, off, fh, exc, exc_info=not hasattr(exc, "exit_code"))
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            seconds = time.perf_counter() - started
            self.times.observe("read", seconds)
            source.times.observe("read", seconds)

    @_timed
    async def opendir(self, inode: int, ctx: Any) -> int:
        if KERNEL_NO_OPEN:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        return None  # never listed: names are looked up

    async def release(self, fh: int) -> None:
        return None

    async def releasedir(self, fh: int) -> None:
        return None

    async def flush(self, fh: int) -> None:
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_timed
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == ROOT and name == b"user.casfs.stats" and self.stats is not None:
            import json

            return json.dumps(self.stats()).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    @_timed
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Any) -> None:
        return None

    # Everything that would change an object is refused (the view is also mounted "ro").
    async def _rofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _rofs  # type: ignore[assignment]
    write = create = setxattr = removexattr = fsync = fsyncdir = _rofs  # type: ignore[assignment]
