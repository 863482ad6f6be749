"""Independent reference extraction (umoci) and filesystem tree snapshots/comparison.

This module owns the "truth" side of correctness tests: :func:`umoci_unpack` extracts an
OCI layout with a tool that shares no code with casfs, :func:`snapshot` records everything
observable about a tree using only ``os.*`` calls (so it works on a casfs FUSE mount too),
and :func:`diff_snapshots` reports differences as readable strings.

Fidelity of Debian 12's umoci 0.4.7 (running as root, checked by tests/test_ocibuild.py):

* Restores faithfully: file/dir/symlink/hardlink/char/block/fifo types, permission bits
  including setuid/setgid/sticky, uid/gid, file content, device numbers, symlink targets,
  regular file and symlink mtimes, directory mtimes, ``user.*``/``trusted.*`` xattrs and
  ``security.capability``, whiteouts and opaque whiteouts.
* Does NOT read ``+zstd`` layers or Docker schema2 media types ("not implemented"), and
  cannot choose a platform from a nested image index ("tag is ambiguous"); convert first
  with ``skopeo copy`` (``--dest-compress-format gzip``, ``--override-arch``).
* The bundle's ``rootfs`` directory itself (snapshot "/") gets mode 0755 and an mtime of
  either the unpack time or 0 when no layer has a "./" entry, so it is not comparable: pass
  ``ignore_paths={"/"}`` (or ``include_root=False``) when comparing against casfs.
* Parent directories that no layer has an entry for get mode 0755, root:root and the
  unpack time as mtime; build images with explicit directory entries
  (``ocibuild.parent_dirs``) or ignore ``mtime`` for such directories.
* A lower-layer directory keeps its own mtime when an upper layer adds or whites out entries
  in it without carrying a directory entry (umoci restores parent mtimes).
* An opaque whiteout inside a directory that no layer has an entry for creates nothing.
* ``user.*`` xattrs on fifos/devices/symlinks make umoci fail with EPERM (the kernel only
  allows them on regular files and directories); ``trusted.*`` works on all types.
* Directory ``nlink`` depends on the filesystem, so it is not recorded for directories.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

try:
    import blake3 as _blake3
except ImportError:  # pragma: no cover - blake3 is a casfs dependency
    _blake3 = None

__all__ = ["UmociError", "umoci_unpack", "snapshot", "diff_snapshots", "content_hash", "FIELDS",
           "needs_umoci", "CAP"]

#: Skips a test (or, as ``pytestmark``, a module) unless umoci can run as above (as root).
needs_umoci = pytest.mark.skipif(
    shutil.which("umoci") is None or os.geteuid() != 0, reason="needs umoci and root"
)

#: A v2 file capability (cap_net_bind_service, permitted) as stored in security.capability.
CAP = bytes([1, 0, 0, 2, 0, 4, 0, 0]) + bytes(12)

#: Every field a snapshot entry may have (usable in ``diff_snapshots(ignore=...)``).
FIELDS = ("type", "mode", "uid", "gid", "size", "mtime", "target", "rdev", "xattrs",
          "hash", "nlink", "hardlink")

_TYPES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}
_DROP_XATTRS = {"security.selinux"}


class UmociError(RuntimeError):
    """umoci exited non-zero."""


def umoci_unpack(layout_dir: str | os.PathLike[str], tag: str,
                 dest: str | os.PathLike[str]) -> Path:
    """``umoci unpack --image <layout>:<tag> <dest>`` (as root); returns ``dest/rootfs``.

    ``dest`` must not exist yet (or be empty).  Raises :class:`UmociError` (with umoci's
    stderr in the message) on failure.
    """
    cmd = ["umoci", "unpack", "--image", f"{os.fspath(layout_dir)}:{tag}", os.fspath(dest)]
    if os.geteuid() != 0:
        cmd.insert(2, "--rootless")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UmociError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return Path(dest) / "rootfs"


def content_hash(path: str) -> str:
    """``blake3:<hex>`` (or ``sha256:<hex>`` without blake3) of a file's content."""
    h: Any = _blake3.blake3() if _blake3 is not None else hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return ("blake3:" if _blake3 is not None else "sha256:") + h.hexdigest()


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:  # ENOTSUP on some file types / filesystems
        return {}
    out: dict[str, bytes] = {}
    for name in sorted(names):
        if name in _DROP_XATTRS:
            continue
        try:
            out[name] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def snapshot(root: str | os.PathLike[str], include_root: bool = True,
             hash_content: bool = True) -> dict[str, dict[str, Any]]:
    """Record every path under ``root`` as ``{"/rel/path": {field: value}}``.

    Fields: ``type`` (file/dir/symlink/char/block/fifo/socket), ``mode``
    (``stat.S_IMODE``: permissions + setuid/setgid/sticky), ``uid``, ``gid``, ``mtime``
    (int seconds), ``xattrs`` (name -> bytes; ``security.selinux`` dropped), plus per type:
    files ``size``, ``hash`` (content, see :func:`content_hash`); symlinks ``target``;
    devices ``rdev`` = (major, minor); non-directories ``nlink`` and ``hardlink`` = the
    smallest path sharing its (st_dev, st_ino) when any other path does, else ``None``.
    Symlinks are never followed.  The root itself is "/" (left out unless ``include_root``).
    """
    base = os.fspath(root)
    snap: dict[str, dict[str, Any]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}

    def record(path: str, rel: str) -> bool:
        st = os.lstat(path)
        fmt = stat.S_IFMT(st.st_mode)
        entry: dict[str, Any] = {
            "type": _TYPES.get(fmt, f"unknown:{fmt:o}"),
            "mode": stat.S_IMODE(st.st_mode),
            "uid": st.st_uid,
            "gid": st.st_gid,
            "mtime": int(st.st_mtime),
            "xattrs": _xattrs(path),
        }
        if fmt == stat.S_IFREG:
            entry["size"] = st.st_size
            if hash_content:
                entry["hash"] = content_hash(path)
        elif fmt == stat.S_IFLNK:
            entry["target"] = os.readlink(path)
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
        if fmt != stat.S_IFDIR:
            entry["nlink"] = st.st_nlink
            inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
        snap[rel] = entry
        return fmt == stat.S_IFDIR

    def walk(path: str, rel: str) -> None:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it)
        for name in names:
            child_rel = f"{rel.rstrip('/')}/{name}"
            child = os.path.join(path, name)
            if record(child, child_rel):
                walk(child, child_rel)

    if include_root:
        record(base, "/")
    walk(base, "/")
    for paths in inodes.values():
        group = min(paths) if len(paths) > 1 else None
        for p in paths:
            snap[p]["hardlink"] = group
    return snap


