"""casfs.erofs: the EROFS image writer, checked against the real kernel, fsck.erofs and mkfs.erofs.

Kernel tests mount images file-backed (EROFS on Linux 6.12+) and overlayfs over them with
data-only layers (Linux 6.5+), as root. They skip, with the reason, where that cannot be
done, and fail instead when the environment variable CI is true. Every mount is taken
down in a `finally`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import os
import random
import re
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from casfs.erofs import (
    EROFS_LAYOUT_VERSION,
    ErofsInfo,
    ErofsUnsupported,
    build_erofs,
    kernel_mode_obstacle,
    render_erofs,
)
from casfs.erofs import format as fmt
from casfs.errors import ManifestError
from casfs.manifest import Manifest, Node, build_manifest
from casfs.manifest.layout import HEADER, section_offsets
from casfs.manifest.reader import ROOT_INO
from casfs.manifest.tree import Chunk

# -- environment ------------------------------------------------------------------------------

MS_RDONLY = 1
MNT_DETACH = 2
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


def kernel_unavailable_reason() -> str | None:
    """Why file-backed EROFS and overlayfs data-only layers cannot be mounted here, or None."""
    if os.geteuid() != 0:
        return "mounting EROFS and overlayfs needs root"
    found = re.match(r"(\d+)\.(\d+)", os.uname().release)
    if not found or (int(found[1]), int(found[2])) < (6, 12):
        return f"kernel {os.uname().release} predates file-backed EROFS mounts (6.12)"
    filesystems = Path("/proc/filesystems").read_text().split()
    for name in ("erofs", "overlay"):
        if name not in filesystems:
            subprocess.run(["modprobe", name], capture_output=True, check=False)
            if name not in Path("/proc/filesystems").read_text().split():
                return f"the kernel has no {name} filesystem"
    return None


def require_kernel() -> None:
    reason = kernel_unavailable_reason()
    if reason:
        _skip_or_fail(reason)


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        _skip_or_fail(f"{name} not installed (Debian package erofs-utils)")
    assert path is not None
    return path


def _mount(source: str | bytes, target: Path, fstype: bytes, flags: int, data: bytes) -> None:
    src = os.fsencode(source)
    if _libc.mount(src, os.fsencode(target), fstype, flags, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype.decode()} {source!r} on {target}: {os.strerror(err)}")


def _umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), 0) != 0:
        _libc.umount2(os.fsencode(target), MNT_DETACH)


@contextlib.contextmanager
def mounted_erofs(image: Path, target: Path) -> Iterator[Path]:
    """The image mounted read-only, file-backed (mount(2) given the file path)."""
    target.mkdir(parents=True, exist_ok=True)
    _mount(os.fspath(image), target, b"erofs", MS_RDONLY, b"")
    try:
        yield target
    finally:
        _umount(target)


@contextlib.contextmanager
def mounted_overlay(lower: Path, data_layers: list[Path], target: Path) -> Iterator[Path]:
    """overlayfs as casfs's kernel mode mounts it: the EROFS mount as the only lower
    layer, content objects in data-only layers."""
    target.mkdir(parents=True, exist_ok=True)
    lowerdir = "::".join(os.fspath(p) for p in [lower, *data_layers])
    opts = f"metacopy=on,redirect_dir=follow,lowerdir={lowerdir}".encode()
    _mount("overlay", target, b"overlay", MS_RDONLY, opts)
    try:
        yield target
    finally:
        _umount(target)


def fsck(image: Path) -> None:
    """fsck.erofs must accept the image (erofs-utils 1.5 on Debian 12)."""
    tool = require_tool("fsck.erofs")
    result = subprocess.run([tool, os.fspath(image)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, f"fsck.erofs failed:\n{result.stdout}\n{result.stderr}"


# -- trees and manifests ---------------------------------------------------------------------

EPOCH = 1_700_000_000_000_000_000  # the most common mtime: compact inodes
CAP = bytes([1, 0, 0, 2, 0, 4, 0, 0]) + bytes(12)  # security.capability v2: cap_net_bind_service
# POSIX ACL (version 2): user::rw-, user:1000:r--, group::r--, mask::r--, other::r--
ACL = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident)
    for tag, perm, ident in ((1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF),
                             (0x10, 4, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))
BIG = 5 * 1024**3 + 12345  # > 4 GiB: extended inode, size above 32 bits


def content_for(label: str, size: int) -> bytes:
    return random.Random(label).randbytes(size)


CONTENTS: dict[str, bytes] = {}  # chunk digest -> content, for the files reg() makes


def reg(data: bytes, perm: int = 0o644, **kw: object) -> Node:
    digest = blake3.blake3(data).hexdigest()
    CONTENTS[digest] = data
    chunks = [Chunk(digest, 0, len(data))] if data else []
    return Node(mode=stat.S_IFREG | perm, size=len(data), chunks=chunks,  # type: ignore[arg-type]
                mtime_ns=kw.pop("mtime_ns", EPOCH), **kw)


def big_file(**kw: object) -> Node:
    half = BIG // 2
    chunks = [Chunk(blake3.blake3(b"big-0").hexdigest(), 0, half),
              Chunk(blake3.blake3(b"big-1").hexdigest(), half, BIG - half)]
    return Node(mode=stat.S_IFREG | 0o600, size=BIG, chunks=chunks, mtime_ns=EPOCH,
                **kw)  # type: ignore[arg-type]


def directory(perm: int = 0o755, **kw: int) -> Node:
    kw.setdefault("mtime_ns", EPOCH)
    return Node.directory(perm, **kw)


def sized_names(rng: random.Random, count: int, max_len: int = 255) -> list[bytes]:
    names: set[bytes] = set()
    while len(names) < count:
        length = rng.choice([1, 2, 8, 30, 100, 200, max_len, rng.randint(1, max_len)])
        raw = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789._-+~ \xc3\xa9\xff")
                    for _ in range(length))
        if raw not in (b".", b"..") and raw[:1] != b"\0":
            names.add(raw)
    return sorted(names)


def full_tree(portable: bool = False) -> Node:
    """Every kind of entry and attribute an image can hold. portable=True leaves out what
    an ext4 tree cannot carry (xattrs over one 4 KiB block), what would make mkfs.erofs
    write gigabytes (a 5 GiB file), and 255-byte names (mkfs.erofs 1.5 fails on them:
    "Could not format the device"; the kernel reads ours)."""
    rng = random.Random(7)
    longest = 254 if portable else 255
    root = directory(0o755, mtime_ns=1_600_000_000_987_654_321)
    assert root.children is not None
    busybox = reg(content_for("busybox", 250_001), perm=0o4755, uid=1000, gid=1001,
                  xattrs={b"user.a": b"1", b"security.capability": CAP, b"trusted.z": b"\x00\xff"})
    bin_ = directory(0o2775, gid=50, xattrs={b"user.dir": b"d"})
    dev = directory()
    deep = directory(mtime_ns=-1_000_000_005)  # before 1970
    esc = directory(xattrs={b"trusted.overlay.opaque": b"y", b"trusted.overlay.overlay.x": b"2"})
    many = directory()
    ids = directory(uid=4_294_967_294, gid=4_000_000_000)
    for d in (bin_, dev, deep, esc, many, ids):
        assert d.children is not None
    label = reg(b"", xattrs={b"user.label": b"shared-value"})
    root.children.update({
        b"bin": bin_, b"dev": dev, b"deep": deep, b"esc": esc, b"many": many, b"ids": ids,
        b"tmp": directory(0o1777),
        b"emptydir": directory(0o700, uid=5, gid=6),
        b"link": Node(mode=stat.S_IFLNK | 0o777, target=b"bin/busybox", uid=3, mtime_ns=EPOCH),
        b"short": Node(mode=stat.S_IFLNK | 0o777, target=b"x", mtime_ns=EPOCH + 1),
        b"mid": Node(mode=stat.S_IFLNK | 0o777, target=b"/" + b"m" * 2048, mtime_ns=EPOCH),
        b"max": Node(mode=stat.S_IFLNK | 0o777, target=b"/" + b"p" * 4094, mtime_ns=EPOCH),
        b"empty": reg(b"", xattrs={b"user.e": b"on an empty file"}),
        b"label1": label,
        b"label2": reg(b"", xattrs={b"user.label": b"shared-value"}),
        "ünïcode".encode(): reg(b"abc"),
        b"\xff\xfe-not-utf8": reg(b"x", mtime_ns=0),
        b"n" * longest: reg(b"long name", mtime_ns=4_102_444_800_000_000_001),  # year 2100
        b"-sorts-before-dot": reg(b"-"),
        b"acl": reg(b"acl", xattrs={b"system.posix_acl_access": ACL}),
        b"nanos": reg(content_for("nanos", 4096), mtime_ns=1_234_567_890_123_456_789),
        b"dup1": reg(b"same content"),
        b"dup2": reg(b"same content"),
    })
    bin_.children.update({b"busybox": busybox, b"sh": busybox, b"ls": busybox,
                          b"plain": reg(content_for("plain", 5000), perm=0o2755)})
    deep.children[b"alias"] = busybox  # a hardlink in another directory
    deep.children[b"sub"] = directory(xattrs={b"trusted.t": b"v" * 300})
    dev.children.update({
        b"null": Node(mode=stat.S_IFCHR | 0o666, rdev=os.makedev(1, 3), mtime_ns=EPOCH),
        b"sda": Node(mode=stat.S_IFBLK | 0o660, rdev=os.makedev(8, 1), gid=6, mtime_ns=EPOCH),
        b"huge": Node(mode=stat.S_IFCHR | 0o600, rdev=os.makedev(4095, 1048575), mtime_ns=EPOCH),
        b"fifo": Node(mode=stat.S_IFIFO | 0o620, xattrs={b"trusted.f": b"v" * 1000},
                      mtime_ns=EPOCH),
        b"sock": Node(mode=stat.S_IFSOCK | 0o755, mtime_ns=EPOCH),
    })
    esc.children.update({
        # Image xattrs in overlayfs's namespace: escaped in the image, so overlayfs
        # shows them back as they were and does not act on them.
        b"fake-redirect": reg(b"", xattrs={b"trusted.overlay.redirect": b"/no/such",
                                           b"trusted.overlay.metacopy": b""}),
        b"real": reg(b"real content", xattrs={b"trusted.overlay.origin": b"\x00\x01"}),
    })
    ids.children[b"owned"] = reg(b"o", uid=65536, gid=4_294_967_294)
    ids.children[b"low"] = reg(b"l", uid=65535, gid=65535)
    # A directory over several blocks, names up to 255 bytes, with subdirectories.
    for name in sized_names(rng, 400, max_len=longest):
        many.children[name] = reg(b"") if len(name) % 3 else reg(name[:50])
    many.children[b"zz-subdir"] = directory(xattrs={b"user.x": b"y" * 100})
    # Many small directories: their inline tails land at every offset of a block.
    for i in range(120):
        d = directory(xattrs={b"user.pad": b"p" * rng.randint(1, 200)} if i % 2 else {})
        assert d.children is not None
        for name in sized_names(rng, rng.randint(0, 40), max_len=rng.choice([8, 60, longest])):
            d.children[name] = reg(b"")
        root.children[b"small-%03d" % i] = d
    # Many xattrs on one inode, and values spanning blocks.
    root.children[b"xattrs"] = reg(b"x", xattrs={b"user.k%03d" % i: b"%d" % i
                                                 for i in range(60 if portable else 300)})
    if not portable:
        root.children[b"big"] = big_file()
        root.children[b"bigx"] = reg(b"bx", xattrs={
            b"user.a": b"a" * 65535, b"user.b": b"b" * 60000, b"trusted.c": b"c" * 60000})
    return root


def manifest_of(root: Node, digest: str = "") -> Manifest:
    return Manifest(build_manifest(root, {"test": True}), digest)


def object_name(m: Manifest, ino: int) -> bytes:
    """The object path casfs-style: /<first 2 hex>/<hex> of the file's first chunk."""
    digest = m.chunks(ino)[0].digest
    return f"/{digest[:2]}/{digest}".encode()


