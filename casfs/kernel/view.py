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
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import Any, Protocol

import pyfuse3

from casfs.errors import FsError
from casfs.manifest.objects import ObjectTable
from casfs.vfs import ImageFS

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
FIRST_OBJECT_INO = 1024  # below: the root and the 256 prefix directories
CACHE_TIMEOUT = 86400.0 * 365
KERNEL_NO_OPEN = bool(getattr(pyfuse3, "INODE_FH_WITHOUT_OPEN", False))


class ViewSource(Protocol):
    """A mount the view serves objects of."""

    table: ObjectTable
    fs: ImageFS
    closed: bool

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
        self._by_name: dict[bytes, int] = {}
        self._names: dict[int, bytes] = {}
        self._resolved: dict[int, tuple[ViewSource, int]] = {}
        self.lookups = 0
        self.reads = 0
        self.misses = 0  # lookups of names no mount has
        self.io_errors = 0

    # -- names -----------------------------------------------------------------------------

    def _find(self, name: bytes) -> tuple[ViewSource, int] | None:
        for source in self.sources():
            if source.closed:
                continue
            ino = source.table.lookup(name)
            if ino:
                return source, ino
        return None

    def _resolve(self, view_ino: int) -> tuple[ViewSource, int]:
        hit = self._resolved.get(view_ino)
        if hit is not None and not hit[0].closed:
            return hit
        name = self._names.get(view_ino)
        found = self._find(name) if name is not None else None
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
        view_ino = self._by_name.get(raw)
        if view_ino is None:
            if self._find(raw) is None:
                self.misses += 1
                return self._negative()
            view_ino = self._by_name[raw] = FIRST_OBJECT_INO + len(self._by_name)
            self._names[view_ino] = raw
        try:
            return self._object_attrs(view_ino)
        except FsError:
            return self._negative()

    @staticmethod
    def _negative() -> pyfuse3.EntryAttributes:
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0
        neg.entry_timeout = 0  # a mount registered later may bring the name
        return neg

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

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if inode < FIRST_OBJECT_INO:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if KERNEL_NO_OPEN:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no OPEN or RELEASE again; keep_cache
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    async def read(self, fh: int, off: int, size: int) -> bytes | bytearray:
        self.reads += 1
        try:
            source, ino = self._resolve(fh)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        try:
            source.served(ino)
            return await source.fs.read(ino, off, size)
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:  # noqa: BLE001 - anything else would take the view down
            self.io_errors += 1
            source.fs.metrics.io_errors += 1
            log.error("read of inode %d at %d (object inode %d) failed, returning EIO: %s",
                      ino, off, fh, exc, exc_info=not hasattr(exc, "exit_code"))
            raise pyfuse3.FUSEError(errno.EIO) from None

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

    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        if inode == ROOT and name == b"user.casfs.stats" and self.stats is not None:
            import json

            return json.dumps(self.stats()).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return []

    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Any) -> None:
        return None

    async def _rofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _rofs
    write = create = setxattr = removexattr = fsync = fsyncdir = _rofs