def _fmt(key: str, value: Any) -> str:
    return f"{value:#o}" if key == "mode" and isinstance(value, int) else repr(value)


def diff_snapshots(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]],
                   ignore: Iterable[str] = (), ignore_paths: Iterable[str] = (),
                   limit: int = 200) -> list[str]:
    """Differences between snapshots ``a`` (expected) and ``b`` (actual); [] when equal.

    ``ignore`` names fields to skip (see :data:`FIELDS`; ``"xattrs:<name>"`` skips a single
    xattr).  ``ignore_paths`` holds paths to skip; an entry ending in "/" skips a subtree.
    At most ``limit`` lines are returned (plus a summary line when truncated).
    """
    ign = set(ignore)
    ign_xattrs = {f.split(":", 1)[1] for f in ign if f.startswith("xattrs:")}
    ign_paths = set(ignore_paths)
    ign_prefixes = tuple(p for p in ign_paths if p.endswith("/"))

    def skipped(p: str) -> bool:
        return p in ign_paths or (bool(ign_prefixes) and p.startswith(ign_prefixes))

    out: list[str] = []
    for path in sorted(a.keys() | b.keys()):
        if skipped(path):
            continue
        if path not in b:
            out.append(f"{path}: missing (expected {a[path].get('type')})")
            continue
        if path not in a:
            out.append(f"{path}: unexpected {b[path].get('type')}")
            continue
        ea, eb = a[path], b[path]
        for key in sorted(ea.keys() | eb.keys()):
            if key in ign:
                continue
            va, vb = ea.get(key), eb.get(key)
            if key == "xattrs" and ign_xattrs:
                va = {k: v for k, v in (va or {}).items() if k not in ign_xattrs}
                vb = {k: v for k, v in (vb or {}).items() if k not in ign_xattrs}
            if va != vb:
                out.append(f"{path}: {key} expected {_fmt(key, va)}, got {_fmt(key, vb)}")
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more differences"]
    return out