def build(m: Manifest, path: Path, **kw: bool) -> ErofsInfo:
    return build_erofs(m, path, object_path=lambda ino: object_name(m, ino), **kw)


def write_objects(m: Manifest, layers: list[Path]) -> dict[bytes, bytes]:
    """Every non-empty file's content object, spread over the data layers. Returns
    path -> expected content; the 5 GiB file is a sparse object with markers (b"big")."""
    expected: dict[bytes, bytes] = {}
    for path, ino in m.walk():
        node = m.inode(ino)
        if not stat.S_ISREG(node.mode) or node.size == 0:
            continue
        name = object_name(m, ino)
        obj = layers[int(name[1:3], 16) % len(layers)] / os.fsdecode(name[1:])
        obj.parent.mkdir(parents=True, exist_ok=True)
        if node.size == BIG:
            with open(obj, "wb") as f:
                f.truncate(BIG)
                f.write(b"HEAD")
                f.seek(BIG - 4)
                f.write(b"TAIL")
            expected[path] = b"big"
        else:
            data = CONTENTS[m.chunks(ino)[0].digest]
            obj.write_bytes(data)
            expected[path] = data
    return expected


def escaped(name: bytes) -> bytes:
    if name.startswith(b"trusted.overlay."):
        return b"trusted.overlay.overlay." + name[len(b"trusted.overlay."):]
    return name


