"""The filesystem model (casfs.vfs.ImageFS) and the FUSE adapter's error mapping, driven
without mounting: an image indexed into a file store, a fetcher over a counting wrapper
of that store, and a fresh chunk cache in a temp directory per test."""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import random
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from casfs.cache import ChunkCache
from casfs.errors import FetchFailed
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.metrics import MountMetrics
from casfs.store import Store, open_store
from casfs.store.content import blob_key, compress
from casfs.store.local import FileBackend
from casfs.testing import ocibuild as ob
from casfs.testing.ocibuild import Member, directory, file, hardlink, symlink
from casfs.vfs import STATS_XATTR, FsError, ImageFS
from indexer.chunking import SMALL_CHUNK as CHUNK_SIZE
from indexer.index import index_image

BIG = random.Random(7).randbytes(CHUNK_SIZE * 3 + 12345)
SMALL = b"hello, casfs\n"
MANY = [f"entry{i:03}" for i in range(40)]


def layers() -> list[list[Member]]:
    return [[
        directory("d", mode=0o750, uid=3, gid=4, xattrs={"user.dx": "dir value"}),
        file("d/small", SMALL, mode=0o4755, xattrs={"user.a": "1", "trusted.bin": b"\x00\xff"}),
        hardlink("d/small-link", "d/small"),
        file("d/big", BIG),
        file("d/empty", b""),
        symlink("d/sym", "../elsewhere/target"),
        Member("d/fifo", "fifo", mode=0o600),
        Member("d/null", "char", devmajor=1, devminor=3, mode=0o666),
        directory("many"),
        *[file(f"many/{n}", n) for n in MANY],
    ]]


@dataclass
class Image:
    store_root: Path
    digest: str


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    root = tmp_path_factory.mktemp("vfs")
    ob.write_oci_layout(root / "img", layers(), tag="t")
    store = open_store(f"file://{root / 'store'}", create=True)
    result = index_image(f"oci:{root / 'img'}:t", store)
    return Image(root / "store", result.digest)


