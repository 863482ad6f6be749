"""Test helpers shared by the indexer tests: index an image into a store and turn the
resulting manifest into the same dict shape as ``reference.snapshot`` so that the two can
be compared with ``reference.diff_snapshots``.

Content is read back through ``Store.get_blob`` (which verifies every chunk against its
digest) and hashed whole, so a snapshot match also proves the chunks tile each file.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3

from casfs.manifest import Manifest
from casfs.store import Store, open_store
from indexer.index import IndexResult, index_image

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}


def file_content(m: Manifest, store: Store, ino: int) -> bytes:
    """A regular file's bytes, assembled from its verified chunks."""
    node = m.inode(ino)
    parts = []
    pos = 0
    for c in m.chunks(ino):
        assert c.offset == pos, f"inode {ino}: chunk at {c.offset}, expected {pos}"
        data = store.get_blob(c.digest)
        assert len(data) == c.length
        parts.append(data)
        pos += c.length
    assert pos == node.size, f"inode {ino}: chunks cover {pos} of {node.size} bytes"
    return b"".join(parts)


def manifest_snapshot(m: Manifest, store: Store | None, include_root: bool = True,
                      hash_content: bool = True) -> dict[str, dict[str, Any]]:
    """``reference.snapshot`` of the tree a manifest describes (see its docstring)."""
    snap: dict[str, dict[str, Any]] = {}
    by_ino: dict[int, list[str]] = {}
    for raw_path, ino in m.walk():
        path = os.fsdecode(raw_path)
        if path == "/" and not include_root:
            continue
        node = m.inode(ino)
        fmt = stat.S_IFMT(node.mode)
        entry: dict[str, Any] = {
            "type": _TYPES.get(fmt, f"unknown:{fmt:o}"),
            "mode": stat.S_IMODE(node.mode),
            "uid": node.uid,
            "gid": node.gid,
            "mtime": node.mtime_ns // 1_000_000_000,
            "xattrs": {os.fsdecode(k): v for k, v in sorted(m.xattrs(ino).items())},
        }
        if fmt == stat.S_IFREG:
            entry["size"] = node.size
            if hash_content:
                assert store is not None
                entry["hash"] = "blake3:" + blake3.blake3(file_content(m, store, ino)).hexdigest()
        elif fmt == stat.S_IFLNK:
            entry["target"] = os.fsdecode(m.readlink(ino))
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            entry["rdev"] = (os.major(node.rdev), os.minor(node.rdev))
        if fmt != stat.S_IFDIR:
            entry["nlink"] = node.nlink
            by_ino.setdefault(ino, []).append(path)
        snap[path] = entry
    for paths in by_ino.values():
        group = min(paths) if len(paths) > 1 else None
        for p in paths:
            snap[p]["hardlink"] = group
    return snap


def file_store(path: Path) -> Store:
    return open_store(f"file://{path}", create=True)


def index(ref: str, store: Store, **kw: Any) -> tuple[IndexResult, Manifest]:
    """index_image, then the manifest read back from the store."""
    result = index_image(ref, store, **kw)
    return result, Manifest(store.get_manifest(result.digest), result.digest)


def store_keys(store: Store, prefix: str) -> set[str]:
    return set(store.backend.list(prefix))


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``casfs <args>`` in a subprocess (python -m casfs.cli, so no install is needed)."""
    full_env = dict(os.environ)
    full_env.pop("CASFS_STORE", None)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "casfs.cli", *args], capture_output=True,
                          text=True, env=full_env, timeout=timeout)
