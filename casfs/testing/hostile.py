"""Hostile input, built on purpose: manifests patched to hurt, layers that try to escape,
damaged compressed streams, and the walk that does with a manifest everything the daemon
does.

Owns: the sample manifest `GOOD` and its patchers (`patch_dirent`, `patch_chunk`,
`patch_inode`), `exercise`, the seed layers of the fuzzers (`SEED_TAR`, `rich_tar`),
`hostile_layers` and `hostile_manifests` (the corpora the reliability benchmark puts
through the CLI). Used by tests/test_hostile.py's cases, the fuzz targets
(casfs.testing.fuzz) and benchmarks/faults.py.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casfs.manifest import Manifest, Node, build_manifest
from casfs.manifest.layout import CHUNK, DIRENT, INODE, section_offsets
from casfs.manifest.tree import Chunk
from casfs.testing import ocibuild as ob

D1, D2 = "11" * 32, "22" * 32


# == manifests ===================================================================================

def sample_tree() -> Node:
    """/a/f (two chunks), /b/g (one chunk), /b/l -> ../a/f."""
    root = Node.directory()
    a = Node.directory()
    b = Node.directory()
    root.children = {b"a": a, b"b": b}
    a.children = {b"f": Node(mode=stat.S_IFREG | 0o644, size=300,
                             chunks=[Chunk(D1, 0, 200), Chunk(D2, 200, 100)])}
    b.children = {b"g": Node(mode=stat.S_IFREG | 0o644, size=5, chunks=[Chunk(D1, 0, 5)]),
                  b"l": Node(mode=stat.S_IFLNK | 0o777, target=b"../a/f")}
    return root


GOOD = build_manifest(sample_tree(), {"layers": []})


def offsets(buf: bytes) -> tuple[int, ...]:
    m = Manifest(buf)
    return section_offsets(m.meta_len, m.n_inodes, m.n_dirents, m.n_chunks, m.n_xattrs)


def patch_dirent(buf: bytes, index: int, *, ino: int | None = None,
                 name: bytes | None = None) -> bytes:
    out = bytearray(buf)
    _, _, dirents, *_rest, strings = offsets(buf)
    at = dirents + index * DIRENT.size
    name_off, name_len, r, old_ino = DIRENT.unpack_from(out, at)
    if name is not None:  # rewrite the name in place (same length)
        assert len(name) == name_len
        out[strings + name_off: strings + name_off + name_len] = name
    DIRENT.pack_into(out, at, name_off, name_len, r, old_ino if ino is None else ino)
    return bytes(out)


def patch_chunk(buf: bytes, index: int, *, offset: int | None = None,
                length: int | None = None) -> bytes:
    out = bytearray(buf)
    _, _, _, chunks, *_ = offsets(buf)
    at = chunks + index * CHUNK.size
    d, o, ln, r = CHUNK.unpack_from(out, at)
    CHUNK.pack_into(out, at, d, o if offset is None else offset, ln if length is None else length, r)
    return bytes(out)


def patch_inode(buf: bytes, ino: int, **fields: int) -> bytes:
    names = ["mode", "uid", "gid", "nlink", "size", "mtime_ns", "rdev", "first", "count",
             "xattr_first", "xattr_count", "parent", "reserved", "str_off"]
    out = bytearray(buf)
    _, inodes, *_ = offsets(buf)
    at = inodes + (ino - 1) * INODE.size
    vals = list(INODE.unpack_from(out, at))
    for k, v in fields.items():
        vals[names.index(k)] = v
    INODE.pack_into(out, at, *vals)
    return bytes(out)


def exercise(m: Manifest) -> None:
    """Everything the daemon does with a manifest."""
    m.validate()
    for path, ino in m.walk():
        node = m.inode(ino)
        m.xattrs(ino)
        if stat.S_ISREG(node.mode):
            m.chunks_for_range(ino, 0, node.size)
        elif stat.S_ISLNK(node.mode):
            m.readlink(ino)
        if stat.S_ISDIR(node.mode):
            for _, name, _child in m.entries(ino):
                m.lookup(ino, name)
        assert path


def hostile_manifests() -> list[tuple[str, bytes]]:
    """Manifests built to hurt (the cases of tests/test_hostile.py, and more): each is a
    valid object (its digest matches its bytes) that a mount must refuse."""
    G = GOOD  # noqa: N806
    return [
        ("cycle to root", patch_dirent(G, 0, ino=1)),
        ("dir with two parents", patch_dirent(G, 1, ino=2)),
        ("name with slash", patch_dirent(G, 2, name=b"/")),
        ("name with NUL", patch_dirent(G, 2, name=b"\0")),
        ("unsorted names", patch_dirent(G, 4, name=b"0")),
        ("overlapping chunks", patch_chunk(G, 1, offset=150)),
        ("zero-length chunk", patch_chunk(G, 1, length=0)),
        ("size disagrees with chunks", patch_inode(G, 4, size=301)),
        ("chunks out of range", patch_inode(G, 4, count=99)),
        ("dirents out of range", patch_inode(G, 1, count=99)),
        ("entry inode out of range", patch_dirent(G, 0, ino=999)),
        ("symlink target out of range", patch_inode(G, 6, str_off=1 << 30)),
        ("unknown file type", patch_inode(G, 5, mode=0o170644)),
        ("truncated", G[:-3]),
        ("bad magic", b"X" + G[1:]),
        ("header counts overflow", G[:16] + (0xFFFFFFFF).to_bytes(4, "little") + G[20:]),
        ("empty", b""),
        ("garbage", os.urandom(4096)),
    ]


# == layers ======================================================================================

SEED_TAR = ob.Layer.from_members([ob.file("etc/passwd", b"root:x:0:0\n"),
                                  ob.file("bin/sh", b"\x7fELF" * 100)], compression="none").tar
"""A small, good layer tar: the tar fuzzers' first seed."""