class CountingBackend:
    """A backend wrapper that counts gets per key and can slow them down."""

    def __init__(self, inner: FileBackend, delay: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.delay = delay
        self.gets: Counter[str] = Counter()
        self._lock = threading.Lock()

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self._lock:
            self.gets[key] += 1
        if self.delay:
            time.sleep(self.delay)
        return self.inner.get(key, max_bytes=max_bytes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@dataclass
class Env:
    fs: ImageFS
    backend: CountingBackend
    cache: ChunkCache
    manifest: Manifest

    def ino(self, path: str) -> int:
        ino = self.manifest.resolve(path)
        assert ino, path
        return ino

    def blob_gets(self, digest: str) -> int:
        return self.backend.gets[blob_key(digest)]

    def read(self, path: str, offset: int = 0, size: int = 1 << 30) -> bytes:
        return trio.run(self.fs.read, self.ino(path), offset, size)


def make_env(image: Image, cache_dir: Path, delay: float = 0.0,
             cache_size: int = 1 << 30) -> Env:
    backend = CountingBackend(FileBackend(image.store_root, create=False), delay)
    store = Store(backend)
    manifest = Manifest(store.get_manifest(image.digest), image.digest)
    cache = ChunkCache(cache_dir, cache_size)
    metrics = MountMetrics()
    fs = ImageFS(manifest, Fetcher(store, cache, metrics), metrics)
    return Env(fs, backend, cache, manifest)


@pytest.fixture
def env(image: Image, tmp_path: Path) -> Env:
    e = make_env(image, tmp_path / "cache")
    yield e
    e.cache.close()


def errno_of(fn: Callable[[], Any]) -> int:
    with pytest.raises(FsError) as info:
        fn()
    return info.value.errno


# -- metadata ---------------------------------------------------------------------------------

def test_lookup_getattr(env: Env) -> None:
    fs = env.fs
    d = fs.lookup(1, b"d")
    node = fs.getattr(d)
    assert stat.S_ISDIR(node.mode) and stat.S_IMODE(node.mode) == 0o750
    assert (node.uid, node.gid) == (3, 4)
    small = fs.lookup(d, b"small")
    attrs = fs.getattr(small)
    assert stat.S_ISREG(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o4755
    assert attrs.size == len(SMALL) and attrs.mtime_ns == ob.DEFAULT_MTIME * 10**9
    assert fs.lookup(d, b".") == d and fs.lookup(d, b"..") == 1
    # hardlinked names are one inode with the right link count
    assert fs.lookup(d, b"small-link") == small and attrs.nlink == 2
    null = fs.getattr(fs.lookup(d, b"null"))
    assert stat.S_ISCHR(null.mode) and (os.major(null.rdev), os.minor(null.rdev)) == (1, 3)
    assert stat.S_ISFIFO(fs.getattr(fs.lookup(d, b"fifo")).mode)


def test_negative_lookups(env: Env) -> None:
    fs = env.fs
    d = env.ino("/d")
    before = fs.metrics.negative_lookups
    assert fs.lookup(d, b"missing") == 0
    assert fs.lookup(1, b"missing.py") == 0
    assert fs.lookup(d, b"smal") == 0 and fs.lookup(d, b"smallx") == 0
    assert fs.metrics.negative_lookups == before + 4
    assert errno_of(lambda: fs.lookup(env.ino("/d/small"), b"x")) == errno.ENOTDIR


def test_readdir_offsets(env: Env) -> None:
    fs = env.fs
    many = env.ino("/many")
    full = list(fs.readdir(many, 0))
    assert [name.decode() for _, name, *_ in full] == MANY
    assert [index for index, *_ in full] == list(range(len(MANY)))
    # resuming at any offset (what the kernel passes back) yields the rest, in order
    for start in (1, 7, len(MANY) - 1, len(MANY), len(MANY) + 5):
        assert list(fs.readdir(many, start)) == full[start:]
    for _, name, child, _ in full:
        assert fs.lookup(many, name) == child
    d_names = [name for _, name, *_ in fs.readdir(env.ino("/d"), 0)]
    assert d_names == sorted(d_names) and b"small" in d_names and b"." not in d_names
    assert errno_of(lambda: list(fs.readdir(env.ino("/d/small"), 0))) == errno.ENOTDIR


def test_readlink(env: Env) -> None:
    assert env.fs.readlink(env.ino("/d/sym")) == b"../elsewhere/target"
    assert errno_of(lambda: env.fs.readlink(env.ino("/d/small"))) == errno.EINVAL


def test_xattrs(env: Env) -> None:
    fs = env.fs
    small = env.ino("/d/small")
    assert sorted(fs.listxattr(small)) == [b"trusted.bin", b"user.a"]
    assert fs.getxattr(small, b"trusted.bin") == b"\x00\xff"
    assert fs.getxattr(env.ino("/d"), b"user.dx") == b"dir value"
    assert fs.listxattr(env.ino("/d/big")) == []
    assert errno_of(lambda: fs.getxattr(small, b"user.nope")) == errno.ENODATA
    # the root answers the stats pseudo-xattr (what `casfs stats` reads) and lists nothing
    stats = json.loads(fs.getxattr(1, STATS_XATTR))
    assert {"metrics", "cache"} <= stats.keys() and "lookups" in stats["metrics"]
    assert STATS_XATTR not in fs.listxattr(1)


def test_open_errors(env: Env) -> None:
    fs = env.fs
    assert errno_of(lambda: fs.open(env.ino("/d"))) == errno.EISDIR
    assert errno_of(lambda: fs.open(env.ino("/d/fifo"))) == errno.ENXIO
    fs.open(env.ino("/d/small"))


# -- content ------------------------------------------------------------------------------------

def test_reads_across_chunk_boundaries(env: Env) -> None:
    assert env.read("/d/big") == BIG
    ranges = [
        (0, 1), (0, CHUNK_SIZE), (CHUNK_SIZE - 1, 2), (CHUNK_SIZE - 100, 200),
        (CHUNK_SIZE * 2 - 5, CHUNK_SIZE + 10),  # spans three chunks
        (10, CHUNK_SIZE * 3),  # spans all four
        (len(BIG) - 10, 100),  # past the end: short read
        (len(BIG), 10), (len(BIG) + 100, 10),  # at and beyond EOF: nothing
        (CHUNK_SIZE * 3, 12345), (123, 0),
    ]
    for offset, size in ranges:
        assert env.read("/d/big", offset, size) == BIG[offset : offset + size], (offset, size)
    assert env.read("/d/small") == SMALL
    assert env.read("/d/empty") == b""
    for name in MANY[:5]:
        assert env.read(f"/many/{name}") == name.encode()


def test_reads_fetch_once_then_hit_the_cache(env: Env) -> None:
    chunks = env.manifest.chunks(env.ino("/d/big"))
    assert len(chunks) == 4
    env.read("/d/big")
    assert all(env.blob_gets(c.digest) == 1 for c in chunks)
    gets = sum(env.backend.gets.values())
    for _ in range(3):
        assert env.read("/d/big", CHUNK_SIZE - 7, CHUNK_SIZE) == BIG[CHUNK_SIZE - 7 : 2 * CHUNK_SIZE - 7]
    assert sum(env.backend.gets.values()) == gets
    m = env.fs.metrics
    assert m.fetches == 4 and m.cache_hits >= 6 and m.fetch_errors == 0
    assert env.cache.total_bytes() == len(BIG)


def test_concurrent_reads_of_one_chunk_fetch_once(image: Image, tmp_path: Path) -> None:
    env = make_env(image, tmp_path / "cache", delay=0.3)
    ino = env.ino("/d/big")
    digest = env.manifest.chunks(ino)[1].digest
    results: dict[int, bytes] = {}

    async def reader(i: int) -> None:
        offset = CHUNK_SIZE + i * 1000
        results[i] = await env.fs.read(ino, offset, 4096)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(24):
                nursery.start_soon(reader, i)

    trio.run(main)
    for i, data in results.items():
        offset = CHUNK_SIZE + i * 1000
        assert data == BIG[offset : offset + 4096]
    assert len(results) == 24
    assert env.blob_gets(digest) == 1
    m = env.fs.metrics
    assert m.fetches == 1 and m.fetch_joined == 23


def test_concurrent_whole_file_reads_fetch_each_chunk_once(image: Image, tmp_path: Path) -> None:
    env = make_env(image, tmp_path / "cache", delay=0.2)
    ino = env.ino("/d/big")
    out: list[bytes] = []

    async def main() -> None:
        async def one() -> None:
            out.append(await env.fs.read(ino, 0, len(BIG)))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)

    trio.run(main)
    assert out == [BIG] * 8
    assert [env.blob_gets(c.digest) for c in env.manifest.chunks(ino)] == [1, 1, 1, 1]


def test_corrupted_cache_file_is_dropped_and_refetched(image: Image, tmp_path: Path) -> None:
    first = make_env(image, tmp_path / "cache")
    assert first.read("/d/big") == BIG
    first.cache.close()
    chunks = first.manifest.chunks(first.ino("/d/big"))
    flipped, truncated, removed = (first.cache.chunk_path(c.digest) for c in chunks[:3])
    raw = bytearray(flipped.read_bytes())
    raw[1000] ^= 0x01
    flipped.write_bytes(bytes(raw))
    with open(truncated, "r+b") as f:
        f.truncate(CHUNK_SIZE // 2)
    removed.unlink()

    # a new process (a new cache object) verifies each file the first time it uses it
    second = make_env(image, tmp_path / "cache")
    assert second.read("/d/big") == BIG
    assert second.cache.stats.corrupt_dropped == 3
    assert [second.blob_gets(c.digest) for c in chunks] == [1, 1, 1, 0]
    assert second.fs.metrics.fetches == 3
    assert flipped.read_bytes() == BIG[:CHUNK_SIZE]
    assert truncated.stat().st_size == CHUNK_SIZE
    assert second.cache.total_bytes() == len(BIG)
    second.cache.close()


@pytest.mark.parametrize("damage", ["garbage", "other-content", "truncated", "missing"])
def test_corrupt_blob_in_store_fails_never_wrong_bytes(image: Image, tmp_path: Path,
                                                        damage: str) -> None:
    # a private copy of the store: the module's image is shared
    import shutil

    store_root = tmp_path / "store"
    shutil.copytree(image.store_root, store_root)
    img = Image(store_root, image.digest)
    env = make_env(img, tmp_path / "cache")
    chunk = env.manifest.chunks(env.ino("/d/big"))[2]
    blob = store_root / blob_key(chunk.digest)
    good = blob.read_bytes()
    if damage == "garbage":
        blob.write_bytes(os.urandom(len(good)))
    elif damage == "other-content":
        # a valid zstd frame of the right size, but of other bytes
        blob.write_bytes(compress(bytes(len(BIG[2 * CHUNK_SIZE : 3 * CHUNK_SIZE]))))
    elif damage == "truncated":
        blob.write_bytes(good[: len(good) // 2])
    else:
        blob.unlink()

    with pytest.raises(FetchFailed, match=chunk.digest):
        env.read("/d/big", 2 * CHUNK_SIZE + 5, 100)
    # a read touching good chunks and the bad one fails as a whole
    with pytest.raises((FetchFailed, BaseExceptionGroup)):
        env.read("/d/big", 0, len(BIG))
    assert env.cache.lookup(chunk.digest) is None
    assert not env.cache.chunk_path(chunk.digest).exists()
    assert env.fs.metrics.fetch_errors >= 2
    # other chunks are unaffected, and the file reads again once the store is repaired
    assert env.read("/d/big", 0, CHUNK_SIZE) == BIG[:CHUNK_SIZE]
    blob.write_bytes(good)
    assert env.read("/d/big") == BIG


# -- the FUSE adapter, without a mount ----------------------------------------------------------

def _fuse_error(coro_fn: Callable[..., Any], *args: Any) -> int:
    import pyfuse3

    async def call() -> Any:
        return await coro_fn(*args)

    with pytest.raises(pyfuse3.FUSEError) as info:
        trio.run(call)
    return info.value.errno


def test_adapter_refuses_every_write(env: Env) -> None:
    pyfuse3 = pytest.importorskip("pyfuse3")
    from casfs.fuse_ops import CasfsOperations

    ops = CasfsOperations(env.fs, no_open=False)  # stock pyfuse3: OPEN answered
    f, d = env.ino("/d/small"), env.ino("/d")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND):
        assert _fuse_error(ops.open, f, flags, None) == errno.EROFS
    calls = [
        (ops.write, f, 0, b"x"), (ops.create, d, b"new", 0o644, os.O_WRONLY, None),
        (ops.mkdir, d, b"new", 0o755, None), (ops.mknod, d, b"n", 0o644, 0, None),
        (ops.unlink, d, b"small", None), (ops.rmdir, 1, b"d", None),
        (ops.rename, d, b"small", d, b"x", 0, None), (ops.link, f, d, b"x", None),
        (ops.symlink, d, b"s", b"t", None), (ops.setattr, f, None, None, None, None),
        (ops.setxattr, f, b"user.x", b"v", None), (ops.removexattr, f, b"user.a", None),
        (ops.access, f, os.W_OK, None),
    ]
    for fn, *args in calls:
        assert _fuse_error(fn, *args) == errno.EROFS, fn.__name__
    assert _fuse_error(ops.open, d, os.O_RDONLY, None) == errno.EISDIR
    assert _fuse_error(ops.opendir, f, None) == errno.ENOTDIR
    assert _fuse_error(ops.getxattr, f, b"user.none", None) == errno.ENODATA

    async def reads() -> tuple[Any, Any, Any]:
        info = await ops.open(f, os.O_RDONLY, None)
        neg = await ops.lookup(d, b"missing", None)
        attrs = await ops.getattr(f, None)
        return info, neg, attrs

    info, neg, attrs = trio.run(reads)
    assert isinstance(info, pyfuse3.FileInfo) and info.keep_cache and info.fh == f
    # a miss is a zero-inode entry the kernel keeps for a long time
    assert neg.st_ino == 0 and neg.entry_timeout >= 3600
    assert attrs.st_ino == f and attrs.st_nlink == 2 and attrs.attr_timeout >= 3600
    assert trio.run(ops.access, f, os.R_OK, None)


def test_adapter_no_open_mode_answers_enosys_after_checks(env: Env) -> None:
    """With the patched pyfuse3, OPEN and OPENDIR answer ENOSYS (the kernel's no-open
    mode: keep_cache for files, cached listings for directories) once their checks pass;
    READ and READDIR then arrive with the inode as fh, which the adapter serves as is."""
    pytest.importorskip("pyfuse3")
    from casfs.fuse_ops import CasfsOperations

    ops = CasfsOperations(env.fs, no_open=True)
    d, f = env.ino("/d"), env.ino("/d/small")
    assert _fuse_error(ops.open, f, os.O_RDONLY, None) == errno.ENOSYS
    assert _fuse_error(ops.opendir, d, None) == errno.ENOSYS
    # the checks still come first
    assert _fuse_error(ops.open, d, os.O_RDONLY, None) == errno.EISDIR
    assert _fuse_error(ops.open, f, os.O_WRONLY, None) == errno.EROFS
    assert _fuse_error(ops.opendir, f, None) == errno.ENOTDIR
    assert env.fs.metrics.opens >= 2
    assert trio.run(ops.read, f, 0, 1 << 20) == env.read("/d/small")

def test_adapter_turns_fetch_failure_into_eio_with_log(image: Image, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("pyfuse3")
    import shutil

    from casfs.fuse_ops import CasfsOperations

    shutil.copytree(image.store_root, tmp_path / "store")
    env = make_env(Image(tmp_path / "store", image.digest), tmp_path / "cache")
    digest = env.manifest.chunks(env.ino("/d/big"))[0].digest
    (tmp_path / "store" / blob_key(digest)).write_bytes(b"not zstd")
    ops = CasfsOperations(env.fs)
    with caplog.at_level(logging.ERROR):
        assert _fuse_error(ops.read, env.ino("/d/big"), 0, 4096) == errno.EIO
    assert any(digest in r.getMessage() for r in caplog.records)
    assert env.fs.metrics.io_errors == 1


# -- the fetcher ----------------------------------------------------------------------------------

class FailOnceBackend(CountingBackend):
    """The first get of each blob fails (slowly); later ones succeed (slowly)."""

    def __init__(self, inner: FileBackend, delay: float) -> None:
        super().__init__(inner, delay)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        data = super().get(key, max_bytes=max_bytes)
        if key.startswith("blobs/") and self.gets[key] == 1:
            from casfs.errors import StoreError

            raise StoreError(f"injected failure for {key}")
        return data


def test_reads_joining_a_failed_prefetch_fetch_once_more(image: Image, tmp_path: Path) -> None:
    """Several reads wait on a prefetch of their chunk; it fails; the reads then fetch the
    chunk themselves (once between them) and all get the bytes."""
    backend = FailOnceBackend(FileBackend(image.store_root, create=False), delay=0.2)
    store = Store(backend)
    manifest = Manifest(store.get_manifest(image.digest), image.digest)
    cache = ChunkCache(tmp_path / "cache")
    metrics = MountMetrics()
    fetcher = Fetcher(store, cache, metrics)
    fs = ImageFS(manifest, fetcher, metrics)
    ino = manifest.resolve("/d/big")
    chunk = manifest.chunks(ino)[1]
    out: list[bytes] = []

    async def main() -> None:
        async def prefetch() -> None:
            with pytest.raises(FetchFailed):
                await fetcher.prefetch(chunk.digest)

        async def read(i: int) -> None:
            out.append(await fs.read(ino, CHUNK_SIZE + i, 100))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(prefetch)
            await trio.sleep(0.05)
            for i in range(4):
                nursery.start_soon(read, i)

    trio.run(main)
    assert sorted(out) == sorted(BIG[CHUNK_SIZE + i : CHUNK_SIZE + i + 100] for i in range(4))
    assert backend.gets[blob_key(chunk.digest)] == 2
    cache.close()


# -- one cache, several processes -------------------------------------------------------------------

_POOL = [bytes([i]) * 4096 + bytes(i) for i in range(48)]


def _cache_worker(root: str, seed: int, ops: int, out: Any) -> None:
    from casfs.digest import hash_bytes

    cache = ChunkCache(root, 16 * 4096)
    digests = [hash_bytes(p) for p in _POOL]
    rng = random.Random(seed)
    wrong = gone = stale = 0
    for _ in range(ops):
        i = rng.randrange(len(_POOL))
        path = cache.lookup(digests[i])
        if path is None:
            cache.insert(digests[i], _POOL[i])
            continue
        try:
            with open(path, "rb") as f:
                wrong += f.read() != _POOL[i]
        except FileNotFoundError:
            # evicted since the lookup: looking again must miss, or find a file that is there
            gone += 1
            again = cache.lookup(digests[i])
            if again is not None:
                try:
                    with open(again, "rb") as f:
                        wrong += f.read() != _POOL[i]
                except FileNotFoundError:
                    stale += 1
    out.put({"wrong": wrong, "gone": gone, "stale": stale,
             "corrupt_dropped": cache.stats.corrupt_dropped, "evictions": cache.stats.evictions})


def test_one_cache_shared_by_processes_stays_consistent(tmp_path: Path) -> None:
    """Daemons insert, evict and read one cache at once: never wrong bytes, never a lookup
    that keeps pointing at a file that is gone, no healthy file reported as corrupt, and
    the index agrees with the files on disk."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    root = tmp_path / "cache"
    ChunkCache(root).close()
    out = ctx.Queue()
    procs = [ctx.Process(target=_cache_worker, args=(str(root), seed, 2500, out))
             for seed in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(r["evictions"] > 0 for r in results)
    for r in results:
        assert r["wrong"] == 0 and r["stale"] == 0 and r["corrupt_dropped"] == 0, results
    cache = ChunkCache(root, 16 * 4096)
    with cache.env.begin() as txn:
        indexed = {key.hex(): raw for key, raw in txn.cursor() if len(key) == 32}
    files = {f.name: f.stat().st_size for d in (root / "chunks").iterdir() for f in d.iterdir()}
    assert set(indexed) == set(files)
    assert cache.total_bytes() == sum(files.values()) <= 16 * 4096
    cache.close()




def test_cache_file_deleted_under_a_running_mount_is_fetched_again(env: Env) -> None:
    """A chunk file removed from disk behind the cache's back (an operator, a tmp reaper,
    a daemon killed in the middle of an eviction) while this process has already verified
    it: the next read fetches it again instead of failing."""
    assert env.read("/d/big") == BIG
    chunk = env.manifest.chunks(env.ino("/d/big"))[1]
    env.cache.chunk_path(chunk.digest).unlink()
    # The process still holds the verified file open: the same (immutable) bytes.
    assert env.read("/d/big", CHUNK_SIZE, 100) == BIG[CHUNK_SIZE : CHUNK_SIZE + 100]
    assert env.blob_gets(chunk.digest) == 1
    # Once it lets go of it (LRU, or a failed read), the path is looked up: gone, so the
    # entry is dropped and the chunk is put back: from the fetcher's last fetched chunks
    # when it is still among them, else fetched again.
    env.cache.invalidate(chunk.digest)
    assert env.read("/d/big", CHUNK_SIZE, 100) == BIG[CHUNK_SIZE : CHUNK_SIZE + 100]
    assert env.blob_gets(chunk.digest) <= 2
    assert env.cache.chunk_path(chunk.digest).read_bytes() == BIG[CHUNK_SIZE : 2 * CHUNK_SIZE]
    env.fs.fetcher._recent.clear()  # long after: no longer in memory
    env.cache.chunk_path(chunk.digest).unlink()
    env.cache.invalidate(chunk.digest)
    assert env.read("/d/big", CHUNK_SIZE, 100) == BIG[CHUNK_SIZE : CHUNK_SIZE + 100]
    assert env.blob_gets(chunk.digest) == 2
    assert env.cache.chunk_path(chunk.digest).exists()


def test_cache_file_truncated_under_a_running_mount_never_gives_short_reads(env: Env) -> None:
    assert env.read("/d/big") == BIG
    chunk = env.manifest.chunks(env.ino("/d/big"))[2]
    with open(env.cache.chunk_path(chunk.digest), "r+b") as f:
        f.truncate(1000)
    assert env.read("/d/big", 2 * CHUNK_SIZE, 5000) == BIG[2 * CHUNK_SIZE : 2 * CHUNK_SIZE + 5000]


def test_read_nowait_serves_only_verified_held_files(env: Env) -> None:
    """The non-blocking hot path: bytes of chunks this process verified (held open, in
    the page cache); None for anything it would have to wait for or re-check."""
    chunks = env.manifest.chunks(env.ino("/d/big"))
    assert env.cache.read_nowait([(chunks[0].digest, 0, 10)]) is None  # never read yet
    assert env.read("/d/big") == BIG
    got = env.cache.read_nowait([(chunks[0].digest, 5, 10), (chunks[1].digest, 0, 7)])
    assert got == BIG[5:15] + BIG[CHUNK_SIZE : CHUNK_SIZE + 7]
    os.truncate(env.cache.chunk_path(chunks[2].digest), 100)
    assert env.cache.read_nowait([(chunks[2].digest, 0, 200)]) is None  # short: re-check
    assert env.read("/d/big", 2 * CHUNK_SIZE, 200) == BIG[2 * CHUNK_SIZE : 2 * CHUNK_SIZE + 200]
    env.cache.invalidate(chunks[0].digest)
    assert env.cache.read_nowait([(chunks[0].digest, 0, 10)]) is None


def test_warming_verifies_cached_chunks_once_and_drops_bad_ones(image: Image,
                                                                 tmp_path: Path) -> None:
    """prefetch(warm=True) of a cached chunk verifies it ahead of the reader (read, hash,
    held open for read_nowait); a damaged file is dropped and fetched; threads that
    verify the same chunk at once hash it once."""
    first = make_env(image, tmp_path / "cache")
    assert first.read("/d/big") == BIG
    first.cache.close()
    chunks = first.manifest.chunks(first.ino("/d/big"))
    damaged = first.cache.chunk_path(chunks[1].digest)
    damaged.write_bytes(b"x" * CHUNK_SIZE)

    second = make_env(image, tmp_path / "cache")
    fetcher = second.fs.fetcher
    trio.run(functools.partial(fetcher.prefetch, chunks[0].digest, warm=True))
    assert second.fs.metrics.warmed_chunks == 1 and second.blob_gets(chunks[0].digest) == 0
    got = second.cache.read_nowait([(chunks[0].digest, 0, CHUNK_SIZE)])
    assert got == BIG[:CHUNK_SIZE]  # verified and held open: the non-blocking path serves it
    trio.run(functools.partial(fetcher.prefetch, chunks[1].digest, warm=True))
    assert second.cache.stats.corrupt_dropped == 1 and second.blob_gets(chunks[1].digest) == 1
    assert damaged.read_bytes() == BIG[CHUNK_SIZE : 2 * CHUNK_SIZE]
    assert second.fs.metrics.warmed_chunks == 1  # the damaged one was fetched, not warmed

    hashed: list[str] = []
    real = second.cache._verify_file

    def slow_verify(digest: str, path: Path, raw: bytes) -> bool:
        hashed.append(digest)
        time.sleep(0.2)
        return real(digest, path, raw)

    second.cache._verify_file = slow_verify  # type: ignore[method-assign]
    threads = [threading.Thread(target=second.cache.lookup, args=(chunks[2].digest,))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert hashed == [chunks[2].digest]
    assert second.cache.lookup(chunks[2].digest) is not None
    second.cache.close()


def test_pack_pieces_cut_by_stored_bytes() -> None:
    from casfs.fetch import _pieces
    from casfs.ranges import PackedChunk

    items = [PackedChunk(f"d{i}", i * 100, 100) for i in range(7)]
    assert [[d for d, _, _ in run] for run in _pieces(items, 250)] == [
        ["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6"]]
    assert _pieces([], 250) == []
    assert _pieces(items, 1 << 30) == [items]
