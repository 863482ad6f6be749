"""Plain directories as images (`casfs index tree:<path>`): model weights, tokenizer files,
data sets, anything that is a directory and not an OCI image.

A tree is read the way indexer.layer reads a layer's tar stream, into the same list of
operations (indexer.layerrecord), so everything after that is shared with images:
chunking, the uploader (hash, skip what the store has, compress, upload), directory
packs, the tree builder and the manifest writer. What the walk keeps:

* every entry's type, permission bits (setuid/setgid/sticky included), owner, group,
  modification time (nanoseconds) and extended attributes (but `security.selinux`, the
  label of the machine that indexed it, not of the content);
* hardlinks: names of one inode (same device and inode number, `st_nlink` > 1) become
  one node, as in a tar layer;
* symlinks as links: their target text, never followed, wherever it points (inside,
  outside, nowhere). Only the root path given on the command line is resolved;
* devices and FIFOs as nodes (never opened); sockets are left out (as tar does), logged.

Entries are visited in name order (bytes), parents before children, so the same tree
gives the same operations and thus the same manifest wherever it lies: the manifest's
metadata names no path. A file is opened without following a symlink and must still
be the inode the walk saw; its size and time must not change while it is read (a file
being written is refused: its content would be a mix of two versions).

Re-indexing a tree reads and hashes every file again (there is no tar digest to name
it by), but uploads only chunks the store lacks: a changed file costs its changed
chunks, plus the directory pack that holds it when it is small.
"""

from __future__ import annotations

import base64
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from casfs.errors import ImageError
from indexer.chunking import chunk_size_for
from indexer.dirpack import DirPacker
from indexer.imageref import ImageRef
from indexer.upload import Aborted, BlobUploader

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/vnd.casfs.tree.v1"
"""The media type a tree's one pseudo-layer carries in its manifest's metadata."""
SKIPPED_XATTRS = frozenset({b"security.selinux"})
MAX_ENTRIES = 10_000_000
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class TreeSource:
    """A directory to index: its absolute path (the root given, symlinks resolved)."""

    path: Path

    @property
    def ref(self) -> str:
        return f"tree:{self.path}"


def open_tree(ref: ImageRef) -> TreeSource:
    """The directory a `tree:<path>` reference names; ImageError when it is none."""
    try:
        path = Path(ref.location).resolve(strict=True)
    except FileNotFoundError:
        raise ImageError(f"tree {ref.location!r} does not exist") from None
    except OSError as exc:
        raise ImageError(f"cannot read tree {ref.location!r}: {exc.strerror}") from exc
    if not path.is_dir():
        raise ImageError(f"tree {ref.location!r} is not a directory")
    return TreeSource(path)


