"""Read a manifest in place: every lookup is a few struct reads on a buffer (an mmap
of the manifest file), so opening a 100,000-entry manifest builds no Python object
per entry and costs a header check.

Untrusted input: every index read from the buffer is bounds-checked and a
violation raises ManifestError, never IndexError or a wrong answer.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from collections.abc import Iterator
from functools import cached_property
from typing import Any, NamedTuple

from casfs.errors import ManifestError
from casfs.manifest.layout import (
    CHUNK,
    DIRENT,
    HEADER,
    INODE,
    MAGIC,
    VERSION,
    XATTR,
    section_offsets,
)

ROOT_INO = 1
MAX_CHUNK = 64 << 20


class Inode(NamedTuple):
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    mtime_ns: int
    rdev: int
    first: int
    count: int  # type: ignore[assignment]  # the field shadows tuple.count(), on purpose
    xattr_first: int
    xattr_count: int
    parent: int
    reserved: int
    str_off: int


class ChunkRef(NamedTuple):
    digest: str
    offset: int
    length: int


class Manifest:
    """A manifest served from a buffer (bytes or mmap)."""

    def __init__(self, buf: bytes | mmap.mmap, digest: str = "") -> None:
        self.buf = buf
        self.digest = digest
        self._chunk_digests: frozenset[str] | None = None
        if len(buf) < HEADER.size:
            raise ManifestError("manifest is truncated (no header)")
        (magic, version, _flags, self.n_inodes, self.n_dirents, self.n_chunks, self.n_xattrs,
         self.strings_len, self.meta_len) = HEADER.unpack_from(buf, 0)
        if magic != MAGIC:
            raise ManifestError("not a casfs manifest (bad magic)")
        if version != VERSION:
            raise ManifestError(f"manifest format version {version} is not supported (need {VERSION})")
        (self._meta, self._inodes, self._dirents, self._chunks, self._xattrs,
         self._strings) = section_offsets(
            self.meta_len, self.n_inodes, self.n_dirents, self.n_chunks, self.n_xattrs
        )
        if self._strings + self.strings_len != len(buf):
            raise ManifestError(
                f"manifest size {len(buf)} disagrees with its header "
                f"({self._strings + self.strings_len})"
            )
        if self.n_inodes < 1:
            raise ManifestError("manifest has no root inode")
        if not stat.S_ISDIR(self.inode(ROOT_INO).mode):
            raise ManifestError("manifest root is not a directory")

    @classmethod
    def open(cls, path: str | os.PathLike[str], digest: str = "") -> Manifest:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ManifestError(f"manifest file {path} is empty")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return cls(buf, digest)

    @cached_property
    def meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(bytes(self.buf[self._meta : self._meta + self.meta_len]))
        except ValueError as exc:
            raise ManifestError(f"manifest metadata is not JSON: {exc}") from exc
        if not isinstance(meta, dict):
            raise ManifestError("manifest metadata is not a JSON object")
        return meta

    # -- records -------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= self.n_inodes:
            raise ManifestError(f"inode {ino} out of range")
        return Inode._make(INODE.unpack_from(self.buf, self._inodes + (ino - 1) * INODE.size))

    def _string(self, off: int, length: int) -> bytes:
        if off + length > self.strings_len:
            raise ManifestError("string reference out of range")
        start = self._strings + off
        return bytes(self.buf[start : start + length])

    def _dirent(self, index: int) -> tuple[bytes, int]:
        name_off, name_len, _r, ino = DIRENT.unpack_from(self.buf, self._dirents + index * DIRENT.size)
        return self._string(name_off, name_len), ino

    def _dir_range(self, node: Inode) -> tuple[int, int]:
        if not stat.S_ISDIR(node.mode):
            raise ManifestError("not a directory")
        if node.first + node.count > self.n_dirents:
            raise ManifestError("directory entries out of range")
        return node.first, node.count

    # -- queries -------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        """The inode of name in directory parent, or 0 when there is none."""
        first, count = self._dir_range(self.inode(parent))
        lo, hi = first, first + count
        while lo < hi:
            mid = (lo + hi) // 2
            mid_name, ino = self._dirent(mid)
            if mid_name == name:
                if not 1 <= ino <= self.n_inodes:
                    raise ManifestError(f"entry {name!r} points at inode {ino}, out of range")
                return ino
            if mid_name < name:
                lo = mid + 1
            else:
                hi = mid
        return 0

    def entries(self, ino: int, start: int = 0) -> Iterator[tuple[int, bytes, int]]:
        """(index, name, inode) of each entry of directory ino from index start."""
        first, count = self._dir_range(self.inode(ino))
        for i in range(max(start, 0), count):
            name, child = self._dirent(first + i)
            yield i, name, child

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode):
            raise ManifestError("not a symlink")
        return self._string(node.str_off, node.count)

    def chunks(self, ino: int) -> list[ChunkRef]:
        node = self.inode(ino)
        if not stat.S_ISREG(node.mode):
            return []
        return [self._chunk(i) for i in range(node.first, node.first + node.count)]

    def _chunk(self, index: int) -> ChunkRef:
        if not 0 <= index < self.n_chunks:
            raise ManifestError("chunk reference out of range")
        digest, offset, length, _r = CHUNK.unpack_from(self.buf, self._chunks + index * CHUNK.size)
        return ChunkRef(digest.hex(), offset, length)

    def chunks_for_range(self, ino: int, offset: int, size: int) -> list[ChunkRef]:
        """The chunks of file ino that overlap [offset, offset+size)."""
        node = self.inode(ino)
        end = min(offset + size, node.size)
        if offset >= end or node.count == 0:
            return []
        lo, hi = node.first, node.first + node.count
        while lo < hi:  # first chunk whose end is beyond offset
            mid = (lo + hi) // 2
            c = self._chunk(mid)
            if c.offset + c.length <= offset:
                lo = mid + 1
            else:
                hi = mid
        out = []
        i = lo
        while i < node.first + node.count:
            c = self._chunk(i)
            if c.offset >= end:
                break
            out.append(c)
            i += 1
        return out

    def chunk_digests(self) -> frozenset[str]:
        """Every chunk digest the manifest references, straight from its chunk table
        (built once: a mount's trace check, pack index filter and plan filter share it)."""
        if self._chunk_digests is None:
            table = bytes(self.buf[self._chunks : self._chunks + self.n_chunks * CHUNK.size])
            self._chunk_digests = frozenset(row[0].hex() for row in CHUNK.iter_unpack(table))
        return self._chunk_digests

    def xattrs(self, ino: int) -> dict[bytes, bytes]:
        node = self.inode(ino)
        if node.xattr_first + node.xattr_count > self.n_xattrs:
            raise ManifestError("xattr reference out of range")
        out = {}
        for i in range(node.xattr_first, node.xattr_first + node.xattr_count):
            name_off, name_len, _r, value_off, value_len = XATTR.unpack_from(
                self.buf, self._xattrs + i * XATTR.size
            )
            out[self._string(name_off, name_len)] = self._string(value_off, value_len)
        return out

    def validate(self) -> None:
        """Check the whole structure, raising ManifestError at the first fault.

        Costs a pass over every record (about a second per million entries), so
        the daemon runs it once per node, when the manifest enters the cache.
        After it: every range is in bounds, names are valid and strictly sorted
        (lookups binary-search them), chunks tile each file exactly, and no
        directory has two parents nor is the root anyone's child, so no
        directory cycle is reachable from the root.
        """
        inodes = list(INODE.iter_unpack(self.buf[self._inodes : self._dirents]))
        dirents = list(DIRENT.iter_unpack(self.buf[self._dirents : self._chunks]))
        chunks = list(CHUNK.iter_unpack(self.buf[self._chunks : self._xattrs]))
        known_types = {stat.S_IFDIR, stat.S_IFREG, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK,
                       stat.S_IFIFO, stat.S_IFSOCK}
        strings = self.strings_len
        buf, base = self.buf, self._strings
        has_parent = bytearray(self.n_inodes + 1)
        for ino, rec in enumerate(inodes, start=1):
            mode, _u, _g, _n, size, _t, _r, first, count, xf, xc, parent, _res, str_off = rec
            kind = stat.S_IFMT(mode)
            if kind not in known_types:
                raise ManifestError(f"inode {ino}: unknown file type {kind:o}")
            if not 1 <= parent <= self.n_inodes or xf + xc > self.n_xattrs:
                raise ManifestError(f"inode {ino}: parent or xattr range out of bounds")
            if kind == stat.S_IFDIR:
                if first + count > self.n_dirents:
                    raise ManifestError(f"inode {ino}: directory entries out of range")
                prev = None
                for i in range(first, first + count):
                    name_off, name_len, _r2, child = dirents[i]
                    if name_off + name_len > strings or not 1 <= child <= self.n_inodes:
                        raise ManifestError(f"inode {ino}: entry {i} out of range")
                    name = bytes(buf[base + name_off : base + name_off + name_len])
                    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
                        raise ManifestError(f"inode {ino}: invalid entry name {name!r}")
                    if prev is not None and name <= prev:
                        raise ManifestError(f"inode {ino}: entries not strictly sorted at {name!r}")
                    prev = name
                    if stat.S_ISDIR(inodes[child - 1][0]):
                        if child == 1 or has_parent[child]:
                            raise ManifestError(f"directory inode {child} has two parents (cycle)")
                        has_parent[child] = 1
            elif kind == stat.S_IFREG:
                if first + count > self.n_chunks:
                    raise ManifestError(f"inode {ino}: chunks out of range")
                pos = 0
                for i in range(first, first + count):
                    _d, offset, length, _r3 = chunks[i]
                    if offset != pos or length == 0 or length > MAX_CHUNK:
                        raise ManifestError(f"inode {ino}: chunks overlap, leave gaps or are too large")
                    pos += length
                if pos != size:
                    raise ManifestError(f"inode {ino}: size {size} disagrees with its chunks ({pos})")
            elif kind == stat.S_IFLNK and str_off + count > strings:
                raise ManifestError(f"inode {ino}: symlink target out of range")
        for name_off, name_len, _r4, value_off, value_len in XATTR.iter_unpack(
            self.buf[self._xattrs : self._strings]
        ):
            if name_off + name_len > strings or value_off + value_len > strings:
                raise ManifestError("xattr out of range")
        self.meta  # noqa: B018 - parses (and checks) the metadata JSON

    def resolve(self, path: str | bytes) -> int:
        """The inode of an absolute path (symlinks not followed), or 0."""
        if isinstance(path, str):
            path = os.fsencode(path)
        ino = ROOT_INO
        for part in path.split(b"/"):
            if not part or part == b".":
                continue
            if not stat.S_ISDIR(self.inode(ino).mode):
                return 0
            ino = self.lookup(ino, part)
            if not ino:
                return 0
        return ino

    def walk(self, ino: int = ROOT_INO, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(path, inode) of every entry under ino: a directory's entries, then its subdirectories."""
        stack = [(prefix, ino)]
        seen_dirs = {ino}
        if not prefix:
            yield b"/", ino
        while stack:
            path, d = stack.pop()
            children = list(self.entries(d))
            subdirs = []
            for _, name, child in children:
                child_path = path + b"/" + name
                yield child_path, child
                if stat.S_ISDIR(self.inode(child).mode):
                    if child in seen_dirs:
                        raise ManifestError(f"directory cycle at {child_path!r}")
                    seen_dirs.add(child)
                    subdirs.append((child_path, child))
            stack.extend(reversed(subdirs))