def expected_xattrs(m: Manifest, ino: int, *, raw: bool, drop_security: bool = False,
                    mkfs_semantics: bool = False) -> dict[bytes, bytes]:
    """The xattrs a path must show: on the raw EROFS mount, image xattrs escaped plus the
    overlay ones; through overlayfs, the image's own xattrs as they were."""
    out = {}
    for name, value in m.xattrs(ino).items():
        if drop_security and name.startswith(b"security."):
            continue
        out[escaped(name) if raw else name] = value
    node = m.inode(ino)
    if raw and stat.S_ISREG(node.mode) and node.size:
        out[b"trusted.overlay.metacopy"] = b""
        out[b"trusted.overlay.redirect"] = object_name(m, ino)
    return out


def read_xattrs(path: Path) -> dict[bytes, bytes]:
    return {os.fsencode(name): os.getxattr(path, name, follow_symlinks=False)
            for name in os.listxattr(path, follow_symlinks=False)}


def check_against_manifest(m: Manifest, mnt: Path, *, raw: bool,
                           drop_security: bool = False) -> int:
    """Every path of the manifest, as the mount shows it: type and mode bits, owner,
    size, link count, device number, mtime to the nanosecond, link target, xattrs,
    hardlinks sharing an inode, and directory listings. Returns the paths checked."""
    seen_ino: dict[int, int] = {}  # manifest ino -> st_ino
    checked = 0
    for path, ino in m.walk():
        node = m.inode(ino)
        p = Path(os.fsdecode(os.fsencode(mnt) + (path if path != b"/" else b"")))
        st = os.lstat(p)
        where = f"{path!r} (ino {ino})"
        assert st.st_mode == node.mode, where
        assert (st.st_uid, st.st_gid) == (node.uid, node.gid), where
        assert st.st_nlink == node.nlink, where
        assert st.st_mtime_ns == node.mtime_ns, where
        if stat.S_ISCHR(node.mode) or stat.S_ISBLK(node.mode):
            assert st.st_rdev == node.rdev, where
        if stat.S_ISLNK(node.mode):
            assert os.fsencode(os.readlink(p)) == m.readlink(ino), where
            assert st.st_size == node.count, where
        elif not stat.S_ISDIR(node.mode):
            assert st.st_size == node.size, where
        else:
            names = {os.fsencode(n) for n in os.listdir(p)}
            assert names == {name for _i, name, _c in m.entries(ino)}, where
        assert read_xattrs(p) == expected_xattrs(m, ino, raw=raw, drop_security=drop_security), where
        if ino in seen_ino:
            assert st.st_ino == seen_ino[ino], f"{where}: hardlink not sharing an inode"
        seen_ino[ino] = st.st_ino
        checked += 1
    # Distinct manifest inodes are distinct inodes in the mount.
    assert len(set(seen_ino.values())) == len(seen_ino)
    return checked


