"""Fold layer records into one tree, as the OCI image spec's layer rules say.

Per layer: first its whiteouts and opaque markers remove names from the layers
below (they never hide entries of their own layer), then its entries are added
in tar order: a directory entry over an existing directory changes only its
metadata; any other entry replaces what was there (a directory by a file and
the reverse). A hardlink names the node its target names at that point, so
later replacement of one name leaves the other alone, as on overlayfs.

A symlink met on the way to an entry (its parent path, a whiteout's directory, a
hardlink target's parents) is followed, clamped to the image root, the way
umoci, Docker and containerd extract layers: `lib/x` over `lib -> usr/lib` lands
in `usr/lib/x`. An entry whose parent path runs into a file, or a symlink loop,
is refused.
"""

from __future__ import annotations

import base64
import os
import stat
from typing import Any

from casfs.errors import HostileLayer
from casfs.manifest.tree import Chunk, Node

IMPLICIT_DIR_PERM = 0o755
MAX_SYMLINKS = 40  # as the kernel's ELOOP limit


def _split(path: str) -> list[bytes]:
    return [os.fsencode(p) for p in path.split("/") if p]


class TreeBuilder:
    def __init__(self) -> None:
        self.root = Node.directory()

    def _resolve_dir(self, parts: list[bytes], path: str, what: str, create: bool) -> Node | None:
        """The directory that parts name, following symlinks on the way inside the image
        root (a ".." or an absolute target never leaves it), as umoci, Docker and
        containerd resolve an entry's parent. Missing directories are created when asked
        (else None); a non-directory on the way is an error when creating (else None)."""
        stack = [self.root]
        todo = list(reversed(parts))
        links = 0
        while todo:
            name = todo.pop()
            if name in (b"", b"."):
                continue
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            cur = stack[-1]
            assert cur.children is not None
            child = cur.children.get(name)
            if child is None:
                if not create:
                    return None
                child = cur.children[name] = Node.directory(IMPLICIT_DIR_PERM)
            elif stat.S_ISLNK(child.mode):
                links += 1
                if links > MAX_SYMLINKS:
                    raise HostileLayer(f"{what}: too many levels of symbolic links in {path!r}")
                if child.target.startswith(b"/"):
                    del stack[1:]
                todo.extend(reversed(child.target.split(b"/")))
                continue
            elif not child.is_dir:
                if not create:
                    return None
                raise HostileLayer(
                    f"{what}: entry {path!r}: {os.fsdecode(name)!r} on its path is not a directory"
                )
            stack.append(child)
        return stack[-1]

    def _lookup(self, path: str, what: str) -> Node | None:
        """The node a path names; symlinks are followed in its parents, not at its end."""
        parts = _split(path)
        if not parts:
            return self.root
        parent = self._resolve_dir(parts[:-1], path, what, create=False)
        if parent is None or parent.children is None:
            return None
        return parent.children.get(parts[-1])

    def apply_layer(self, ops: list[dict[str, Any]], what: str) -> None:
        for op in ops:
            kind = op["op"]
            if kind == "whiteout":
                parts = _split(op["path"])
                parent = (self._resolve_dir(parts[:-1], op["path"], what, create=False)
                          if parts else None)
                if parent is not None and parent.children is not None:
                    parent.children.pop(parts[-1], None)
            elif kind == "opaque":
                node = self._resolve_dir(_split(op["path"]), op["path"], what, create=False)
                if node is not None and node.children is not None:
                    node.children.clear()
        for op in ops:
            kind = op["op"]
            if kind == "add":
                self._add(op, what)
            elif kind == "link":
                self._link(op, what)

    def _add(self, op: dict[str, Any], what: str) -> None:
        kind = op["type"]
        mode = kind | op["perm"]
        xattrs = {
            os.fsencode(k): base64.b64decode(v) for k, v in (op.get("xattrs") or {}).items()
        }
        parts = _split(op["path"])
        if not parts:  # the root directory re-specified
            self._set_meta(self.root, op, mode, xattrs)
            return
        parent = self._resolve_dir(parts[:-1], op["path"], what, create=True)
        assert parent is not None and parent.children is not None
        name = parts[-1]
        existing = parent.children.get(name)
        if kind == stat.S_IFDIR and existing is not None and existing.is_dir:
            self._set_meta(existing, op, mode, xattrs)
            return
        node = Node(mode=mode, uid=op["uid"], gid=op["gid"], mtime_ns=op["mtime_ns"], xattrs=xattrs)
        if kind == stat.S_IFDIR:
            node.children = {}
        elif kind == stat.S_IFREG:
            node.size = op["size"]
            pos = 0
            for digest, length in op["chunks"]:
                node.chunks.append(Chunk(digest, pos, length))
                pos += length
        elif kind == stat.S_IFLNK:
            node.target = os.fsencode(op["target"])
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = os.makedev(*op["rdev"])
        parent.children[name] = node

    @staticmethod
    def _set_meta(node: Node, op: dict[str, Any], mode: int, xattrs: dict[bytes, bytes]) -> None:
        node.mode, node.uid, node.gid = mode, op["uid"], op["gid"]
        node.mtime_ns = op["mtime_ns"]
        node.xattrs = xattrs

    def _link(self, op: dict[str, Any], what: str) -> None:
        target = self._lookup(op["target"], what)
        if target is None:
            raise HostileLayer(f"{what}: hardlink {op['path']!r} to missing name {op['target']!r}")
        if target.is_dir:
            raise HostileLayer(f"{what}: hardlink {op['path']!r} to directory {op['target']!r}")
        parts = _split(op["path"])
        if not parts:
            raise HostileLayer(f"{what}: hardlink at the image root")
        parent = self._resolve_dir(parts[:-1], op["path"], what, create=True)
        assert parent is not None and parent.children is not None
        parent.children[parts[-1]] = target
