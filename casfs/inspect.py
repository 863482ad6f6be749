"""What `casfs ls` and `casfs inspect` show: a manifest's listing, its totals and its
directory packs."""

from __future__ import annotations

import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from casfs.manifest import Manifest
from casfs.manifest.reader import Inode
from casfs.packindex import PackIndex
from casfs.store import Store

_TYPE_CHAR = {
    stat.S_IFDIR: "d", stat.S_IFREG: "-", stat.S_IFLNK: "l", stat.S_IFCHR: "c",
    stat.S_IFBLK: "b", stat.S_IFIFO: "p", stat.S_IFSOCK: "s",
}


def ls_line(m: Manifest, path: bytes, ino: int, node: Inode) -> str:
    kind = stat.S_IFMT(node.mode)
    mode = stat.filemode(node.mode)
    when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(node.mtime_ns // 1_000_000_000))
    size = f"{node.size:>10}"
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        size = f"{os.major(node.rdev):>5},{os.minor(node.rdev):>4}"
    name = path.decode(errors="replace")
    if kind == stat.S_IFLNK:
        name += " -> " + m.readlink(ino).decode(errors="replace")
    return f"{mode} {node.nlink:>3} {node.uid:>5} {node.gid:>5} {size} {when} {name}"


@dataclass
class Summary:
    entries: int
    by_type: dict[str, int]
    file_bytes: int  # content bytes, each inode once
    chunks: int
    unique_chunks: int
    unique_bytes: int
    layer_bytes: int  # uncompressed bytes of all layers

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"dedup_saved_bytes": self.layer_bytes - self.unique_bytes}


def summarize(m: Manifest) -> Summary:
    by_type: dict[str, int] = {}
    seen_inodes: set[int] = set()
    unique: dict[str, int] = {}
    file_bytes = chunks = entries = 0
    for _, ino in m.walk():
        entries += 1
        node = m.inode(ino)
        t = _TYPE_CHAR.get(stat.S_IFMT(node.mode), "?")
        by_type[t] = by_type.get(t, 0) + 1
        if t == "-" and ino not in seen_inodes:
            seen_inodes.add(ino)
            file_bytes += node.size
            for c in m.chunks(ino):
                chunks += 1
                unique[c.digest] = c.length
    layer_bytes = sum(int(layer.get("size", 0)) for layer in m.meta.get("layers", []))
    return Summary(entries, by_type, file_bytes, chunks, len(unique), sum(unique.values()), layer_bytes)


def pack_summary(store: Store, m: Manifest) -> dict[str, int]:
    """The image's directory packs: layers with a pack index, and how many of the
    image's chunks they hold, in how many packs, of how many stored bytes."""
    layers = [layer["digest"] for layer in m.meta.get("layers", []) if layer.get("digest")]
    index = PackIndex()
    index.load(store, layers, m.chunk_digests())
    held = index.locations
    return {"layers": len(layers), "layers_packed": index.layers, "rejected": index.rejected,
            "chunks": len(held), "packs": len({loc[0] for loc in held.values()}),
            "stored_bytes": sum(loc[2] for loc in held.values())}
