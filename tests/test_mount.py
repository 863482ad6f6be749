"""Real mounts: `casfs mount` in the background, read through the kernel, `casfs umount`.

The mounted tree is compared with umoci's extraction of the same image; a Python
interpreter and numpy run from a mount; several mounts share one cache while it
evicts; the cache and the store are damaged; the store goes away mid-read and comes
back; the daemon is killed; counters are read back. Every mount is taken down by
tests/mounthelp.py, which also checks that no mount and no daemon are left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import site
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import blake3
import pytest

from casfs.store.content import blob_key
from casfs.testing import ocibuild as ob
from casfs.testing.ocibuild import (
    Member,
    directory,
    file,
    hardlink,
    opaque_whiteout,
    parent_dirs,
    symlink,
    whiteout,
)
from casfs.testing.proxy import LatencyProxy
from casfs.testing.seaweed import free_ports
from indexer.chunking import SMALL_CHUNK as CHUNK_SIZE
from tests.mounthelp import (
    abort_fuse,
    build_and_index,
    clear_leftovers,
    cli,
    drop_file_cache,
    force_cleanup,
    in_ci,
    is_mounted,
    mount_entry,
    mounted,
    process_alive,
    read_in_subprocess,
    require_fuse,
    require_mode,
    start_mount,
    unmount_checked,
    wait_gone,
)
from tests.reference import diff_snapshots, snapshot, umoci_unpack

pytestmark = pytest.mark.fuse

# A v2 file capability (cap_net_bind_service, permitted), as stored in security.capability.
CAP = bytes([1, 0, 0, 2, 0, 4, 0, 0]) + bytes(12)


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


_PUBLIC_DIRS: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A safety net over the per-test cleanup: no mount of this module may outlive it."""
    yield
    left = []
    for base in [tmp_path_factory.getbasetemp(), *_PUBLIC_DIRS]:
        left += clear_leftovers(base)
    assert left == [], f"mounts left behind (now cleared): {left}"


