"""The FUSE adapter: pyfuse3 Operations over an ImageFS. The only module that
imports pyfuse3's request API.

It converts between the model and the protocol and nothing else, and it is the
one place where errors become errnos: FsError carries its own, and every other
exception (a failed fetch, a malformed manifest, a bug) is logged with the inode
and becomes EIO, because anything but FUSEError escaping a handler would take
the mount down. Content is immutable, so entries, attributes and negative
lookups are cached by the kernel for a long time and files keep their page cache.

With pyfuse3 carrying casfs's inode-fh patch (third_party/pyfuse3), the first OPEN and
the first OPENDIR are answered ENOSYS: the kernel then stops sending OPEN, OPENDIR and
their RELEASEs for the rest of the mount, keeps every file's page cache and keeps every
directory's listing in its own cache (FOPEN_CACHE_DIR), so a repeated listing never
reaches the daemon. READ and READDIR then name the inode instead of a file handle,
which is the same number here.

Every request a handler answers is timed per operation (`times`, casfs.nodemetrics):
the node agent exports them as latency histograms.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import pyfuse3

from casfs.manifest.reader import Inode
from casfs.nodemetrics import OpTimes
from casfs.vfs import FsError, ImageFS

log = logging.getLogger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
CACHE_TIMEOUT = 86400.0 * 365  # immutable content: effectively forever
BLOCK = 4096
# pyfuse3 passes the inode as fh when the kernel sends none (third_party/pyfuse3)
KERNEL_NO_OPEN = bool(getattr(pyfuse3, "INODE_FH_WITHOUT_OPEN", False))


def _errors(
    fn: Callable[Concatenate[CasfsOperations, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[CasfsOperations, P], Coroutine[Any, Any, T]]:
    name = fn.__name__
    clock = time.perf_counter

    @functools.wraps(fn)
    async def wrapper(self: CasfsOperations, *args: P.args, **kwargs: P.kwargs) -> T:
        started = clock()
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except FsError as exc:
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception as exc:
            self.fs.metrics.io_errors += 1
            log.error("%s%r failed, returning EIO: %s", name, args[:2], exc,
                      exc_info=not hasattr(exc, "exit_code"))
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            self.times.observe(name, clock() - started)

    return wrapper


class CasfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: ImageFS, no_open: bool = KERNEL_NO_OPEN) -> None:
        super().__init__()
        self.fs = fs
        self.no_open = no_open
        self.times = OpTimes()  # per-operation latency (node metrics)

    def _attrs(self, ino: int, node: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = CACHE_TIMEOUT
        a.attr_timeout = CACHE_TIMEOUT
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = node.rdev
        a.st_size = node.size
        a.st_blksize = BLOCK
        a.st_blocks = (node.size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = node.mtime_ns
        return a

    @_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        ino = self.fs.lookup(parent_inode, name)
        if not ino:
            neg = pyfuse3.EntryAttributes()
            neg.st_ino = 0
            neg.entry_timeout = CACHE_TIMEOUT
            return neg
        # the entry's attributes are part of the LOOKUP reply, not a GETATTR request
        return self._attrs(ino, self.fs.manifest.inode(ino))

    @_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._attrs(inode, self.fs.getattr(inode))

    @_errors
    async def readlink(self, inode: int, ctx: Any) -> bytes:
        return self.fs.readlink(inode)

    @_errors
    async def opendir(self, inode: int, ctx: Any) -> int:
        if not stat.S_ISDIR(self.fs.manifest.inode(inode).mode):
            raise FsError(errno.ENOTDIR)
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no OPENDIR again; listings cached
        return inode

    @_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # readdirplus: each entry carries its attributes (from the model, not counted as
        # GETATTR requests), so an `ls -l` or a path finder's scan needs no lookups after.
        for index, name, child, node in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._attrs(child, node), index + 1):
                break

    async def releasedir(self, fh: int) -> None:
        return None

    @_errors
    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        self.fs.open(inode)
        if self.no_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # no OPEN or RELEASE again; keep_cache
        return pyfuse3.FileInfo(fh=inode, keep_cache=True, direct_io=False)

    @_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # A bytearray as is (pyfuse3 takes any buffer; copying it would cost the hot path)
        return cast(bytes, await self.fs.read(fh, off, size))

    async def release(self, fh: int) -> None:
        return None

    async def flush(self, fh: int) -> None:
        # Nothing is ever written, so there is nothing to flush: ENOSYS tells the kernel
        # so once, and it stops sending a FLUSH (a synchronous round trip) on every
        # close() of every file.
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_errors
    async def access(self, inode: int, mode: int, ctx: Any) -> bool:
        if mode & os.W_OK:
            raise FsError(errno.EROFS)
        return True

    @_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any) -> bytes:
        return self.fs.getxattr(inode, name)

    @_errors
    async def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self.fs.listxattr(inode)

    @_errors
    async def statfs(self, ctx: Any) -> pyfuse3.StatvfsData:
        total, inodes = self.fs.statfs_counts()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = BLOCK
        s.f_blocks = (total + BLOCK - 1) // BLOCK
        s.f_bfree = s.f_bavail = 0
        s.f_files = inodes
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    async def forget(self, inode_list: Any) -> None:
        return None

    # Everything that would change the image is refused. The mount is also made
    # read-only ("ro"), so the kernel answers most of these itself; one that reaches casfs
    # gets EROFS too, whatever its arguments (hence the one signature for all).
    async def _rofs(self, *args: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _rofs  # type: ignore[assignment]
    write = create = setxattr = removexattr = fsync = fsyncdir = _rofs  # type: ignore[assignment]
