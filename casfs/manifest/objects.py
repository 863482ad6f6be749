"""Content objects: a regular file's whole content as one object, named from the
manifest alone, for the kernel serving mode (overlayfs reads a file's data from the
object its EROFS inode redirects to).

A file of one chunk is that chunk: its object is the chunk's file in the node cache,
named by the chunk's digest. A file of several chunks gets an object named

    BLAKE3("casfs-object-1\\0" || for each chunk: digest (32 bytes) || length (u64 LE))

so the same content chunked the same way has the same name in every image. Objects live
at `/<first two hex digits>/<64 hex digits>` under each data layer (the cache's chunk
and object directories, and the FUSE view that serves the rest).

An ObjectTable maps object names back to inodes of one manifest (what the FUSE view
needs to serve a lookup): a sorted array of (name, inode) records, built once per node
with the image's EROFS and searched in place, like the manifest itself.

    table      n x 36 bytes: 32-byte object name, u32 inode (little-endian), sorted by name
"""

from __future__ import annotations

import stat
import struct
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import overload

import blake3

from casfs.errors import ManifestError
from casfs.manifest.layout import CHUNK, INODE
from casfs.manifest.reader import Manifest

OBJECT_DOMAIN = b"casfs-object-1\0"
RECORD = struct.Struct("<32sI")
_LENGTH = struct.Struct("<Q")


def object_name_of(chunks: Sequence[tuple[str, int, int]]) -> str:
    """The object name of a file made of these chunks (digest, offset, length)."""
    if len(chunks) == 1:
        return chunks[0][0]
    h = blake3.blake3(OBJECT_DOMAIN)
    for digest, _offset, length in chunks:
        h.update(bytes.fromhex(digest) + _LENGTH.pack(length))
    return h.hexdigest()


def object_path(name: str) -> bytes:
    """Where an object is in a data layer: b"/<hh>/<hex>"."""
    return f"/{name[:2]}/{name}".encode()


def object_names(manifest: Manifest) -> dict[int, bytes]:
    """inode -> object name (32 raw bytes) of every non-empty regular file, straight from
    the manifest's tables (no Python object per chunk)."""
    buf = manifest.buf
    inodes = bytes(buf[manifest._inodes : manifest._dirents])
    chunks = memoryview(bytes(buf[manifest._chunks : manifest._xattrs]))
    out: dict[int, bytes] = {}
    size = CHUNK.size
    for ino, rec in enumerate(INODE.iter_unpack(inodes), start=1):
        mode, _u, _g, _n, fsize, _t, _r, first, count = rec[:9]
        if not stat.S_ISREG(mode) or fsize == 0 or count == 0:
            continue
        if first + count > manifest.n_chunks:
            raise ManifestError(f"inode {ino}: chunks out of range")
        if count == 1:
            out[ino] = bytes(chunks[first * size : first * size + 32])
            continue
        h = blake3.blake3(OBJECT_DOMAIN)
        for i in range(first, first + count):
            digest, _offset, length, _r2 = CHUNK.unpack_from(chunks, i * size)
            h.update(digest + _LENGTH.pack(length))
        out[ino] = h.digest()
    return out


def multi_chunk_files(manifest: Manifest) -> list[int]:
    """The regular files of several chunks (the ones whose object must be made whole)."""
    inodes = bytes(manifest.buf[manifest._inodes : manifest._dirents])
    return [ino for ino, rec in enumerate(INODE.iter_unpack(inodes), start=1)
            if stat.S_ISREG(rec[0]) and rec[8] > 1]


def encode_table(names: dict[int, bytes]) -> bytes:
    """An object table: every (name, inode), sorted by name (an object several files
    share appears once, with the lowest inode: any of them has its content)."""
    best: dict[bytes, int] = {}
    for ino, name in names.items():
        if name not in best or ino < best[name]:
            best[name] = ino
    return b"".join(RECORD.pack(name, best[name]) for name in sorted(best))


class ObjectTable:
    """Object name -> inode of one manifest, searched in a buffer (bytes or mmap)."""

    def __init__(self, buf: bytes | memoryview) -> None:
        if len(buf) % RECORD.size:
            raise ManifestError("object table size is not a whole number of records")
        self.buf = buf
        self.size = self.count = len(buf) // RECORD.size  # records in the table
        self._names = _Names(buf, self.size)

    def lookup(self, name: bytes) -> int:
        """The inode whose content is object `name` (32 raw bytes), or 0."""
        i = bisect_left(self._names, name)
        if i < self.size and self._names[i] == name:
            return int(RECORD.unpack_from(self.buf, i * RECORD.size)[1])
        return 0

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        for i in range(self.size):
            name, ino = RECORD.unpack_from(self.buf, i * RECORD.size)
            yield bytes(name), int(ino)


class _Names(Sequence[bytes]):
    """The names of a table as a sequence, for bisect."""

    def __init__(self, buf: bytes | memoryview, size: int) -> None:
        self.buf = buf
        self.size = size

    def __len__(self) -> int:
        return self.size

    @overload
    def __getitem__(self, i: int) -> bytes: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...

    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.size))]
        start = i * RECORD.size
        return bytes(self.buf[start : start + 32])