def rich_tar() -> bytes:
    """A layer using every kind of entry ingestion handles: the fuzzers' second seed."""
    return ob.layer_tar([
        ob.directory("etc"), ob.file("etc/passwd", "root:x:0:0\n", uid=0),
        ob.file("bin/sh", b"\x7fELF" * 300, mode=0o755), ob.hardlink("bin/bash", "bin/sh"),
        ob.symlink("lib", "usr/lib"), ob.directory("usr/lib"),
        ob.file("usr/lib/libc.so", bytes(range(256)) * 40),
        ob.whiteout("var/cache"), ob.opaque_whiteout("opt"),
        ob.file("x/" + "n" * 150 + "/f", "long name"),
        ob.file("x/attrs", "a", xattrs={"user.k": "v", "security.capability": b"\x01\x00"}),
        ob.Member("dev/null", "char", devmajor=1, devminor=3),
        ob.Member("fifo", "fifo"),
    ])


def raw_tar(entries: list[dict[str, Any]]) -> bytes:
    """A PAX tar of entries as given (names, types and fields unchecked, as an attacker
    would write them): name, type, mode, uid, gid, mtime, devmajor, devminor, pax, data,
    link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o644)
            for k in ("uid", "gid", "mtime", "devmajor", "devminor"):
                if k in e:
                    setattr(info, k, e[k])
            info.pax_headers = e.get("pax", {})
            data = None
            if info.type == tarfile.REGTYPE:
                payload = e.get("data", b"x")
                data = io.BytesIO(payload)
                info.size = len(payload)
            else:
                info.linkname = e.get("link", "")
            tar.addfile(info, data)
    return buf.getvalue()


def damaged(tar_bytes: bytes, comp: ob.Compression, damage: Callable[[bytes], bytes]) -> ob.Layer:
    """A layer whose compressed blob is damaged after compression."""
    layer = ob.Layer(tar_bytes, comp)
    layer._blob = damage(layer.blob)
    return layer


def hostile_layers(token: str, outside: Path) -> list[tuple[str, ob.Layer, str, dict[str, str]]]:
    """(name, layer, expectation, env) of hostile layers. expectation: "refused", or
    "contained:<path>": accepted, with the entry at that path inside the image. Symlinks
    in an entry's parents are resolved inside the image root, as Docker, umoci and
    containerd do: an absolute target starts at the image root and ".." stops there, so
    such entries land inside the image, never outside it."""
    esc = f"casfs-escape-{token}"
    cases: list[tuple[str, ob.Layer, str, dict[str, str]]] = []

    def tar(name: str, entries: list[dict[str, Any]], expect: str = "refused",
            comp: ob.Compression = "gzip", env: dict[str, str] | None = None) -> None:
        cases.append((name, ob.Layer(raw_tar(entries), comp), expect, env or {}))

    tar("absolute path", [{"name": f"{outside}/abs"}])
    tar("dot-dot", [{"name": f"../{esc}"}])
    tar("nested dot-dot", [{"name": "ok", "data": b"ok"}, {"name": f"a/../../{esc}"}])
    tar("deep dot-dot", [{"name": "/".join([".."] * 12) + f"/tmp/{esc}"}])
    tar("symlink named ..", [{"name": "../link", "type": tarfile.SYMTYPE, "link": "/"}])
    tar("symlink parent, relative target out of the root", [
        {"name": "evil", "type": tarfile.SYMTYPE, "link": "../../../../../.." + str(outside)},
        {"name": "evil/pwned", "data": b"pwned"}], expect=f"contained:{outside}/pwned")
    tar("symlink parent, relative chain out of the root", [
        {"name": "a", "type": tarfile.SYMTYPE, "link": ".."},
        {"name": "a/b", "type": tarfile.SYMTYPE, "link": "../.."},
        {"name": "a/b/pwned", "data": b"pwned"}], expect="contained:/pwned")
    tar("symlink parent, absolute target", [
        {"name": "evil", "type": tarfile.SYMTYPE, "link": str(outside)},
        {"name": "evil/pwned", "data": b"pwned"}], expect=f"contained:{outside}/pwned")
    tar("hardlink leaving the root", [{"name": "ok", "data": b"ok"},
                                      {"name": "l", "type": tarfile.LNKTYPE, "link": "../../etc/passwd"}])
    tar("hardlink to an absolute path", [{"name": "l", "type": tarfile.LNKTYPE, "link": "/etc/shadow"}])
    tar("hardlink to a missing name", [{"name": "l", "type": tarfile.LNKTYPE, "link": "nowhere"}])
    tar("hardlink to a directory", [{"name": "d", "type": tarfile.DIRTYPE},
                                    {"name": "l", "type": tarfile.LNKTYPE, "link": "d"}])
    tar("symlink loop as a parent", [
        {"name": "a", "type": tarfile.SYMTYPE, "link": "b"},
        {"name": "b", "type": tarfile.SYMTYPE, "link": "a"}, {"name": "a/x"}])
    tar("file as a parent", [{"name": "f", "data": b"f"}, {"name": "f/x"}])
    tar("NUL in a PAX path", [{"name": "x", "pax": {"path": "a\x00b"}}])
    tar("whiteout of ..", [{"name": "dir/.wh...", "data": b""}])
    tar("whiteout of nothing", [{"name": "etc/.wh.", "data": b""}])
    tar("uid past 2^32", [{"name": "f", "uid": 2**32 + 5}])
    tar("gid past 2^32", [{"name": "f", "gid": 2**40}])
    tar("absurd mtime", [{"name": "f", "mtime": 2**62}])
    # a member claiming 10 TB over a short stream
    info = tarfile.TarInfo("big")
    info.size = 10 << 40
    huge = info.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 2048
    cases.append(("member size 10 TB", ob.Layer(huge, "none"), "refused", {}))
    # a header with a garbage checksum in the middle of a good stream
    good = raw_tar([{"name": "a", "data": b"a" * 600}, {"name": "b", "data": b"b"}])
    bad = bytearray(good)
    second = 512 + 1024  # after a's header and its 600 bytes of data, padded
    assert good[second:second + 1] == b"b"
    bad[second + 148: second + 156] = b"9999999\0"
    cases.append(("bad header checksum", ob.Layer(bytes(bad), "none"), "refused", {}))
    # compressed streams
    body = raw_tar([{"name": f"f{i}", "data": bytes(range(256)) * 50} for i in range(8)])
    gz = ob.compress(body, "gzip")
    cases.append(("truncated gzip", damaged(body, "gzip", lambda b: b[: len(b) // 2]),
                  "refused", {}))
    cases.append(("gzip trailer cut", damaged(body, "gzip", lambda b: b[:-4]), "refused", {}))
    cases.append(("gzip body flipped", damaged(
        body, "gzip", lambda b: b[:100] + bytes(x ^ 0x5A for x in b[100:200]) + b[200:]),
        "refused", {}))
    cases.append(("truncated zstd", damaged(body, "zstd", lambda b: b[: len(b) // 2]),
                  "refused", {}))
    cases.append(("zstd frame declaring 2^60 bytes", damaged(
        body, "zstd", lambda b: b"\x28\xb5\x2f\xfd\xe4" + (1 << 60).to_bytes(8, "little")
        + b"\x01\x00\x00"), "refused", {}))
    cases.append(("gzip of garbage", damaged(body, "gzip", lambda b: gz[:10] + os.urandom(4000)),
                  "refused", {}))
    # decompression bombs and size caps
    zeros = ob.Layer.from_members([ob.file("zeros", b"\0" * (160 << 20))], "gzip")
    cases.append(("gzip bomb (160 MB of zeros)", zeros, "refused", {"CASFS_MAX_EXPANSION": "100"}))
    zbomb = ob.Layer.from_members([ob.file("zeros", b"\0" * (160 << 20))], "zstd")
    cases.append(("zstd bomb (160 MB of zeros)", zbomb, "refused", {"CASFS_MAX_EXPANSION": "100"}))
    cases.append(("layer over CASFS_MAX_LAYER_BYTES", ob.Layer.from_members(
        [ob.file("f", os.urandom(3 << 20))], "gzip"), "refused",
        {"CASFS_MAX_LAYER_BYTES": str(1 << 20)}))
    return cases