# -- the writer against the kernel and fsck.erofs ---------------------------------------------

@pytest.fixture(scope="module")
def full() -> Manifest:
    return manifest_of(full_tree(), "f" * 64)


def test_image_passes_fsck_and_mounts_as_the_manifest_says(full: Manifest, tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    info = build(full, image)
    assert image.stat().st_size == info.image_size == info.blocks * fmt.BLOCK_SIZE
    assert info.layout_version == EROFS_LAYOUT_VERSION
    assert info.inodes == full.n_inodes
    assert 0 < info.compact_inodes < info.inodes  # the common mtime is the epoch
    assert info.shared_xattrs >= 2  # metacopy, user.label, ...
    fsck(image)
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        checked = check_against_manifest(full, mnt, raw=True)
        assert checked == full.n_dirents + 1
        # The 5 GiB file: its real size, and no data in the image (chunks are holes).
        assert os.lstat(mnt / "big").st_size == BIG
        with open(mnt / "big", "rb") as f:
            f.seek(BIG - 10)
            assert f.read() == bytes(10)


def test_overlayfs_serves_content_from_data_layers(full: Manifest, tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    build(full, image)
    layers = [tmp_path / "objects", tmp_path / "more-objects"]
    for layer in layers:
        layer.mkdir()
    expected = write_objects(full, layers)
    require_kernel()
    with mounted_erofs(image, tmp_path / "lower") as lower, \
            mounted_overlay(lower, layers, tmp_path / "root") as root:
        check_against_manifest(full, root, raw=False)
        for path, data in expected.items():
            p = root / os.fsdecode(path[1:])
            with open(p, "rb") as f:
                if data == b"big":
                    assert f.read(4) == b"HEAD"
                    f.seek(BIG // 2)
                    assert f.read(4) == bytes(4)
                    f.seek(BIG - 4)
                    assert f.read() == b"TAIL"
                else:
                    assert f.read() == data, path
        # Hardlinks share an inode through overlayfs too.
        assert os.lstat(root / "bin/sh").st_ino == os.lstat(root / "deep/alias").st_ino
        # Escaped image xattrs are data, not overlayfs metadata: the fake redirect
        # is not followed, the escaped opaque marker hides nothing.
        assert (root / "esc/fake-redirect").read_bytes() == b""
        assert os.getxattr(root / "esc", "trusted.overlay.opaque") == b"y"
        assert (root / "esc/real").read_bytes() == b"real content"
        # Read-only all the way down.
        for attempt in (lambda: open(root / "bin/plain", "r+b"),
                        lambda: (root / "newfile").write_bytes(b"x"),
                        lambda: (root / "newdir").mkdir(),
                        lambda: (root / "empty").unlink(),
                        lambda: os.chmod(root / "empty", 0o600),
                        lambda: os.setxattr(root / "empty", "user.new", b"1")):
            with pytest.raises(OSError) as exc:
                attempt()
            assert exc.value.errno == errno.EROFS


def test_same_bytes_every_time(tmp_path: Path) -> None:
    m1 = manifest_of(full_tree(), "a" * 64)
    m2 = manifest_of(full_tree(), "a" * 64)
    first, _ = render_erofs(m1, object_path=lambda ino: object_name(m1, ino))
    second, _ = render_erofs(m2, object_path=lambda ino: object_name(m2, ino))
    assert first == second
    buf = io.BytesIO()
    build_erofs(m1, buf, object_path=lambda ino: object_name(m1, ino))
    assert buf.getvalue() == first
    build(m1, tmp_path / "img")
    assert (tmp_path / "img").read_bytes() == first
    assert list(tmp_path.iterdir()) == [tmp_path / "img"]  # no temp file left behind
    # Options and the manifest are part of what the bytes (and the UUID) depend on.
    no_sec, _ = render_erofs(m1, object_path=lambda ino: object_name(m1, ino),
                             drop_security_xattrs=True)
    assert no_sec != first
    other, _ = render_erofs(Manifest(m1.buf, "b" * 64), object_path=lambda i: object_name(m1, i))
    assert other != first and len(other) == len(first)


def test_drop_security_xattrs(full: Manifest, tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    build(full, image, drop_security_xattrs=True)
    fsck(image)
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        check_against_manifest(full, mnt, raw=True, drop_security=True)
        assert b"user.a" in read_xattrs(mnt / "bin/busybox")
        assert not any(n.startswith(b"security.") for n in read_xattrs(mnt / "bin/busybox"))


def test_trusted_overlay_xattrs_are_escaped(full: Manifest, tmp_path: Path) -> None:
    image = tmp_path / "img.erofs"
    build(full, image)
    require_kernel()
    (tmp_path / "objects").mkdir()
    write_objects(full, [tmp_path / "objects"])
    with mounted_erofs(image, tmp_path / "lower") as lower:
        assert read_xattrs(lower / "esc") == {
            b"trusted.overlay.overlay.opaque": b"y",
            b"trusted.overlay.overlay.overlay.x": b"2"}
        assert read_xattrs(lower / "esc/fake-redirect") == {
            b"trusted.overlay.overlay.redirect": b"/no/such",
            b"trusted.overlay.overlay.metacopy": b""}
        with mounted_overlay(lower, [tmp_path / "objects"], tmp_path / "root") as root:
            assert read_xattrs(root / "esc") == {
                b"trusted.overlay.opaque": b"y", b"trusted.overlay.overlay.x": b"2"}
            assert read_xattrs(root / "esc/real") == {b"trusted.overlay.origin": b"\x00\x01"}
            assert read_xattrs(root / "bin/plain") == {}  # overlayfs's own: hidden


# -- directories ----------------------------------------------------------------------------

def _names_filling(total: int, rng: random.Random) -> list[bytes]:
    """Names whose dirents (12 bytes + name each), with "." and "..", take exactly
    total bytes."""
    left = total - 13 - 14
    names = []
    while left:
        # Each name: a 5-digit serial and padding, 17 to 267 dirent bytes.
        size = left if left <= 267 else rng.randint(17, min(267, left - 17))
        names.append(b"%05d" % len(names) + b"q" * (size - 17))
        left -= size
    return names


@pytest.mark.parametrize("entries_bytes", [
    fmt.BLOCK_SIZE,  # exactly one full block: no tail, a data block
    2048, 2049,  # the inline limit and one byte over
    3 * fmt.BLOCK_SIZE,
    3 * fmt.BLOCK_SIZE + 100,
])
def test_directory_block_boundaries(entries_bytes: int, tmp_path: Path) -> None:
    rng = random.Random(entries_bytes)
    root = directory()
    assert root.children is not None
    d = directory()
    assert d.children is not None
    names = _names_filling(entries_bytes, rng)
    for name in names:
        d.children[name] = reg(b"")
    root.children[b"d"] = d
    root.children[b"x" * 255] = reg(b"after")
    m = manifest_of(root)
    image = tmp_path / "img"
    build(m, image)
    fsck(image)
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        # A block takes entries while they fit (mkfs.erofs does the same): the size is
        # the full blocks before the last, plus what the last one holds.
        size = used = 0
        for name in sorted([*names, b".", b".."]):
            if used + 12 + len(name) > fmt.BLOCK_SIZE:
                size += fmt.BLOCK_SIZE
                used = 0
            used += 12 + len(name)
        assert os.lstat(mnt / "d").st_size == size + used
        if entries_bytes <= fmt.BLOCK_SIZE:
            assert size + used == entries_bytes
        check_against_manifest(m, mnt, raw=True)


def test_large_directory(tmp_path: Path) -> None:
    rng = random.Random(3)
    root = directory()
    assert root.children is not None
    big = directory()
    assert big.children is not None
    names = sized_names(rng, 5000)
    for i, name in enumerate(names):
        big.children[name] = directory() if i % 97 == 0 else reg(b"")
    root.children[b"big"] = big
    m = manifest_of(root)
    image = tmp_path / "img"
    info = build(m, image)
    assert info.dirents == 5001
    fsck(image)
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        listed = sorted(os.fsencode(n) for n in os.listdir(mnt / "big"))
        assert listed == names
        for name in names:  # lookups binary-search the blocks: every name found
            assert (mnt / "big" / os.fsdecode(name)).is_dir() == (names.index(name) % 97 == 0)
        assert not (mnt / "big" / "no-such-name").exists()
        assert not (mnt / "big" / ("~" * 255)).exists()  # sorts after every name


@pytest.mark.parametrize("seed", range(6))
def test_random_trees(seed: int, tmp_path: Path) -> None:
    """Random shapes put inode tails, xattr areas and directory blocks at every offset."""
    rng = random.Random(seed)
    root = directory()

    def fill(d: Node, depth: int) -> None:
        assert d.children is not None
        for name in sized_names(rng, rng.randint(0, 60), max_len=rng.choice([10, 100, 255])):
            roll = rng.random()
            xattrs = ({b"trusted.r%d" % i: rng.randbytes(rng.randint(0, 3000))
                       for i in range(rng.randint(1, 4))} if rng.random() < 0.3 else {})
            kw = {"uid": rng.choice([0, 1000, 70000]), "mtime_ns": rng.choice(
                [EPOCH, EPOCH, rng.randint(-2**40, 2**62)]), "xattrs": xattrs}
            if roll < 0.15 and depth < 3:
                sub = directory(**{k: v for k, v in kw.items() if k != "xattrs"})
                sub.xattrs = xattrs
                d.children[name] = sub
                fill(sub, depth + 1)
            elif roll < 0.3:
                d.children[name] = Node(mode=stat.S_IFLNK | 0o777, target=rng.randbytes(
                    rng.randint(1, 4095)).replace(b"\0", b"z"), **kw)  # type: ignore[arg-type]
            else:
                d.children[name] = reg(rng.randbytes(rng.randint(0, 3)), **kw)

    fill(root, 0)
    m = manifest_of(root)
    image = tmp_path / "img"
    build(m, image)
    fsck(image)
    assert kernel_mode_obstacle(m) is None
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        check_against_manifest(m, mnt, raw=True)


# -- mkfs.erofs as a second opinion ---------------------------------------------------------

def materialize(m: Manifest, dest: Path) -> None:
    """The manifest's tree on disk as mkfs.erofs must see it to make the same image:
    overlay xattrs set, regular files sparse at their size, every attribute applied."""
    dest.mkdir()
    made: dict[int, bytes] = {}
    dirs = []
    for path, ino in m.walk():
        node = m.inode(ino)
        p = os.fsencode(dest) + (path if path != b"/" else b"")
        if ino in made:
            os.link(made[ino], p)
            continue
        made[ino] = p
        kind = stat.S_IFMT(node.mode)
        if path != b"/":
            if kind == stat.S_IFDIR:
                os.mkdir(p)
            elif kind == stat.S_IFREG:
                with open(p, "wb") as f:
                    f.truncate(node.size)
            elif kind == stat.S_IFLNK:
                os.symlink(m.readlink(ino), p)
            else:
                os.mknod(p, node.mode, node.rdev)
        # In this order: chown clears setuid bits and security.capability.
        os.chown(p, node.uid, node.gid, follow_symlinks=False)
        if kind != stat.S_IFLNK:
            os.chmod(p, stat.S_IMODE(node.mode))
        for name, value in expected_xattrs(m, ino, raw=True).items():
            os.setxattr(p, name, value, follow_symlinks=False)
        if kind == stat.S_IFDIR:
            dirs.append((p, node.mtime_ns))
        else:
            os.utime(p, ns=(node.mtime_ns, node.mtime_ns), follow_symlinks=False)
    for p, mtime in reversed(dirs):  # after their contents were made
        os.utime(p, ns=(mtime, mtime))


def snapshot(mnt: Path) -> dict[bytes, tuple[object, ...]]:
    """Everything a mounted tree shows, by path; hardlinks as the first path of their inode."""
    out: dict[bytes, tuple[object, ...]] = {}
    first_path: dict[int, bytes] = {}
    base = os.fsencode(mnt)
    for top, dirnames, filenames in os.walk(base):
        for name in [b"", *dirnames, *filenames] if top == base else [*dirnames, *filenames]:
            p = os.path.join(top, name) if name else top
            rel = p[len(base):] or b"/"
            st = os.lstat(p)
            link = first_path.setdefault(st.st_ino, rel)
            out[rel] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_rdev,
                        st.st_mtime_ns, st.st_blocks, link,
                        os.readlink(p) if stat.S_ISLNK(st.st_mode) else None,
                        read_xattrs(Path(os.fsdecode(p))))
    return out


def test_same_tree_as_mkfs_erofs(tmp_path: Path) -> None:
    require_kernel()  # materializing needs root (devices, owners, trusted.* xattrs)
    mkfs = require_tool("mkfs.erofs")
    m = manifest_of(full_tree(portable=True))
    tree = tmp_path / "tree"
    materialize(m, tree)
    theirs = tmp_path / "mkfs.erofs"
    result = subprocess.run([mkfs, "--quiet", "--preserve-mtime", os.fspath(theirs),
                             os.fspath(tree)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    ours = tmp_path / "casfs.erofs"
    build(m, ours)
    fsck(theirs)
    fsck(ours)
    with mounted_erofs(theirs, tmp_path / "theirs") as a, mounted_erofs(ours, tmp_path / "ours") as b:
        expected, got = snapshot(a), snapshot(b)
        assert got.keys() == expected.keys()
        for path in expected:
            assert got[path] == expected[path], path
        assert len(expected) == m.n_dirents + 1


# -- what cannot be served, and hostile manifests ---------------------------------------------

def one_node(node: Node, name: bytes = b"x") -> Manifest:
    root = directory()
    assert root.children is not None
    root.children[name] = node
    return manifest_of(root)


def test_kernel_mode_obstacle_and_unsupported(tmp_path: Path) -> None:
    assert kernel_mode_obstacle(manifest_of(full_tree())) is None
    whiteout = one_node(Node(mode=stat.S_IFCHR | 0o644, rdev=0))
    reason = kernel_mode_obstacle(whiteout)
    assert reason and "whiteout" in reason and "\n" not in reason
    build(whiteout, tmp_path / "w")  # a valid EROFS image; overlayfs is what misreads it
    if kernel_unavailable_reason() is None:
        with mounted_erofs(tmp_path / "w", tmp_path / "lower") as lower:
            assert stat.S_ISCHR(os.lstat(lower / "x").st_mode)
            (tmp_path / "objects").mkdir()
            with mounted_overlay(lower, [tmp_path / "objects"], tmp_path / "root") as root:
                assert not os.path.lexists(root / "x")  # why it is an obstacle
    unsupported = [
        Node(mode=stat.S_IFCHR | 0o644, rdev=os.makedev(5000, 1)),
        Node(mode=stat.S_IFBLK | 0o644, rdev=os.makedev(1, 1 << 21)),
        Node(mode=stat.S_IFLNK | 0o777, target=b"t" * 4096),
        Node(mode=stat.S_IFLNK | 0o777, target=b""),
        reg(b"", xattrs={b"user.v": b"v" * 65536}),
        reg(b"", xattrs={b"system.foo": b"1"}),
        reg(b"", xattrs={b"user.": b"1"}),
        reg(b"", xattrs={b"odd": b"1"}),
        reg(b"", xattrs={b"system.posix_acl_access": b"\x02\0\0\0\x01"}),
        reg(b"", xattrs={b"user.%d" % i: b"v" * 60000 for i in range(5)}),
        reg(b"z", xattrs={b"user.%d" % i: b"v" * 65500 for i in range(4)}),
    ]
    for i, node in enumerate(unsupported):
        m = one_node(node)
        reason = kernel_mode_obstacle(m)
        assert reason and "\n" not in reason, i
        with pytest.raises(ErofsUnsupported):
            build(m, tmp_path / "u")
    # Exactly at the limits: served.
    for node in (reg(b"", xattrs={b"user.v": b"v" * 65535}),
                 reg(b"", xattrs={b"user.%d" % i: b"v" * 65000 for i in range(4)}),
                 Node(mode=stat.S_IFLNK | 0o777, target=b"t" * 4095)):
        m = one_node(node)
        assert kernel_mode_obstacle(m) is None
        build(m, tmp_path / "ok")
        fsck(tmp_path / "ok")
    # Dropped security xattrs are no obstacle.
    bad_sec = one_node(reg(b"", xattrs={b"security.big": b"v" * 65536}))
    assert kernel_mode_obstacle(bad_sec) is not None
    assert kernel_mode_obstacle(bad_sec, drop_security_xattrs=True) is None
    build(bad_sec, tmp_path / "s", drop_security_xattrs=True)


def test_object_paths_are_checked(tmp_path: Path) -> None:
    m = one_node(reg(b"data"))
    for bad in (b"relative/path", b"/nul\0inside", "/str", b"/" + b"o" * 400):
        with pytest.raises(ErofsUnsupported):
            build_erofs(m, tmp_path / "img", object_path=lambda _ino, p=bad: p)  # type: ignore[misc]
    assert not (tmp_path / "img").exists()


def _patched(m: Manifest, old: bytes, new: bytes) -> Manifest:
    """The manifest with one string in its string table replaced (same length)."""
    assert len(old) == len(new)
    buf = bytearray(m.buf)
    fields = HEADER.unpack_from(buf, 0)
    strings = section_offsets(fields[8], fields[3], fields[4], fields[5], fields[6])[5]
    at = buf.index(old, strings)
    buf[at:at + len(old)] = new
    return Manifest(bytes(buf))


def test_hostile_manifests_are_refused(tmp_path: Path) -> None:
    root = directory()
    assert root.children is not None
    sub = directory()
    assert sub.children is not None
    sub.children[b"bbbb"] = reg(b"")
    root.children.update({b"aaaa": reg(b""), b"cccc": reg(b""), b"dir1": sub})
    m = manifest_of(root)
    build(m, tmp_path / "fine")
    for old, new in ((b"cccc", b"aaaa"),  # duplicate name
                     (b"cccc", b"a/cc"),  # slash
                     (b"cccc", b"aa\0a"),  # NUL
                     (b"aaaa", b"zzzz")):  # unsorted: lookups would miss
        with pytest.raises(ManifestError):
            build(_patched(m, old, new), tmp_path / "bad")
    # Dirent pointing past the inode table, and a directory with two parents.
    buf = bytearray(m.buf)
    fields = HEADER.unpack_from(buf, 0)
    _meta, inodes, dirents, *_rest = section_offsets(
        fields[8], fields[3], fields[4], fields[5], fields[6])
    n_dirents = fields[4]
    for index in range(n_dirents):
        ino_at = dirents + 12 * index + 8
        for value in (fields[3] + 1, 0):
            bad = bytearray(buf)
            struct.pack_into("<I", bad, ino_at, value)
            with pytest.raises(ManifestError):
                build(Manifest(bytes(bad)), tmp_path / "bad")
    dir1 = m.resolve(b"/dir1")
    bad = bytearray(buf)
    struct.pack_into("<I", bad, dirents + 8, dir1)  # /aaaa -> the directory /dir1 too
    with pytest.raises(ManifestError):
        build(Manifest(bytes(bad)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_names_never_overflow_a_block(tmp_path: Path) -> None:
    """The largest dirents (255-byte names) pack 15 to a block; lookups and listings of
    a directory whose every block is as full as it gets, with tails of every size."""
    root = directory()
    assert root.children is not None
    for count in (1, 14, 15, 16, 29, 30, 31, 151):
        d = directory()
        assert d.children is not None
        for i in range(count):
            d.children[(b"%03d" % i) * 85] = reg(b"")
        root.children[b"d%03d" % count] = d
    m = manifest_of(root)
    image = tmp_path / "img"
    build(m, image)
    fsck(image)
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        check_against_manifest(m, mnt, raw=True)


# -- scale -------------------------------------------------------------------------------------

def hundred_k_tree() -> Node:
    """100,001 entries shaped like a Python image: 1,000 packages of 99 files (a tenth
    symlinks, a few with xattrs) under the root."""
    root = directory()
    assert root.children is not None
    k = 0
    for d in range(1000):
        pkg = directory()
        assert pkg.children is not None
        root.children[b"pkg%04d" % d] = pkg
        for f in range(99):
            k += 1
            if f % 10 == 9:
                pkg.children[b"link_%02d" % f] = Node(
                    mode=stat.S_IFLNK | 0o777, target=b"../pkg0000/mod_%02d.py" % f,
                    mtime_ns=EPOCH)
            else:
                size = (k * 7919) % 100_000 + 1
                digest = blake3.blake3(b"%d" % k).hexdigest()
                pkg.children[b"mod_%02d.py" % f] = Node(
                    mode=stat.S_IFREG | 0o644, size=size, chunks=[Chunk(digest, 0, size)],
                    mtime_ns=EPOCH + k % 3, xattrs={b"user.x": b"1"} if f % 50 == 0 else {})
    return root


def test_100k_entries_build_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = manifest_of(hundred_k_tree(), "c" * 64)
    assert m.n_dirents == 100_000
    image = tmp_path / "img"
    paths = {ino: object_name(m, ino) for _p, ino in m.walk()
             if stat.S_ISREG(m.inode(ino).mode) and m.inode(ino).size}
    in_memory, to_file = [], []
    for _ in range(3):
        start = time.perf_counter()
        _image, info = render_erofs(m, object_path=paths.__getitem__)
        in_memory.append(time.perf_counter() - start)
        del _image
        start = time.perf_counter()
        build_erofs(m, image, object_path=paths.__getitem__)
        to_file.append(time.perf_counter() - start)
    start = time.perf_counter()
    obstacle = kernel_mode_obstacle(m)
    check_s = time.perf_counter() - start
    assert obstacle is None
    with capsys.disabled():
        print(f"\nEROFS build, {m.n_dirents + 1:,} entries (3 runs): in memory "
              f"{', '.join(f'{s:.3f}' for s in in_memory)} s; to a file (fsync) "
              f"{', '.join(f'{s:.3f}' for s in to_file)} s; kernel_mode_obstacle "
              f"{check_s:.3f} s; image {info.image_size / 1e6:.1f} MB, "
              f"{info.compact_inodes:,} compact inodes, {info.shared_xattrs} shared xattrs")
    fsck(image)
    require_kernel()
    with mounted_erofs(image, tmp_path / "mnt") as mnt:
        count = sum(len(dirs) + len(files) for _t, dirs, files in os.walk(mnt))
        assert count == m.n_dirents
        check_inos = [ino for _p, ino in m.walk()][::997]
        paths = {ino: p for p, ino in m.walk()}
        for ino in check_inos:
            st = os.lstat(os.fsencode(mnt) + paths[ino] if paths[ino] != b"/" else mnt)
            assert st.st_mode == m.inode(ino).mode and st.st_mtime_ns == m.inode(ino).mtime_ns


def test_root_inode_is_root(full: Manifest) -> None:
    image, _info = render_erofs(full, object_path=lambda ino: object_name(full, ino))
    sb = fmt.SUPERBLOCK.unpack_from(image, fmt.SUPER_OFFSET)
    assert sb[0] == fmt.SUPER_MAGIC and sb[3] == fmt.BLOCK_BITS
    root_nid = sb[5]
    fmt_bits, _icount, mode = struct.unpack_from("<HHH", image, root_nid * 32)
    assert stat.S_ISDIR(mode) and mode == full.inode(ROOT_INO).mode
