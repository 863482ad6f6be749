"""The in-memory tree the indexer builds and the manifest writer serialises.

A Node is one inode: hardlinked names are the same Node object in several
directories. Directories hold their children by name (bytes, no '/' or NUL).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Chunk:
    digest: str  # hex BLAKE3-256 of the uncompressed bytes
    offset: int
    length: int


@dataclass(eq=False)
class Node:
    mode: int  # full st_mode, file type included
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[Chunk] = field(default_factory=list)
    children: dict[bytes, Node] | None = None  # directories only

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @classmethod
    def directory(cls, perm: int = 0o755, **kw: Any) -> Node:
        return cls(mode=stat.S_IFDIR | perm, children={}, **kw)


def walk(root: Node, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """Every (path, node) under root, depth-first, in name order; the root is b"/"."""
    yield (prefix or b"/"), root
    assert root.children is not None
    for name in sorted(root.children):
        child = root.children[name]
        path = prefix + b"/" + name
        if child.is_dir:
            yield from walk(child, path)
        else:
            yield path, child
