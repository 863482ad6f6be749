"""The manifest format: writer/reader round trips, determinism, queries, and the reader's
handling of untrusted (truncated, corrupted) buffers."""

from __future__ import annotations

import os
import random
import stat
import struct
from pathlib import Path

import blake3
import pytest

from casfs.errors import ManifestError
from casfs.manifest import Manifest, Node, build_manifest
from casfs.manifest.layout import HEADER, HEADER_SIZE, INODE, MAGIC, section_offsets
from casfs.manifest.reader import ROOT_INO, ChunkRef
from casfs.manifest.tree import Chunk

CAP = bytes([1, 0, 0, 2, 0, 4, 0, 0]) + bytes(12)


def dg(label: str) -> str:
    return blake3.blake3(label.encode()).hexdigest()


def reg(data_len: int = 0, chunk: int = 100, perm: int = 0o644, label: str = "f",
        **kw: object) -> Node:
    chunks = [Chunk(dg(f"{label}{off}"), off, min(chunk, data_len - off))
              for off in range(0, data_len, chunk)]
    return Node(mode=stat.S_IFREG | perm, size=data_len, chunks=chunks, **kw)  # type: ignore[arg-type]


def sample_tree() -> Node:
    root = Node.directory(0o755, mtime_ns=5)
    etc = Node.directory(0o755, uid=0, gid=0, mtime_ns=1_700_000_000_123_456_789)
    shared = reg(250, label="shared", perm=0o4755, uid=1000, gid=1001,
                 xattrs={b"user.a": b"1", b"security.capability": CAP, b"trusted.z": b"\x00\xff"})
    bin_ = Node.directory(0o2775, gid=50, xattrs={b"user.dir": b"d"})
    tmp = Node.directory(0o1777)
    dev = Node.directory()
    deep = Node.directory()
    assert root.children is not None and etc.children is not None
    assert bin_.children is not None and dev.children is not None and deep.children is not None
    root.children.update({
        b"etc": etc, b"bin": bin_, b"tmp": tmp, b"dev": dev, b"deep": deep,
        b"link": Node(mode=stat.S_IFLNK | 0o777, target=b"etc/passwd", uid=3, mtime_ns=-10),
        b"abs": Node(mode=stat.S_IFLNK | 0o777, target=b"/" + b"x" * 4000),
        b"empty": reg(0),
        "ünïcode".encode(): reg(3, label="u"),
        b"\xff\xfe-not-utf8": reg(1, label="n"),
        b"n" * 255: reg(7, label="long"),
    })
    etc.children.update({b"passwd": reg(99, label="pw"), b"shadow": reg(5, perm=0o000)})
    bin_.children.update({b"busybox": shared, b"sh": shared, b"ls": shared})
    deep.children[b"alias"] = shared  # a hardlink in another directory
    dev.children.update({
        b"null": Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3)),
        b"sda": Node(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(8, 1), gid=6),
        b"huge": Node(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(4095, 1048575)),
        b"fifo": Node(mode=stat.S_IFIFO | 0o620, xattrs={b"trusted.f": b"v" * 1000}),
        b"sock": Node(mode=stat.S_IFSOCK | 0o755),
    })
    return root


META = {"chunk_size": 100, "layers": [{"digest": "sha256:" + "0" * 64, "size": 1}], "z": "ü"}


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return Manifest(build_manifest(sample_tree(), META), "digest-hex")