def _xattrs(path: bytes, what: str) -> dict[str, str]:
    """An entry's extended attributes as {name: base64 value} (the layer op's form)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise ImageError(f"{what}: cannot list the xattrs of {os.fsdecode(path)!r}: "
                         f"{exc.strerror}") from exc
    out: dict[str, str] = {}
    for name in names:
        raw_name = os.fsencode(name)
        if raw_name in SKIPPED_XATTRS:
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENODATA:  # removed meanwhile
                continue
            raise ImageError(f"{what}: cannot read xattr {name} of {os.fsdecode(path)!r}: "
                             f"{exc.strerror}") from exc
        out[name] = base64.b64encode(value).decode()
    return dict(sorted(out.items()))


def _meta_op(rel: str, st: os.stat_result, xattrs: dict[str, str]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "op": "add",
        "path": rel,
        "type": stat.S_IFMT(st.st_mode),
        "perm": st.st_mode & 0o7777,
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
    }
    if xattrs:
        op["xattrs"] = xattrs
    return op


class TreeReader:
    """Walks one directory into layer operations, each regular file's chunks handed to
    the uploader (and its small files to the packer) as it is read."""

    def __init__(self, source: TreeSource, uploader: BlobUploader, *,
                 packer: DirPacker | None = None,
                 on_bytes: Callable[[int], None] = lambda n: None,
                 abort: threading.Event | None = None) -> None:
        self.root = os.fsencode(source.path)
        self.what = source.ref
        self.uploader = uploader
        self.packer = packer
        self.on_bytes = on_bytes
        self.abort = abort or threading.Event()
        self.files = 0
        self.bytes = 0
        self.skipped: list[str] = []  # sockets left out

    def read(self) -> list[dict[str, Any]]:
        """The tree's operations (chunk lists hold futures until resolve_chunks)."""
        try:
            root_st = os.stat(self.root)
        except OSError as exc:
            raise ImageError(f"{self.what}: {exc.strerror}") from exc
        ops = [_meta_op("", root_st, _xattrs(self.root, self.what))]
        first_names: dict[tuple[int, int], str] = {}  # (dev, ino) -> first path
        stack: list[tuple[bytes, str]] = [(self.root, "")]
        while stack:
            full_dir, rel_dir = stack.pop()
            subdirs = []
            for name, full, st in self._entries(full_dir):
                if len(ops) >= MAX_ENTRIES:
                    raise ImageError(f"{self.what}: more than {MAX_ENTRIES} entries")
                rel = f"{rel_dir}/{os.fsdecode(name)}" if rel_dir else os.fsdecode(name)
                kind = stat.S_IFMT(st.st_mode)
                if kind == stat.S_IFSOCK:
                    self.skipped.append(rel)
                    log.warning("%s: %s is a socket; left out", self.what, rel)
                    continue
                if kind != stat.S_IFDIR and st.st_nlink > 1:
                    first = first_names.setdefault((st.st_dev, st.st_ino), rel)
                    if first != rel:
                        ops.append({"op": "link", "path": rel, "target": first})
                        continue
                op = _meta_op(rel, st, _xattrs(full, self.what))
                if kind == stat.S_IFREG:
                    self._read_file(full, rel, st, op)
                elif kind == stat.S_IFLNK:
                    try:
                        op["target"] = os.fsdecode(os.readlink(full))
                    except OSError as exc:
                        raise ImageError(f"{self.what}: cannot read symlink {rel!r}: "
                                         f"{exc.strerror}") from exc
                elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                    op["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
                elif kind == stat.S_IFDIR:
                    subdirs.append((full, rel))
                elif kind != stat.S_IFIFO:
                    raise ImageError(f"{self.what}: {rel!r} has an unsupported file type "
                                     f"{kind:o}")
                ops.append(op)
            # Depth first, in name order: the stack pops the first subdirectory next.
            stack.extend(reversed(subdirs))
        return ops

    def _entries(self, directory: bytes) -> list[tuple[bytes, bytes, os.stat_result]]:
        """(name, path, lstat) of a directory's entries, sorted by name bytes."""
        if self.abort.is_set():
            raise Aborted()
        try:
            with os.scandir(directory) as it:
                found = [(e.name, e.path, e.stat(follow_symlinks=False)) for e in it]
        except FileNotFoundError:
            raise ImageError(f"{self.what}: {os.fsdecode(directory)!r} disappeared while "
                             "it was indexed") from None
        except OSError as exc:
            raise ImageError(f"{self.what}: cannot list {os.fsdecode(directory)!r}: "
                             f"{exc.strerror}") from exc
        found.sort(key=lambda e: e[0])
        return found

    def _read_file(self, full: bytes, rel: str, st: os.stat_result,
                   op: dict[str, Any]) -> None:
        """Read a regular file in chunks to the uploader; op gets its size and chunks."""
        try:
            fd = os.open(full, _OPEN_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ImageError(f"{self.what}: {rel!r} was replaced by a symlink while "
                                 "it was indexed") from exc
            raise ImageError(f"{self.what}: cannot open {rel!r}: {exc.strerror}") from exc
        try:
            before = os.fstat(fd)
            if (before.st_dev, before.st_ino) != (st.st_dev, st.st_ino) or \
                    not stat.S_ISREG(before.st_mode):
                raise ImageError(f"{self.what}: {rel!r} was replaced while it was indexed")
            os.set_blocking(fd, True)
            size = before.st_size
            if size >= 1 << 20:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            on_stored = None
            if self.packer is not None and self.packer.wants(size):
                packer = self.packer

                def on_stored(digest: str, stored: bytes) -> None:
                    packer.add(rel, digest, stored)

            chunks: list[tuple[Future[str], int]] = []
            chunk_size = chunk_size_for(size, rel)
            offset = 0
            while offset < size:
                if self.abort.is_set():
                    raise Aborted()
                want = min(chunk_size, size - offset)
                data = _read_exactly(fd, want)
                if len(data) != want:
                    raise ImageError(f"{self.what}: {rel!r} shrank while it was indexed")
                chunks.append((self.uploader.submit(data, on_stored), want))
                offset += want
                self.on_bytes(want)
            after = os.fstat(fd)
            if after.st_size != size or after.st_mtime_ns != before.st_mtime_ns or \
                    os.read(fd, 1):
                raise ImageError(f"{self.what}: {rel!r} changed while it was indexed")
        except OSError as exc:
            raise ImageError(f"{self.what}: cannot read {rel!r}: {exc.strerror}") from exc
        finally:
            os.close(fd)
        # The times and size of the content read, which the lstat may predate.
        op["size"] = size
        op["mtime_ns"] = before.st_mtime_ns
        op["perm"] = before.st_mode & 0o7777
        op["uid"], op["gid"] = before.st_uid, before.st_gid
        op["chunks"] = chunks
        self.files += 1
        self.bytes += size


def _read_exactly(fd: int, n: int) -> bytes:
    """n bytes from fd (fewer only at its end)."""
    data = os.read(fd, n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = os.read(fd, n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
