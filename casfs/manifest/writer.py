"""Serialise a tree (casfs.manifest.tree) into the binary manifest layout.

Deterministic: inode numbers are assigned breadth-first in name order, strings
are interned in first-use order and the meta JSON has sorted keys, so the same
tree always gives the same bytes and so the same digest.
"""

from __future__ import annotations

import json
import stat
import struct
from collections import deque
from typing import Any

from casfs.digest import is_digest
from casfs.errors import ManifestError
from casfs.manifest.layout import (
    CHUNK,
    DIRENT,
    HEADER,
    HEADER_SIZE,
    INODE,
    MAGIC,
    MAX_NAME,
    MAX_XATTR_VALUE,
    VERSION,
    XATTR,
)
from casfs.manifest.tree import Node


class _Strings:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.index: dict[bytes, int] = {}

    def add(self, s: bytes) -> int:
        off = self.index.get(s)
        if off is None:
            off = self.index[s] = len(self.buf)
            self.buf += s
        return off


def _check_name(name: bytes) -> None:
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name or len(name) > MAX_NAME:
        raise ManifestError(f"invalid entry name {name!r}")


def build_manifest(root: Node, meta: dict[str, Any]) -> bytes:
    """The manifest bytes for the tree under root."""
    if not root.is_dir:
        raise ManifestError("the root of a manifest must be a directory")
    # Breadth-first inode numbering: a directory's children get consecutive numbers.
    ino_of: dict[int, int] = {id(root): 1}
    order: list[Node] = [root]
    parent_of: list[int] = [1]
    names_to: dict[int, int] = {}  # id(node) -> number of names (hardlinks)
    queue: deque[Node] = deque([root])
    dir_children: list[list[tuple[bytes, Node]]] = []
    while queue:
        d = queue.popleft()
        assert d.children is not None
        kids = sorted(d.children.items())
        dir_children.append(kids)
        for name, child in kids:
            _check_name(name)
            names_to[id(child)] = names_to.get(id(child), 0) + 1
            if id(child) in ino_of:
                if child.is_dir:
                    raise ManifestError(f"directory {name!r} appears twice (hardlinked directory)")
                continue
            ino_of[id(child)] = len(order) + 1
            order.append(child)
            parent_of.append(ino_of[id(d)])
            if child.is_dir:
                queue.append(child)

    strings = _Strings()
    dirents = bytearray()
    chunks = bytearray()
    xattrs = bytearray()
    inodes = bytearray()
    n_dirents = n_chunks = n_xattrs = 0
    dir_iter = iter(dir_children)
    for ino, node in enumerate(order, start=1):
        first = count = str_off = 0
        if node.is_dir:
            kids = next(dir_iter)
            first, count = n_dirents, len(kids)
            for name, child in kids:
                dirents += DIRENT.pack(strings.add(name), len(name), 0, ino_of[id(child)])
            n_dirents += len(kids)
            nlink = 2 + sum(1 for _, c in kids if c.is_dir)
        else:
            nlink = names_to.get(id(node), 1)
        if stat.S_ISREG(node.mode):
            first, count = n_chunks, len(node.chunks)
            pos = 0
            for c in node.chunks:
                if c.offset != pos or not 0 < c.length < 1 << 32:
                    raise ManifestError(f"inode {ino}: chunks must tile the file")
                if not is_digest(c.digest):
                    raise ManifestError(f"inode {ino}: chunk digest {c.digest!r} is not BLAKE3 hex")
                chunks += CHUNK.pack(bytes.fromhex(c.digest), c.offset, c.length, 0)
                pos += c.length
            if pos != node.size:
                raise ManifestError(f"inode {ino}: chunks cover {pos} bytes of {node.size}")
            n_chunks += len(node.chunks)
        elif stat.S_ISLNK(node.mode):
            str_off, count = strings.add(node.target), len(node.target)
            node.size = len(node.target)
        xattr_first = n_xattrs
        for name, value in sorted(node.xattrs.items()):
            if len(value) > MAX_XATTR_VALUE or len(name) > MAX_NAME:
                raise ManifestError(f"inode {ino}: xattr {name!r} too large")
            xattrs += XATTR.pack(strings.add(name), len(name), 0, strings.add(value), len(value))
        n_xattrs += len(node.xattrs)
        try:
            packed = INODE.pack(
                    node.mode,
                node.uid,
                node.gid,
                nlink,
                node.size if not node.is_dir else 0,
                node.mtime_ns,
                node.rdev,
                first,
                count,
                xattr_first,
                len(node.xattrs),
                parent_of[ino - 1],
                0,
                str_off,
            )
        except struct.error:
            raise ManifestError(
                f"inode {ino}: a field is out of range (mode {node.mode:#o}, uid {node.uid}, "
                f"gid {node.gid}, mtime_ns {node.mtime_ns}, rdev {node.rdev}, size {node.size})"
            ) from None
        inodes += packed
    if len(strings.buf) >= 1 << 32:
        raise ManifestError("manifest string table exceeds 4 GiB")
    meta_bytes = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    header = HEADER.pack(
        MAGIC,
        VERSION,
        0,
        len(order),
        n_dirents,
        n_chunks,
        n_xattrs,
        len(strings.buf),
        len(meta_bytes),
    ).ljust(HEADER_SIZE, b"\0")
    return b"".join([header, meta_bytes, inodes, dirents, chunks, xattrs, bytes(strings.buf)])