def test_round_trip_every_entry_type(manifest: Manifest) -> None:
    m = manifest
    assert m.meta == META and m.digest == "digest-hex"
    root = m.inode(ROOT_INO)
    assert stat.S_ISDIR(root.mode) and root.mtime_ns == 5 and root.parent == ROOT_INO
    assert root.nlink == 2 + 5  # five subdirectories

    etc = m.inode(m.resolve("/etc"))
    assert etc.mtime_ns == 1_700_000_000_123_456_789 and etc.nlink == 2

    pw = m.resolve("/etc/passwd")
    assert m.inode(pw).size == 99 and m.inode(pw).parent == m.resolve("/etc")
    assert m.chunks(pw) == [ChunkRef(dg("pw0"), 0, 99)]
    assert stat.S_IMODE(m.inode(m.resolve("/etc/shadow")).mode) == 0

    link = m.inode(m.resolve("/link"))
    assert stat.S_ISLNK(link.mode) and link.size == len(b"etc/passwd")
    assert (link.uid, link.mtime_ns) == (3, -10)
    assert m.readlink(m.resolve("/link")) == b"etc/passwd"
    assert m.readlink(m.resolve("/abs")) == b"/" + b"x" * 4000

    null, sda, huge = (m.inode(m.resolve(f"/dev/{n}")) for n in ("null", "sda", "huge"))
    assert stat.S_ISCHR(null.mode) and (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
    assert stat.S_ISBLK(sda.mode) and sda.gid == 6 and os.minor(sda.rdev) == 1
    assert (os.major(huge.rdev), os.minor(huge.rdev)) == (4095, 1048575)
    fifo = m.resolve("/dev/fifo")
    assert stat.S_ISFIFO(m.inode(fifo).mode) and stat.S_IMODE(m.inode(fifo).mode) == 0o620
    assert m.xattrs(fifo) == {b"trusted.f": b"v" * 1000}
    assert stat.S_ISSOCK(m.inode(m.resolve("/dev/sock")).mode)

    assert m.inode(m.resolve("/tmp")).mode == stat.S_IFDIR | 0o1777
    b = m.inode(m.resolve("/bin"))
    assert b.mode == stat.S_IFDIR | 0o2775 and b.gid == 50
    assert m.xattrs(m.resolve("/bin")) == {b"user.dir": b"d"}
    assert m.resolve("/empty") and m.chunks(m.resolve("/empty")) == []
    assert m.inode(m.resolve("/" + "n" * 255)).size == 7
    assert m.inode(m.resolve("/ünïcode")).size == 3
    assert m.lookup(ROOT_INO, b"\xff\xfe-not-utf8") == m.resolve(b"/\xff\xfe-not-utf8") != 0


def test_hardlinks_share_an_inode(manifest: Manifest) -> None:
    m = manifest
    inos = {m.resolve(p) for p in ("/bin/busybox", "/bin/sh", "/bin/ls", "/deep/alias")}
    assert len(inos) == 1
    ino = inos.pop()
    node = m.inode(ino)
    assert node.nlink == 4 and node.mode == stat.S_IFREG | 0o4755
    assert (node.uid, node.gid, node.size) == (1000, 1001, 250)
    assert m.xattrs(ino) == {b"user.a": b"1", b"security.capability": CAP,
                             b"trusted.z": b"\x00\xff"}
    assert [c.length for c in m.chunks(ino)] == [100, 100, 50]
    assert m.inode(m.resolve("/etc/passwd")).nlink == 1
    # each inode is listed once by a walk of distinct inodes
    paths = dict(m.walk())
    assert sum(1 for i in paths.values() if i == ino) == 4


def test_entries_sorted_and_walk(manifest: Manifest) -> None:
    m = manifest
    names = [name for _, name, _ in m.entries(ROOT_INO)]
    assert names == sorted(names) and len(names) == 11
    walked = [p for p, _ in m.walk()]
    assert walked[0] == b"/" and len(walked) == len(set(walked)) == 1 + 11 + 2 + 3 + 5 + 1
    assert b"/dev/null" in walked and b"/deep/alias" in walked
    sub = [p for p, _ in m.walk(m.resolve("/dev"), b"/dev")]
    assert sorted(sub) == [b"/dev/" + n for n in (b"fifo", b"huge", b"null", b"sda", b"sock")]


def test_deterministic() -> None:
    a = build_manifest(sample_tree(), META)
    b = build_manifest(sample_tree(), dict(reversed(list(META.items()))))
    assert a == b
    # children inserted in another order: same bytes
    t = sample_tree()
    assert t.children is not None
    t.children = dict(reversed(list(t.children.items())))
    assert build_manifest(t, META) == a
    # any change changes the bytes
    t2 = sample_tree()
    assert t2.children is not None
    t2.children[b"etc"].mtime_ns += 1
    assert build_manifest(t2, META) != a


def test_lookup_missing_names(manifest: Manifest) -> None:
    m = manifest
    for name in (b"", b"nope", b"etc/passwd", b"ET", b"zzzz", b"\x00", b"n" * 256):
        assert m.lookup(ROOT_INO, name) == 0
    assert m.lookup(m.resolve("/etc"), b"passwdx") == 0
    assert m.resolve("/nope/deeper") == 0
    assert m.resolve("/etc/passwd/below") == 0  # through a file
    assert m.resolve("/link/x") == 0  # symlinks are not followed
    assert m.resolve("/") == m.resolve("") == m.resolve("//./") == ROOT_INO
    with pytest.raises(ManifestError, match="not a directory"):
        m.lookup(m.resolve("/etc/passwd"), b"x")
    with pytest.raises(ManifestError):
        m.inode(0)
    with pytest.raises(ManifestError):
        m.inode(10_000)
    with pytest.raises(ManifestError):
        m.readlink(m.resolve("/etc"))
    assert m.chunks(m.resolve("/etc")) == []


def test_chunks_for_range() -> None:
    root = Node.directory()
    assert root.children is not None
    root.children[b"f"] = reg(250, chunk=100, label="c")
    root.children[b"e"] = reg(0)
    m = Manifest(build_manifest(root, {}))
    f = m.resolve("/f")

    def offs(offset: int, size: int) -> list[int]:
        return [c.offset for c in m.chunks_for_range(f, offset, size)]

    assert offs(0, 1) == [0]
    assert offs(0, 100) == [0]
    assert offs(99, 2) == [0, 100]
    assert offs(100, 100) == [100]
    assert offs(150, 1000) == [100, 200]
    assert offs(0, 250) == [0, 100, 200]
    assert offs(249, 1) == [200]
    assert offs(250, 10) == []
    assert offs(1000, 5) == []
    assert offs(10, 0) == []
    assert m.chunks_for_range(m.resolve("/e"), 0, 100) == []
    assert m.chunks_for_range(f, 199, 2) == [ChunkRef(dg("c100"), 100, 100),
                                             ChunkRef(dg("c200"), 200, 50)]


def test_readdir_offsets() -> None:
    root = Node.directory()
    assert root.children is not None
    for i in range(50):
        root.children[f"e{i:03}".encode()] = reg(1, label=str(i))
    m = Manifest(build_manifest(root, {}))
    full = list(m.entries(ROOT_INO))
    assert [i for i, _, _ in full] == list(range(50))
    # resuming at any offset gives the rest, as readdir after a short buffer does
    for start in (0, 1, 17, 49):
        assert list(m.entries(ROOT_INO, start)) == full[start:]
    assert list(m.entries(ROOT_INO, 50)) == []
    assert list(m.entries(ROOT_INO, 10_000)) == []
    assert list(m.entries(ROOT_INO, -3)) == full
    for _, name, ino in full:
        assert m.lookup(ROOT_INO, name) == ino


def test_open_from_file(tmp_path: Path) -> None:
    data = build_manifest(sample_tree(), META)
    (tmp_path / "m").write_bytes(data)
    m = Manifest.open(tmp_path / "m", "d")
    assert m.readlink(m.resolve("/link")) == b"etc/passwd" and m.meta == META
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(ManifestError):
        Manifest.open(tmp_path / "empty")


# --- untrusted buffers -----------------------------------------------------------------------


def exercise(m: Manifest) -> None:
    """Every query on every reachable entry (walk, stat, chunks, links, xattrs, ranges)."""
    _ = m.meta
    for path, ino in m.walk():
        node = m.inode(ino)
        m.xattrs(ino)
        if stat.S_ISDIR(node.mode):
            for _, name, _ in m.entries(ino):
                m.lookup(ino, name)
            m.lookup(ino, b"missing")
        elif stat.S_ISLNK(node.mode):
            m.readlink(ino)
        elif stat.S_ISREG(node.mode):
            m.chunks(ino)
            m.chunks_for_range(ino, 0, 1 << 40)
            m.chunks_for_range(ino, 150, 10)
        m.resolve(path)


def test_truncated_buffers_raise_manifest_error() -> None:
    data = build_manifest(sample_tree(), META)
    for n in list(range(0, 200)) + list(range(200, len(data), 7)) + [len(data) - 1]:
        with pytest.raises(ManifestError):
            Manifest(data[:n])
    with pytest.raises(ManifestError):
        Manifest(data + b"\0")


def test_garbage_buffers_raise_manifest_error() -> None:
    rng = random.Random(1)
    for n in (0, 1, 43, 44, 64, 100, 4096):
        with pytest.raises(ManifestError):
            Manifest(bytes(rng.randrange(256) for _ in range(n)))
    data = bytearray(build_manifest(sample_tree(), META))
    bad_magic = bytes(b"X" + data[1:])
    with pytest.raises(ManifestError, match="magic"):
        Manifest(bad_magic)
    future = bytearray(data)
    struct.pack_into("<I", future, 8, 2)
    with pytest.raises(ManifestError, match="version 2"):
        Manifest(bytes(future))
    # A root that is not a directory.
    _, inodes, *_ = section_offsets(*_counts(data))
    not_dir = bytearray(data)
    struct.pack_into("<I", not_dir, inodes, stat.S_IFREG | 0o644)
    with pytest.raises(ManifestError, match="root"):
        Manifest(bytes(not_dir))


def _counts(data: bytes | bytearray) -> tuple[int, int, int, int, int]:
    (_m, _v, _f, n_inodes, n_dirents, n_chunks, n_xattrs, _sl, meta_len) = HEADER.unpack_from(data)
    return meta_len, n_inodes, n_dirents, n_chunks, n_xattrs


def test_corrupted_bodies_fail_cleanly() -> None:
    """Random damage past the header: every query answers or raises ManifestError."""
    data = build_manifest(sample_tree(), META)
    rng = random.Random(7)
    errors = 0
    for _ in range(400):
        buf = bytearray(data)
        for _ in range(rng.choice((1, 2, 8, 40))):
            pos = rng.randrange(HEADER_SIZE, len(buf))
            buf[pos] = rng.choice((0, 0xFF, rng.randrange(256)))
        try:
            exercise(Manifest(bytes(buf)))
        except ManifestError:
            errors += 1
    assert errors > 0  # the damage is seen, not silently absorbed everywhere


def test_meta_must_be_an_object() -> None:
    data = build_manifest(Node.directory(), {})
    bad = data.replace(b"{}", b"[]")
    with pytest.raises(ManifestError):
        _ = Manifest(bad).meta


# --- writer input checks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"nul\0byte", b"x" * 256])
def test_writer_rejects_bad_names(name: bytes) -> None:
    root = Node.directory()
    assert root.children is not None
    root.children[name] = reg(1)
    with pytest.raises(ManifestError, match="invalid entry name"):
        build_manifest(root, {})


def test_writer_rejects_inconsistent_trees() -> None:
    def one(node: Node) -> Node:
        root = Node.directory()
        assert root.children is not None
        root.children[b"x"] = node
        return root

    with pytest.raises(ManifestError, match="root"):
        build_manifest(reg(1), {})
    gap = reg(200, chunk=100)
    gap.chunks[1].offset = 150
    with pytest.raises(ManifestError, match="tile"):
        build_manifest(one(gap), {})
    short = reg(200, chunk=100)
    short.size = 300
    with pytest.raises(ManifestError, match="cover"):
        build_manifest(one(short), {})
    empty_chunk = reg(0)
    empty_chunk.chunks = [Chunk(dg("z"), 0, 0)]
    with pytest.raises(ManifestError):
        build_manifest(one(empty_chunk), {})
    d = Node.directory()
    root = one(d)
    assert root.children is not None
    root.children[b"y"] = d  # the same directory twice
    with pytest.raises(ManifestError, match="twice"):
        build_manifest(root, {})
    with pytest.raises(ManifestError, match="xattr"):
        build_manifest(one(reg(1, xattrs={b"user.big": b"v" * (64 * 1024 + 1)})), {})


@pytest.mark.parametrize("field,value", [
    ("uid", 1 << 32), ("gid", -1), ("mtime_ns", 1 << 63), ("rdev", 1 << 64), ("size", 1 << 64),
])
def test_writer_rejects_out_of_range_values(field: str, value: int) -> None:
    node = Node(mode=stat.S_IFCHR | 0o600)
    setattr(node, field, value)
    root = Node.directory()
    assert root.children is not None
    root.children[b"x"] = node
    with pytest.raises(ManifestError, match="out of range"):
        build_manifest(root, {})


# --- big manifests -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_manifest() -> bytes:
    """100,000 files in 100 directories (every file its own chunk)."""
    root = Node.directory()
    assert root.children is not None
    for d in range(100):
        sub = Node.directory()
        assert sub.children is not None
        root.children[f"dir{d:03}".encode()] = sub
        for i in range(1000):
            sub.children[f"file{i:04}.py".encode()] = Node(
                mode=stat.S_IFREG | 0o644, size=10, chunks=[Chunk(f"{d:02x}{i:04x}".ljust(64, "0"), 0, 10)])
    return build_manifest(root, {"entries": 100_100})


def test_big_manifest_lookups(big_manifest: bytes) -> None:
    m = Manifest(big_manifest)
    assert m.n_inodes == 1 + 100 + 100_000
    for d, i in ((0, 0), (50, 500), (99, 999), (7, 123)):
        ino = m.resolve(f"/dir{d:03}/file{i:04}.py")
        assert ino and m.chunks(ino)[0].digest.startswith(f"{d:02x}{i:04x}")
    assert m.resolve("/dir050/file1000.py") == 0
    assert m.lookup(m.resolve("/dir050"), b"file0499.pz") == 0


def test_open_reads_only_the_header_and_root(big_manifest: bytes) -> None:
    """Opening costs a header check, not a pass over the entries: with every table but the
    root inode overwritten by garbage, construction still succeeds (and queries then fail
    cleanly), so __init__ cannot have read them."""
    meta_len, n_inodes, n_dirents, n_chunks, n_xattrs = _counts(big_manifest)
    _, inodes, _dirents, *_ = section_offsets(meta_len, n_inodes, n_dirents, n_chunks, n_xattrs)
    root_end = inodes + INODE.size
    buf = bytearray(big_manifest)
    buf[root_end:] = b"\xff" * (len(buf) - root_end)
    # the meta JSON too: it is parsed on first use only
    buf[HEADER_SIZE:inodes] = b"\xff" * (inodes - HEADER_SIZE)
    m = Manifest(bytes(buf))
    assert m.n_inodes == n_inodes and buf[:8] == MAGIC
    with pytest.raises(ManifestError):
        m.resolve("/dir050/file0500.py")
    with pytest.raises(ManifestError):
        _ = m.meta