def h(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def read_file(path: Path | str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def file_url(path: Path) -> str:
    return f"file://{path}"


#: For tests that count store requests exactly: no trace replay, no readahead guesses, no
#: trace saved for later mounts of the same image.
EXACT = ("--no-prefetch", "--no-trace")
ROOTFS = ("--suid", "--dev")  # a container rootfs: the image exactly, setuid and devices too


def from_store(metrics: dict[str, Any]) -> int:
    """Chunks a mount got from the store, on demand or by prefetch."""
    return metrics["fetches"] + metrics.get("prefetch_chunks", 0)


# -- the layer-rules image --------------------------------------------------------------------

BIG = rnd(CHUNK_SIZE * 3 + 12345, 1)


def rules_layers() -> list[list[Member]]:
    """Whiteouts, opaque directories, hardlinks within and across layers, devices, fifos,
    xattrs on files and directories, special permission bits, multi-chunk files."""
    base = [
        directory("a", mtime=100), file("a/x", "x"), file("a/y", "y"),
        file("b", "b"),
        directory("c"), directory("c/sub"), file("c/sub/deep", "deep"), file("c/f", "f"),
        symlink("link", "b"),
        directory("d", mode=0o750, mtime=111), file("d/a", "a"), file("d/b", "old b"),
        directory("d/sub"), file("d/sub/c", "c"),
        directory("e"), file("e/gone", "gone"),
        directory("bin"), file("bin/tool", "multi-call", mode=0o755),
        *[hardlink(f"bin/alias{i}", "bin/tool") for i in range(3)],
        directory("etc"), file("etc/single", "one"), hardlink("etc/pair", "etc/single"),
        file("etc/shared", "shared"), hardlink("etc/shared2", "etc/shared"),
        directory("dev"),
        Member("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        Member("dev/sda1", "block", devmajor=8, devminor=1, mode=0o660, gid=6),
        Member("dev/big", "char", devmajor=4095, devminor=1048575, mode=0o600),
        Member("dev/fifo", "fifo", mode=0o620, uid=3),
        directory("tmp", mode=0o1777), directory("shared", mode=0o2775, gid=50),
        file("suid", "s", mode=0o4755), file("sgid", "g", mode=0o2711),
        file("all", "a", mode=0o7777), file("none", "n", mode=0o000),
        file("shared/f", "f", uid=1000, gid=1000, mode=0o640),
        directory("x", xattrs={"user.dir": "on a directory", "user.old": "o"}),
        file("x/f", "f", xattrs={"user.a": "1", "user.bin": b"\x00\xff\x80", "trusted.t": "tv",
                                 "security.capability": CAP}),
        symlink("x/s", "f", xattrs={"trusted.sym": "s"}),
        Member("x/p", "fifo", xattrs={"trusted.fifo": "p"}),
        directory("data"), file("data/big", BIG), file("data/empty", b""),
        file("data/exact", BIG[: CHUNK_SIZE * 2]), file("data/repeated", rnd(CHUNK_SIZE, 2) * 3),
        symlink("abs", "/etc/passwd"), symlink("dangling", "../nowhere"),
        symlink("long", "l" * 300),
        *parent_dirs("deep/er/and/deeper/x", mode=0o711), file("deep/er/and/deeper/x", "deep"),
    ]
    upper = [
        whiteout("a/x"), whiteout("c"), whiteout("link"), whiteout("never-existed"),
        file("new", "new", uid=7, gid=8, mtime=12345),
        directory("d", mode=0o750, mtime=111), opaque_whiteout("d"),
        file("d/b", "new b"), directory("d/sub2"), file("d/sub2/n", "n"),
        directory("e"), file("e/fresh", "fresh"), opaque_whiteout("e"),
        directory("bin"), hardlink("bin/late", "bin/alias1"),
        directory("other"), hardlink("other/far", "bin/tool"),
        directory("etc"), file("etc/shared", "replaced"),
        directory("x", xattrs={"user.dir": "respecified", "user.new": "n"}),
        file("b", "b, upper"),
    ]
    return [base, upper]


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The layer-rules image: layout, umoci's extraction (snapshot) and a file store."""
    if shutil.which("umoci") is None:
        if in_ci():
            pytest.fail("umoci not installed (apt-get install umoci); required in CI")
        pytest.skip("umoci not installed (apt-get install umoci)")
    root = tmp_path_factory.mktemp("rules")
    store = root / "store"
    ref = build_and_index(root / "img", rules_layers(), file_url(store), name="rules")
    expected = snapshot(umoci_unpack(root / "img", "t", root / "bundle"))
    return {"root": root, "store": store, "ref": ref, "expected": expected}


def assert_same_tree(expected: dict, actual: dict) -> None:
    # umoci gives its rootfs directory its own mode and mtime; directory sizes are not recorded.
    diff = diff_snapshots(expected, actual, ignore_paths={"/"})
    assert diff == [], "mounted tree differs from umoci's extraction:\n" + "\n".join(diff)


# -- correctness --------------------------------------------------------------------------------

def test_mounted_tree_equals_umoci_extraction(rules: dict, tmp_path: Path, mode: str) -> None:
    expected = rules["expected"]
    with mounted(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache",
                 *ROOTFS, mode=mode) as m:
        actual = snapshot(m.mountpoint)
        assert_same_tree(expected, actual)
        # spot checks that the comparison covered what it should
        assert actual["/bin/late"]["nlink"] == 6 and actual["/bin/late"]["hardlink"] == "/bin/alias0"
        assert actual["/etc/shared2"]["nlink"] == 1 and actual["/etc/pair"]["nlink"] == 2
        assert actual["/suid"]["mode"] == 0o4755 and actual["/tmp"]["mode"] == 0o1777
        assert actual["/dev/big"]["rdev"] == (4095, 1048575)
        assert actual["/x/f"]["xattrs"]["security.capability"] == CAP
        assert actual["/x"]["xattrs"] == {"user.dir": b"respecified", "user.new": b"n"}
        assert actual["/data/big"]["hash"] == "blake3:" + h(BIG)
        assert "/a/x" not in actual and "/c" not in actual and "/d/a" not in actual
        assert actual["/new"]["mtime"] == 12345 and actual["/new"]["uid"] == 7
        # hardlinked names are one inode
        assert os.stat(m.path("bin/tool")).st_ino == os.stat(m.path("other/far")).st_ino
        # reads at odd offsets through the kernel
        with open(m.path("data/big"), "rb") as f:
            for off in (CHUNK_SIZE - 3, 2 * CHUNK_SIZE + 17, len(BIG) - 5):
                f.seek(off)
                assert f.read(4096) == BIG[off : off + 4096]
        assert os.readlink(m.path("long")) == "l" * 300
        vfs = os.statvfs(m.mountpoint)
        inodes = sum(1 for p, e in actual.items() if e.get("hardlink") in (None, p))
        assert vfs.f_namemax == 255
        if mode == "fuse":  # EROFS reports no inode count (f_files -1)
            assert vfs.f_files == inodes
        # a directory that is not a casfs root has no stats pseudo-xattr
        with pytest.raises(OSError) as info:
            os.getxattr(m.path("d"), "user.casfs.stats")
        assert info.value.errno == errno.ENODATA
        stats = m.stats()
        assert stats["metrics"]["io_errors"] == 0 and stats["metrics"]["fetch_errors"] == 0


def test_kernel_keeps_listings_and_opens_reach_casfs_once(rules: dict, tmp_path: Path) -> None:
    """With the patched pyfuse3 (third_party/pyfuse3, installed by scripts/install.sh),
    casfs puts the kernel in no-open mode: a second listing of a directory and every
    open after the first are answered by the kernel, and files still read right."""
    import pyfuse3

    if not getattr(pyfuse3, "INODE_FH_WITHOUT_OPEN", False):
        if in_ci():
            pytest.fail("pyfuse3 lacks the casfs inode-fh patch; scripts/install.sh installs it")
        pytest.skip("pyfuse3 lacks the casfs inode-fh patch (scripts/install_pyfuse3.sh)")
    expected = rules["expected"]
    with mounted(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache", mode="fuse") as m:
        first = snapshot(m.mountpoint)
        after_first = m.stats()
        assert after_first["mount"]["kernel_no_open"] is True
        second = snapshot(m.mountpoint)  # lists every directory and reads every file again
        after_second = m.stats()
        assert_same_tree(expected, first)
        assert_same_tree(expected, second)
        dirs = sum(1 for e in first.values() if e["type"] == "dir")
        assert after_first["metrics"]["readdirs"] >= dirs
        assert after_second["metrics"]["readdirs"] == after_first["metrics"]["readdirs"]
        assert after_second["metrics"]["opens"] == after_first["metrics"]["opens"] <= 2


@pytest.fixture
def public_dir() -> Any:
    """An empty directory every uid can reach (pytest's tmp_path is under a 0700 dir)."""
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="casfs-test-"))
    d.chmod(0o755)
    _PUBLIC_DIRS.append(d)
    yield d
    if not is_mounted(d / "mnt"):
        shutil.rmtree(d, ignore_errors=True)


def test_every_write_fails_with_erofs(rules: dict, tmp_path: Path, public_dir: Path, mode: str) -> None:
    with mounted(rules["ref"], public_dir / "mnt", file_url(rules["store"]),
                 tmp_path / "cache", *ROOTFS, mode=mode) as m:
        f, d = m.path("etc/single"), m.path("d")
        attempts = {
            "create": lambda: os.open(m.path("d/newfile"), os.O_CREAT | os.O_WRONLY, 0o644),
            "create-excl": lambda: open(m.path("brand-new"), "xb"),
            "open-write": lambda: os.open(f, os.O_WRONLY),
            "open-rdwr": lambda: os.open(f, os.O_RDWR),
            "open-append": lambda: os.open(f, os.O_WRONLY | os.O_APPEND),
            "open-trunc": lambda: os.open(f, os.O_RDONLY | os.O_TRUNC),
            "truncate": lambda: os.truncate(f, 0),
            "rename": lambda: os.rename(f, m.path("etc/renamed")),
            "rename-over": lambda: os.rename(f, m.path("etc/pair")),
            "chmod": lambda: os.chmod(f, 0o777),
            "chown": lambda: os.chown(f, 1, 1),
            "utime": lambda: os.utime(f, (1, 1)),
            "setxattr": lambda: os.setxattr(f, "user.new", b"v"),
            "removexattr": lambda: os.removexattr(m.path("x/f"), "user.a"),
            "mkdir": lambda: os.mkdir(m.path("newdir")),
            "rmdir": lambda: os.rmdir(m.path("tmp")),
            "unlink": lambda: os.unlink(f),
            "symlink": lambda: os.symlink("t", m.path("newlink")),
            "link": lambda: os.link(f, m.path("etc/hard")),
            "mknod": lambda: os.mknod(m.path("fifo2"), 0o600 | stat.S_IFIFO),
            "unlink-dir-entry": lambda: os.unlink(d / "b"),
        }
        wrong = {}
        for name, attempt in attempts.items():
            try:
                result = attempt()
            except OSError as exc:
                if exc.errno != errno.EROFS:
                    wrong[name] = errno.errorcode.get(exc.errno, exc.errno)
                continue
            if isinstance(result, int):
                os.close(result)
            elif result is not None:
                result.close()
            wrong[name] = "succeeded"
        assert wrong == {}, f"writes not refused with EROFS: {wrong}"
        # nothing changed
        assert read_file(f) == b"one" and os.stat(f).st_mode & 0o777 == 0o644
        assert sorted(os.listdir(d)) == ["b", "sub2"]
        assert os.access(f, os.R_OK) and not os.access(f, os.W_OK)
        # device nodes and fifos behave as on an extracted rootfs (the mount allows dev)
        with open(m.path("dev/null"), "wb") as null:
            null.write(b"to the real /dev/null")
        fd = os.open(m.path("dev/fifo"), os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
        # permissions are the image's, checked by the kernel for every uid
        probe = 'for p; do if cat "$p" >/dev/null 2>&1; then echo ok; else echo no; fi; done'
        paths = [str(m.path(p)) for p in ("shared/f", "etc/single", "none", "x/f", "dev/sda1")]
        as_1000 = subprocess.run(["/bin/sh", "-c", probe, "sh", *paths], capture_output=True,
                                 text=True, timeout=30, user=1000, group=1000, extra_groups=[])
        assert as_1000.stdout.split() == ["ok", "ok", "no", "ok", "no"], as_1000
        entry = mount_entry(m.mountpoint)
        assert entry is not None
        assert entry["fstype"] == {"fuse": "fuse.casfs", "kernel": "overlay"}[mode]
        opts = set(entry["options"].split(","))
        assert "ro" in opts and "nosuid" not in opts and "nodev" not in opts, opts  # --suid --dev
        if mode == "fuse":
            assert {"allow_other", "default_permissions"} <= set(entry["super_options"].split(","))


def test_nosuid_nodev_and_no_capabilities_by_default(rules: dict, tmp_path: Path, mode: str) -> None:
    with mounted(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache", mode=mode) as m:
        entry = mount_entry(m.mountpoint)
        assert entry is not None
        assert {"ro", "nosuid", "nodev"} <= set(entry["options"].split(","))
        with pytest.raises(PermissionError):
            open(m.path("dev/null"), "wb")
        # the bits are still reported as in the image
        assert os.stat(m.path("suid")).st_mode & 0o7777 == 0o4755
        # file capabilities are not shown (nor honoured: nosuid), other xattrs are
        assert "security.capability" not in os.listxattr(m.path("x/f"))
        with pytest.raises(OSError) as err:
            os.getxattr(m.path("x/f"), "security.capability")
        assert err.value.errno == errno.ENODATA


def test_overlayfs_stacks_a_writable_upper(rules: dict, tmp_path: Path, mode: str) -> None:
    with mounted(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache", mode=mode) as m:
        upper, work, merged = (tmp_path / n for n in ("upper", "work", "merged"))
        for p in (upper, work, merged):
            p.mkdir()
        proc = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={m.mountpoint},upperdir={upper},workdir={work}", str(merged)],
            capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"overlayfs refused the casfs mount as lowerdir: {proc.stderr.strip()}")
        try:
            (merged / "etc" / "added").write_text("upper")
            with open(merged / "data" / "big", "r+b") as f:  # copy-up reads the whole file
                f.seek(10)
                f.write(b"XYZ")
            os.unlink(merged / "etc" / "single")
            assert read_file(merged / "data" / "big") == BIG[:10] + b"XYZ" + BIG[13:]
            assert read_file(m.path("data/big")) == BIG
            assert (m.path("etc/single")).exists() and not (merged / "etc" / "single").exists()
            assert (upper / "etc" / "added").read_text() == "upper"
            assert read_file(merged / "bin" / "alias2") == b"multi-call"
        finally:
            subprocess.run(["umount", str(merged)], capture_output=True)


# -- a real program ------------------------------------------------------------------------------

def _site_packages() -> Path:
    return Path(site.getsitepackages()[0])


def test_python_imports_numpy_from_mount(tmp_path: Path, mode: str) -> None:
    """The image's own interpreter, libpython, stdlib and numpy, all served by the mount."""
    sp = _site_packages()
    if not (sp / "numpy").is_dir():
        if in_ci():
            pytest.fail(f"numpy is not installed in {sp}; required in CI")
        pytest.skip(f"numpy is not installed in {sp}")

    def exclude(rel: str) -> bool:
        parts = rel.split("/")
        return (parts[0] not in ("numpy", "numpy.libs") or "tests" in parts
                or "__pycache__" in parts)

    prefix = Path(sys.base_prefix)
    layers = [ob.python_prefix_layer(),
              ob.layer_from_directory(sp, prefix=str(sp), exclude=exclude, mtime=ob.DEFAULT_MTIME)]
    store = tmp_path / "store"
    ref = build_and_index(tmp_path / "img", layers, file_url(store), compression="none")
    script = (
        "import json, sys, numpy, json, ssl, sqlite3, decimal\n"
        "a = numpy.arange(1, 1001, dtype=numpy.float64)\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(json.dumps({'exe': sys.executable, 'numpy': numpy.__file__,"
        " 'ssl': ssl.__file__, 'sum': float(a.sum()), 'dot': float(a @ a),"
        " 'version': numpy.__version__, 'maps': maps}))\n"
    )
    # Prefetch other than readahead is kept out of the warm run's window, which bounds
    # readahead: no background stream (it runs until the boot ends), and a boot that does
    # not end during the test (in kernel mode its end starts the fetch of the rest of the
    # files it read through the view).
    with mounted(ref, tmp_path / "mnt", file_url(store), tmp_path / "cache", "--trace-idle",
                 "250", "--background-fetch", "off", mode=mode) as m:
        root = str(m.mountpoint) + str(prefix)
        env = {"PYTHONHOME": root, "LD_LIBRARY_PATH": f"{root}/lib", "PATH": "/usr/bin:/bin",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8"}
        python = f"{root}/bin/python3"

        def run() -> dict[str, Any]:
            proc = subprocess.run([python, "-c", script], env=env, capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr[-3000:]
            return json.loads(proc.stdout)

        cold = run()
        assert cold["exe"] == python
        assert cold["numpy"].startswith(root + "/lib/") and cold["ssl"].startswith(root)
        assert cold["sum"] == 500500.0 and cold["dot"] == sum(i * i for i in range(1, 1001))
        import numpy

        assert cold["version"] == numpy.__version__
        mapped = {line.split()[-1] for line in cold["maps"].splitlines() if root in line}
        assert any("libpython3" in p for p in mapped), "libpython was not mapped from the mount"
        assert any("_multiarray_umath" in p for p in mapped), "numpy's extension not from the mount"
        stats = m.stats()
        first = stats["metrics"]
        assert from_store(first) > 50 and first["io_errors"] == 0
        if mode == "fuse":
            assert first["negative_lookups"] > 10  # the kernel caches misses after one
        else:  # the kernel did every lookup; content came through the view, fetched
            assert first["lookups"] == 0 and stats["kernel"]["view_opens"] > 10

        # Warm: the kernel answers repeated lookups (found and missing names alike),
        # attributes and content itself; only opens and directory listings reach casfs.
        # (Another run may be attempted: something else on the machine dropping the
        # kernel's caches, `echo 3 > drop_caches` in a benchmark, would look the same.)
        few_reads = max(first["reads"] // 20, 5)
        for _attempt in range(3):
            before = m.stats()["metrics"]
            assert run()["sum"] == cold["sum"]
            after = m.stats()["metrics"]
            delta = {k: after[k] - before[k] for k in ("lookups", "negative_lookups", "getattrs",
                                                       "reads", "fetches", "prefetch_chunks")}
            if delta["lookups"] == 0 and delta["reads"] <= few_reads:
                break
        assert delta["fetches"] == 0, delta
        # a read that does reach the daemon may set sequential readahead going (chunks
        # ahead of it that the first run never needed): bounded by the readahead window
        assert delta["prefetch_chunks"] <= 16 * delta["reads"], delta
        assert delta["lookups"] == delta["negative_lookups"] == delta["getattrs"] == 0, delta
        # a read or two may still reach the daemon (pages of a mapped library not touched
        # on the first run), never the whole import again
        assert delta["reads"] <= few_reads, (delta, first["reads"])


# -- sharing, eviction ---------------------------------------------------------------------------

def _reader_threads(jobs: list[tuple[Path, bytes]], threads: int, rounds: int,
                    drop: bool) -> list[str]:
    """Read every (path, expected) job in random order from several threads; returns errors."""
    errors: list[str] = []
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(rounds):
            order = jobs[:]
            rng.shuffle(order)
            for path, expected in order:
                try:
                    if rng.random() < 0.5:
                        data = read_file(path)
                        ok = data == expected
                    else:
                        off = rng.randrange(0, max(len(expected), 1))
                        size = rng.randrange(1, CHUNK_SIZE * 2)
                        with open(path, "rb") as f:
                            data = os.pread(f.fileno(), size, off)
                        ok = data == expected[off : off + size]
                    if not ok:
                        with lock:
                            errors.append(f"{path}: wrong bytes")
                    if drop:
                        drop_file_cache(path)
                except OSError as exc:
                    with lock:
                        errors.append(f"{path}: {exc}")

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
        if t.is_alive():
            errors.append("a reader thread did not finish in 120 s")
    return errors


def test_concurrent_readers_two_mounts_one_cache(tmp_path: Path, mode: str) -> None:
    shared = {f"shared/{i}": rnd(CHUNK_SIZE + 1000 * i, 100 + i) for i in range(8)}
    only_a = {f"a/{i}": rnd(50_000 + i, 200 + i) for i in range(8)}
    only_b = {f"b/{i}": rnd(CHUNK_SIZE * 2 + i, 300 + i) for i in range(6)}
    big = rnd(CHUNK_SIZE * 6, 400)

    def members(files: dict[str, bytes]) -> list[Member]:
        dirs = sorted({p.split("/")[0] for p in files})
        return [*map(directory, dirs), *(file(p, data) for p, data in files.items()),
                file("big", big)]

    # a directory far larger than one readdir reply: listed in many calls with offsets
    many = [f"{i:05}-{'n' * 60}" for i in range(2500)]

    store = tmp_path / "store"
    files_a, files_b = {**shared, **only_a}, {**shared, **only_b}
    ref_a = build_and_index(tmp_path / "img-a", [[*members(files_a), directory("many"),
                                                  *(file(f"many/{n}", n) for n in many)]],
                            file_url(store))
    ref_b = build_and_index(tmp_path / "img-b", [members(files_b)], file_url(store))
    cache = tmp_path / "cache"
    with (mounted(ref_a, tmp_path / "mnt-a", file_url(store), cache, mode=mode) as ma,
          mounted(ref_b, tmp_path / "mnt-b", file_url(store), cache, mode=mode) as mb):
        jobs = [(ma.path(p), d) for p, d in {**files_a, "big": big}.items()]
        jobs += [(mb.path(p), d) for p, d in {**files_b, "big": big}.items()]
        errors = _reader_threads(jobs, threads=16, rounds=3, drop=True)
        assert errors == []
        assert sorted(os.listdir(ma.path("many"))) == many
        with os.scandir(ma.path("many")) as it:
            assert sorted((e.name, e.stat().st_size) for e in it) == [(n, len(n)) for n in many]
        sa, sb = ma.stats(), mb.stats()
    unique = {}
    for data in [*shared.values(), *only_a.values(), *only_b.values(), big,
                 *(n.encode() for n in many)]:
        for i in range(0, len(data), CHUNK_SIZE):
            piece = data[i : i + CHUNK_SIZE]
            unique[h(piece)] = len(piece)
    fetched = from_store(sa["metrics"]) + from_store(sb["metrics"])
    # every chunk read came from the store once, or at most once per daemon (they share
    # the cache, not their in-flight fetches); the small files of many/ were never read,
    # but prefetch may fetch some of them as siblings
    read_chunks = len(unique) - len(many)
    assert read_chunks <= fetched <= len(unique) + len(shared) * 2 + 7
    assert sa["metrics"]["io_errors"] == sb["metrics"]["io_errors"] == 0
    assert sa["metrics"]["cache_hits"] + sb["metrics"]["cache_hits"] > 0
    # one cache: each chunk is held and counted once
    out = cli("cache", "stats", "--json", "--cache-dir", str(cache), check=True)
    info = json.loads(out.stdout)
    held = {f.name for d in (cache / "chunks").iterdir() for f in d.iterdir()}
    read = {h(d[i : i + CHUNK_SIZE])
            for d in [*shared.values(), *only_a.values(), *only_b.values(), big]
            for i in range(0, len(d), CHUNK_SIZE)}
    assert read <= held <= unique.keys()
    assert info["chunks"] == len(held) and info["chunk_bytes"] == sum(unique[d] for d in held)
    # kernel mode made the files of several chunks whole (read through the view, all
    # their chunks on the node): each object is the file's bytes, counted as well
    objects = [f for d in (cache / "objects").iterdir() for f in d.iterdir()]
    assert info["objects"] == len(objects) and (mode == "kernel") == bool(objects)
    assert info["bytes"] == info["chunk_bytes"] + info["object_bytes"]
    whole = {h(d) for d in [*shared.values(), *only_a.values(), *only_b.values(), big]}
    assert all(h(f.read_bytes()) in whole for f in objects)


def _chunk_bytes_on_disk(cache: Path) -> int:
    total = 0
    for sub in list((cache / "chunks").iterdir()):
        for f in list(sub.iterdir()):
            with contextlib.suppress(FileNotFoundError):
                total += f.stat().st_size
    return total


def test_eviction_under_a_small_cap_while_reading(tmp_path: Path, mode: str) -> None:
    files = {f"f/{i:02}": rnd(CHUNK_SIZE, 1000 + i) for i in range(40)}
    files.update({f"g/{i}": rnd(CHUNK_SIZE * 4, 2000 + i) for i in range(3)})
    store = tmp_path / "store"
    members = [directory("f"), directory("g"), *(file(p, d) for p, d in files.items())]
    ref = build_and_index(tmp_path / "img", [members], file_url(store))
    cap = 12 * CHUNK_SIZE  # 3 MiB; the image holds 52 chunks
    cache = tmp_path / "cache"
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _chunk_bytes_on_disk(cache))
            time.sleep(0.01)

    with mounted(ref, tmp_path / "mnt", file_url(store), cache, "--cache-size", str(cap), mode=mode) as m:
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            errors = _reader_threads([(m.path(p), d) for p, d in files.items()], threads=6,
                                     rounds=3, drop=True)
        finally:
            stop.set()
            sampler.join()
        assert errors == [], errors[:10]
        # once readahead started by the reads has settled, the index and the files agree
        deadline = time.monotonic() + 10
        while True:
            stats = m.stats()
            on_disk = _chunk_bytes_on_disk(cache)
            if on_disk == stats["cache"]["bytes"] == m.stats()["cache"]["bytes"]:
                break
            assert time.monotonic() < deadline, ("cache index and chunk files disagree",
                                                 on_disk, stats["cache"])
            time.sleep(0.1)
        c = stats["cache"]
        assert c["max_bytes"] == cap
        assert c["evictions"] > 0 and from_store(stats["metrics"]) > 52
        assert c["bytes"] <= cap
    # near the cap even while inserts and evictions race: at most the chunks the daemon's
    # 8 disk threads are inserting, and victims between their entry's and file's removal
    # (about one chunk over the cap here)
    assert peak[0] <= cap + 10 * CHUNK_SIZE, (peak[0] / CHUNK_SIZE, cap / CHUNK_SIZE)
    assert stats["metrics"]["io_errors"] == 0


# -- damage ---------------------------------------------------------------------------------------

def test_corrupted_cache_file_between_mounts(tmp_path: Path, mode: str) -> None:
    data = rnd(CHUNK_SIZE * 2 + 100, 5)
    store, cache = tmp_path / "store", tmp_path / "cache"
    ref = build_and_index(tmp_path / "img", [[file("f", data), file("g", b"g" * 5000)]],
                          file_url(store))
    with mounted(ref, tmp_path / "mnt", file_url(store), cache, *EXACT, mode=mode) as m:
        assert read_file(m.path("f")) == data
        assert m.stats()["metrics"]["fetches"] == 3
    digest = h(data[CHUNK_SIZE : 2 * CHUNK_SIZE])
    chunk = cache / "chunks" / digest[:2] / digest
    raw = bytearray(chunk.read_bytes())
    raw[12345] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    last = cache / "chunks" / h(data[2 * CHUNK_SIZE :])[:2] / h(data[2 * CHUNK_SIZE :])
    last.write_bytes(b"")  # truncated to nothing
    if mode == "kernel":
        # The kernel reads cache files without asking casfs (the trust model of
        # docs/security.md): f's whole object, made at the unmount, is what it would
        # read. Damage on disk is found by `casfs cache verify`, which drops it.
        (obj,) = [p for d in (cache / "objects").iterdir() for p in d.iterdir()]
        assert obj.read_bytes() == data
        obj.write_bytes(data[:-1] + b"?")
        verify = cli("cache", "verify", "--cache-dir", str(cache))
        assert verify.returncode == 5 and "3 damaged files dropped" in verify.stdout, verify
        assert not obj.exists() and not chunk.exists()
    with mounted(ref, tmp_path / "mnt", file_url(store), cache, *EXACT, mode=mode) as m:
        assert read_file(m.path("f")) == data
        stats = m.stats()
        assert stats["cache"]["corrupt_dropped"] == (2 if mode == "fuse" else 0)
        assert stats["metrics"]["fetches"] == 2 and stats["metrics"]["cache_hits"] >= 1
        if mode == "fuse":
            assert "corrupt" in m.log() and digest in m.log()
    assert chunk.read_bytes() == data[CHUNK_SIZE : 2 * CHUNK_SIZE]


def test_corrupted_blob_in_store_gives_eio_and_a_log_line(tmp_path: Path, mode: str) -> None:
    data = rnd(CHUNK_SIZE * 2, 6)
    store = tmp_path / "store"
    ref = build_and_index(tmp_path / "img", [[file("bad", data), file("good", b"fine")]],
                          file_url(store))
    digest = h(data[CHUNK_SIZE:])
    blob = store / blob_key(digest)
    good = blob.read_bytes()
    blob.write_bytes(good[:-8] + bytes(8))
    with mounted(ref, tmp_path / "mnt", file_url(store), tmp_path / "cache", mode=mode) as m:
        results = read_in_subprocess([m.path("bad"), m.path("good")], 30, m.mountpoint)
        assert results[0]["ok"] is False and results[0]["errno"] == errno.EIO, results[0]
        assert results[1]["ok"] and results[1]["hash"] == h(b"fine")
        # the part before the bad chunk reads fine; the bad range never yields bytes
        with open(m.path("bad"), "rb") as f:
            assert f.read(CHUNK_SIZE) == data[:CHUNK_SIZE]
            with pytest.raises(OSError) as info:
                f.read(100)
            assert info.value.errno == errno.EIO
        log = m.log()
        lines = [line for line in log.splitlines() if digest in line]
        assert lines, f"no log line names the corrupt blob {digest}:\n{log[-2000:]}"
        assert any("ERROR" in line for line in lines)
        stats = m.stats()["metrics"]
        assert stats["fetch_errors"] >= 1 and stats["io_errors"] >= 1
        # once the store is repaired, the same mount serves the file
        blob.write_bytes(good)
        drop_file_cache(m.path("bad"))
        assert read_file(m.path("bad")) == data


@pytest.mark.s3
def test_store_stopped_mid_read_then_recovers(tmp_path: Path, s3_bucket_url: str, mode: str) -> None:
    big = rnd(CHUNK_SIZE * 8, 7)
    other = rnd(CHUNK_SIZE * 2, 8)
    ref = build_and_index(tmp_path / "img", [[file("big", big), file("other", other)]],
                          s3_bucket_url)
    upstream = os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)
    host, port = upstream[0].removeprefix("http://"), int(upstream[1])
    proxy = LatencyProxy(host, port).start()
    listen_port = proxy.port
    env = {"AWS_ENDPOINT_URL": proxy.url, "CASFS_RETRY_DEADLINE": "1"}
    try:
        with mounted(ref, tmp_path / "mnt", s3_bucket_url, tmp_path / "cache", env=env, mode=mode) as m:
            with open(m.path("big"), "rb") as f:
                assert f.read(CHUNK_SIZE) == big[:CHUNK_SIZE]

            # the store answers every request with 503 SlowDown
            proxy.error_rate = 1.0
            t0 = time.monotonic()
            res = read_in_subprocess([m.path("other")], 30, m.mountpoint)[0]
            assert res["ok"] is False and res["errno"] == errno.EIO, res
            assert time.monotonic() - t0 < 15
            assert proxy.stats()["injected_errors"] >= 2  # it was retried

            # the store goes away entirely (connections refused) in the middle of a file
            proxy.stop()
            t0 = time.monotonic()
            res = read_in_subprocess([m.path("big")], 30, m.mountpoint)[0]
            assert res["ok"] is False and res["errno"] == errno.EIO, res
            assert time.monotonic() - t0 < 15
            assert "gave up after" in m.log()

            # it comes back on the same address: the same mount recovers
            proxy = LatencyProxy(host, port, listen_port=listen_port).start()
            res = read_in_subprocess([m.path("big"), m.path("other")], 60, m.mountpoint)
            assert [r.get("hash") for r in res] == [h(big), h(other)], res
            stats = m.stats()["metrics"]
            assert stats["fetch_errors"] >= 2 and stats["io_errors"] >= 2
    finally:
        proxy.stop()


# -- the daemon's life ------------------------------------------------------------------------

def test_kill_9_mid_read_then_a_fresh_mount_on_the_same_path(tmp_path: Path) -> None:
    """FUSE mode: the daemon killed while reads are fetching (kernel mode: below)."""
    mode = "fuse"
    files = {f"f{i:02}": rnd(CHUNK_SIZE + 4096 * i, 3000 + i) for i in range(32)}
    store, mnt, cache = tmp_path / "store", tmp_path / "mnt", tmp_path / "cache"
    ref = build_and_index(tmp_path / "img", [[file(p, d) for p, d in files.items()]],
                          file_url(store))
    m = start_mount(ref, mnt, file_url(store), cache, mode=mode)
    try:
        # readers in a child process (their reads fail once the daemon is gone)
        reader = subprocess.Popen([sys.executable, "-c", (
            "import sys, threading\n"
            "def r(p):\n"
            "    try: open(p, 'rb').read()\n"
            "    except OSError: pass\n"
            "ts = [threading.Thread(target=r, args=(p,)) for p in sys.argv[1:]]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"),
            *(str(m.path(p)) for p in files)])
        chunks = cache / "chunks"

        def cached() -> int:
            return sum(1 for d in list(chunks.iterdir()) for _ in d.iterdir())

        deadline = time.monotonic() + 10
        while cached() < 3 and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(m.pid, signal.SIGKILL)  # while chunks are being fetched and cached
        assert wait_gone(m.pid, 10)
        assert reader.wait(timeout=30) == 0
        assert 3 <= cached() < 64, cached()  # killed mid-read
        # stale: requests fail (a stat of the root may still be answered by the kernel's
        # attribute cache; statfs always asks the daemon)
        with pytest.raises(OSError) as info:
            os.statvfs(mnt)
        assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        assert is_mounted(mnt)
        stale = cli("stats", str(mnt))
        assert stale.returncode != 0 and "stale" in stale.stderr, stale.stderr

        m2 = start_mount(ref, mnt, file_url(store), cache, *EXACT, mode=mode)
        try:
            assert m2.pid != m.pid
            # whatever the killed daemon left in the cache is whole or absent
            errors = _reader_threads([(m2.path(p), d) for p, d in files.items()], threads=4,
                                     rounds=1, drop=False)
            assert errors == []
            stats = m2.stats()
            assert stats["cache"]["corrupt_dropped"] == 0
            assert stats["metrics"]["io_errors"] == 0
            # exactly one mount on the path: the stale one was cleared, not stacked over
            with open("/proc/self/mountinfo") as f:
                assert sum(1 for line in f if line.split()[4] == str(mnt)) == 1
        except BaseException:
            force_cleanup(mnt, m2.pid)
            raise
        unmount_checked(m2)
    finally:
        force_cleanup(mnt, m.pid)
    pruned = cli("cache", "prune", "--cache-dir", str(cache), check=True)
    assert "removed" in pruned.stdout



def test_kill_9_of_the_node_view_leaves_local_files_readable(tmp_path: Path) -> None:
    """Kernel mode: with the node view killed, what the node holds is still read by the
    kernel, right; a file it lacks fails (never wrong bytes); a remount replaces it all."""
    require_mode("kernel")
    local = {f"l{i}": rnd(5000 + i, 5000 + i) for i in range(8)}  # one chunk each
    big = rnd(CHUNK_SIZE * 3 + 7, 77)  # several chunks: an object made whole at unmount
    remote = {f"r{i}": rnd(7000 + i, 6000 + i) for i in range(4)}
    files = {**local, "big": big, **remote}
    store, mnt, cache = tmp_path / "store", tmp_path / "mnt", tmp_path / "cache"
    ref = build_and_index(tmp_path / "img", [[file(p, d) for p, d in files.items()]],
                          file_url(store))
    with mounted(ref, mnt, file_url(store), cache, *EXACT, mode="kernel") as m:
        for p in [*local, "big"]:
            assert read_file(m.path(p)) == files[p]
    m = start_mount(ref, mnt, file_url(store), cache, *EXACT, mode="kernel")
    try:
        os.kill(m.pid, signal.SIGKILL)
        assert wait_gone(m.pid, 10)
        wanted = [*local, "big"]
        res = read_in_subprocess([m.path(p) for p in wanted], 30, mnt)
        assert [r.get("hash") for r in res] == [h(files[p]) for p in wanted], res
        res = read_in_subprocess([m.path("r0")], 30, mnt)[0]
        assert res["ok"] is False and res["errno"] in (errno.ENOTCONN, errno.ECONNABORTED,
                                                       errno.EIO), res
        stale = cli("stats", str(mnt))
        assert stale.returncode != 0 and "stale" in stale.stderr, stale.stderr
        m2 = start_mount(ref, mnt, file_url(store), cache, *EXACT, mode="kernel")
        try:
            assert m2.pid != m.pid
            errors = _reader_threads([(m2.path(p), d) for p, d in files.items()], threads=4,
                                     rounds=1, drop=False)
            assert errors == []
            with open("/proc/self/mountinfo") as f:
                assert sum(1 for line in f if line.split()[4] == str(mnt)) == 1
        except BaseException:
            force_cleanup(mnt, m2.pid)
            raise
        unmount_checked(m2)
    finally:
        force_cleanup(mnt, m.pid)

def test_sigterm_unmounts_cleanly(rules: dict, tmp_path: Path, mode: str) -> None:
    m = start_mount(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache", mode=mode)
    try:
        assert read_file(m.path("b")) == b"b, upper"
        os.kill(m.pid, signal.SIGTERM)
        assert wait_gone(m.pid, 10), "daemon did not exit on SIGTERM"
        assert not is_mounted(m.mountpoint)
        assert "unmounted" in m.log()
    finally:
        force_cleanup(m.mountpoint, m.pid)


def test_umount_leaves_nothing_and_errors_are_clear(rules: dict, tmp_path: Path, mode: str) -> None:
    mnt = tmp_path / "mnt"
    m = start_mount(rules["ref"], mnt, file_url(rules["store"]), tmp_path / "cache", mode=mode)
    try:
        # a second mount on a live mountpoint is refused
        again = cli("mount", rules["ref"], str(mnt), "--store", file_url(rules["store"]),
                    "--cache-dir", str(tmp_path / "cache"), "--mode", mode)
        assert again.returncode != 0 and "already a mountpoint" in again.stderr, again.stderr
        assert process_alive(m.pid) and read_file(m.path("etc/pair")) == b"one"
        # a busy mount is not torn away: the error says why, and the mount keeps serving
        sleeper = subprocess.Popen(["sleep", "60"], cwd=m.path("etc"))
        try:
            busy = cli("umount", str(mnt))
            assert busy.returncode != 0 and "busy" in busy.stderr.lower(), busy.stderr
            assert is_mounted(mnt) and read_file(m.path("etc/pair")) == b"one"
        finally:
            sleeper.kill()
            sleeper.wait()
    except BaseException:
        force_cleanup(mnt, m.pid)
        raise
    unmount_checked(m)
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert not [line for line in ps.splitlines() if f" {mnt} " in line + " "]
    # unmounting again, or an unknown tag, fails with a message and a status
    again = cli("umount", str(mnt))
    assert again.returncode != 0 and "not mounted" in again.stderr
    bad = cli("mount", "no-such-tag", str(mnt), "--store", file_url(rules["store"]),
              "--cache-dir", str(tmp_path / "cache"), "--mode", mode)
    assert bad.returncode != 0 and "no-such-tag" in bad.stderr, bad.stderr
    assert not is_mounted(mnt)


def test_mount_failures_are_reported_to_the_caller(rules: dict, tmp_path: Path, mode: str) -> None:
    store, cache = file_url(rules["store"]), str(tmp_path / "cache")
    bad = cli("mount", "no-such-tag", str(tmp_path), "--store", store, "--cache-dir", cache,
              "--mode", mode)
    assert bad.returncode != 0 and "no-such-tag" in bad.stderr, bad.stderr
    (tmp_path / "file").write_text("")
    bad = cli("mount", rules["ref"], str(tmp_path / "file"), "--store", store, "--cache-dir", cache,
              "--mode", mode)
    assert bad.returncode != 0 and "not a directory" in bad.stderr, bad.stderr


# -- observability ------------------------------------------------------------------------------

def test_stats_and_prometheus_metrics(rules: dict, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    with mounted(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache",
                 "--metrics-port", str(port), *EXACT, mode="fuse") as m:
        assert read_file(m.path("data/big")) == BIG
        with contextlib.suppress(FileNotFoundError):
            os.stat(m.path("no-such-file"))
        os.listdir(m.path("etc"))
        text = cli("stats", str(m.mountpoint), check=True).stdout
        for word in ("lookup", "read", "node cache", "missing", "fetched"):
            assert word in text, text
        js = json.loads(cli("stats", str(m.mountpoint), "--json", check=True).stdout)
        mt = js["metrics"]
        assert mt["reads"] >= 1 and mt["read_bytes"] >= len(BIG)
        assert mt["fetches"] == 4 and mt["fetched_bytes"] > 0
        assert mt["negative_lookups"] >= 1 and mt["lookups"] >= 3 and mt["opens"] >= 1
        assert mt["fetch_latency"]["count"] == 4
        assert js["mount"]["digest"] == rules["ref"].split(":")[1]
        assert js["cache"]["bytes"] == len(BIG)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        assert "casfs_reads_total" in body or "casfs_reads " in body, body[:2000]
        for name in ("casfs_fetches", "casfs_cache_hits", "casfs_fetch_latency_seconds_bucket",
                     "casfs_cache_bytes"):
            assert name in body, name
        notmount = cli("stats", str(tmp_path))
        assert notmount.returncode != 0 and "not a casfs mount" in notmount.stderr


def test_metrics_port_in_use_fails_cleanly(rules: dict, tmp_path: Path) -> None:
    import socket

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        try:
            proc = cli("mount", rules["ref"], str(mnt), "--store", file_url(rules["store"]),
                       "--cache-dir", str(tmp_path / "cache"), "--metrics-port", str(port))
            left = is_mounted(mnt)
        finally:
            force_cleanup(mnt, None)
    assert proc.returncode != 0
    assert not left, "a failed mount left a (stale) mount behind"
    assert str(port) in proc.stderr, proc.stderr


@pytest.mark.s3
def test_s3_store_serves_the_same_bytes_as_the_file_store(rules: dict, tmp_path: Path,
                                                          s3_bucket_url: str, mode: str) -> None:
    ref = build_and_index(tmp_path / "img", rules_layers(), s3_bucket_url)
    assert ref == rules["ref"]
    with mounted(ref, tmp_path / "mnt", s3_bucket_url, tmp_path / "cache", mode=mode) as m:
        actual = snapshot(m.mountpoint)
        stats = m.stats()
        assert stats["metrics"]["fetches"] + stats["metrics"]["prefetch_requests"] > 0
        assert s3_bucket_url.split("/")[2] not in json.dumps(stats)  # no store URL for all to see
        assert from_store(m.stats()["metrics"]) > 10
    assert_same_tree(rules["expected"], actual)


def test_abort_helper_unblocks_a_hung_mount(rules: dict, tmp_path: Path) -> None:
    """The cleanup path the helpers rely on: a daemon that stops answering (SIGSTOP) leaves
    readers blocked in the kernel; aborting the FUSE connection frees them."""
    m = start_mount(rules["ref"], tmp_path / "mnt", file_url(rules["store"]), tmp_path / "cache", mode="fuse")
    try:
        os.kill(m.pid, signal.SIGSTOP)
        reader = subprocess.Popen([sys.executable, "-c",
                                   f"open({str(m.path('data/exact'))!r}, 'rb').read()"],
                                  stderr=subprocess.PIPE)
        time.sleep(0.5)
        assert reader.poll() is None  # blocked on the stopped daemon
        assert abort_fuse(m.mountpoint)
        assert reader.wait(timeout=10) != 0
        assert not is_mounted(m.mountpoint)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(m.pid, signal.SIGCONT)
        force_cleanup(m.mountpoint, m.pid)
    assert wait_gone(m.pid, 10)
