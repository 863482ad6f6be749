"""The Linux system calls kernel serving needs and Python's os module lacks: mount(2)
and umount2(2) (an EROFS image mounted straight from its file, an overlayfs mount),
and fanotify (which files a container opens on a mount the kernel serves alone).
Thin ctypes wrappers: each raises OSError with the errno, nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct
from collections.abc import Iterator

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int,
                                ctypes.c_char_p]

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_MARK_ADD = 0x1
FAN_MARK_MOUNT = 0x10
FAN_MARK_FILESYSTEM = 0x100
FAN_OPEN = 0x20
FAN_OPEN_EXEC = 0x1000
FAN_ONDIR = 0x40000000
FAN_Q_OVERFLOW = 0x4000
AT_FDCWD = -100
# struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid
EVENT = struct.Struct("=IBBHQii")


def _check(result: int, what: str, path: str | bytes = "") -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", os.fsdecode(path) if path else None)
    return result


def mount(source: str | bytes, target: str | bytes, fstype: str, flags: int = 0,
          data: str = "") -> None:
    _check(_libc.mount(os.fsencode(source), os.fsencode(target), fstype.encode(), flags,
                       data.encode()), f"mount {fstype}", target)


def umount(target: str | bytes, flags: int = 0) -> None:
    _check(_libc.umount2(os.fsencode(target), flags), "umount", target)


def fanotify_open_watch(path: str | bytes, *, directories: bool = True) -> int:
    """A fanotify descriptor reporting every open (and exec) of a file (and directory,
    when asked) of the filesystem mounted at `path`, through whatever mount: a filesystem
    mark, not a mount mark, because a container's root is an overlay stacked on the
    image's mount, and the kernel opens the image's files for it internally (a mount mark
    on the image's mount sees none of those opens; a filesystem mark on its superblock
    sees them all). Needs CAP_SYS_ADMIN. Blocking reads."""
    fd = _check(_libc.fanotify_init(FAN_CLASS_NOTIF | FAN_CLOEXEC,
                                    os.O_RDONLY | os.O_LARGEFILE | os.O_CLOEXEC),
                "fanotify_init")
    mask = FAN_OPEN | FAN_OPEN_EXEC | (FAN_ONDIR if directories else 0)
    try:
        _check(_libc.fanotify_mark(fd, FAN_MARK_ADD | FAN_MARK_FILESYSTEM, mask, AT_FDCWD,
                                   os.fsencode(path)), "fanotify_mark", path)
    except OSError:
        os.close(fd)
        raise
    return fd


def fanotify_events(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(mask, fd, pid) of each event in what a read of a fanotify descriptor gave. The
    caller owns (and must close) each fd >= 0."""
    off = 0
    while off + EVENT.size <= len(data):
        event_len, _vers, _res, _mlen, mask, fd, pid = EVENT.unpack_from(data, off)
        if event_len < EVENT.size:
            break
        yield mask, fd, pid
        off += event_len
