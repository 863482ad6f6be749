"""The manifest's binary layout (format version 1), shared by the writer and the reader.

All integers little-endian. A manifest is one byte string:

    header      64 bytes (HEADER)
    meta        meta_len bytes of UTF-8 JSON (image config digest, layers, chunk size)
    inodes      n_inodes  x INODE   (inode number = index + 1; the root is 1)
    dirents     n_dirents x DIRENT  (each directory's entries contiguous, sorted by name bytes)
    chunks      n_chunks  x CHUNK   (each file's chunks contiguous, by offset)
    xattrs      n_xattrs  x XATTR   (each inode's xattrs contiguous, sorted by name)
    strings     strings_len bytes   (names, symlink targets, xattr names and values)

Sections follow each other with no padding. Inode `first`/`count` mean: for a
directory, its range in the dirent table; for a regular file, its range in the
chunk table; for a symlink, `first` is unused and the target is at
str_off/count in the string table. docs/format.md is the full specification.
"""

from __future__ import annotations

import struct

MAGIC = b"CASFSMF\x00"
VERSION = 1

# magic, version, flags, n_inodes, n_dirents, n_chunks, n_xattrs, strings_len, meta_len
HEADER = struct.Struct("<8sIIIIIIQI")
HEADER_SIZE = 64

# mode, uid, gid, nlink, size, mtime_ns, rdev, first, count, xattr_first, xattr_count,
# parent, reserved, str_off
INODE = struct.Struct("<IIIIQqQIIIIIIQ")
# name_off, name_len, reserved, ino
DIRENT = struct.Struct("<IHHI")
# digest, offset, length, reserved
CHUNK = struct.Struct("<32sQII")
# name_off, name_len, reserved, value_off, value_len
XATTR = struct.Struct("<IHHII")

MAX_NAME = 255
MAX_XATTR_VALUE = 64 * 1024


def section_offsets(
    meta_len: int, n_inodes: int, n_dirents: int, n_chunks: int, n_xattrs: int
) -> tuple[int, int, int, int, int, int]:
    """Offsets of meta, inodes, dirents, chunks, xattrs and strings."""
    meta = HEADER_SIZE
    inodes = meta + meta_len
    dirents = inodes + n_inodes * INODE.size
    chunks = dirents + n_dirents * DIRENT.size
    xattrs = chunks + n_chunks * CHUNK.size
    strings = xattrs + n_xattrs * XATTR.size
    return meta, inodes, dirents, chunks, xattrs, strings
