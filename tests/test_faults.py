"""Faults survived: real mounts over a store that fails, a store that lies, processes
killed at random points, a full cache disk, and many mounts sharing one cache.

The scenarios are plain functions in casfs.testing.faults (shared with
benchmarks/faults.py, which runs them at larger counts); the tests here run them at
small counts, plus a few narrower checks found by the reliability suite. A scenario
fails on any wrong byte read through a mount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from casfs.cache import ChunkCache
from casfs.manifest import Manifest
from casfs.store import open_store
from casfs.store.content import blob_key
from casfs.testing import ocibuild as ob
from casfs.testing.faults import (
    CHUNK,
    FAULT_PROFILES,
    SourceImage,
    Unavailable,
    altered_blobs_scenario,
    altered_pack_scenario,
    assert_kills_landed,
    assert_no_wrong_bytes,
    b3,
    boot_files,
    boot_under_faults,
    bucket_key,
    build_kill_image,
    check_reads,
    disk_full_scenario,
    fill_disk,
    image_jobs,
    index_cli,
    kill_daemon_during_boot,
    kill_index_at_random_points,
    many_mounts_scenario,
    proxy_env,
    prune_cache,
    rnd,
    small_tmpfs,
    store_problems,
    write_image,
)
from casfs.testing.mounting import clear_leftovers, cli, force_cleanup, mounted
from casfs.testing.proxy import LatencyProxy
from casfs.testing.seaweed import SeaweedServer
from tests.mounthelp import require_fuse


@contextlib.contextmanager
def skip_if_unavailable() -> Iterator[None]:
    """A scenario that cannot run here (no tmpfs) skips the test, with its reason."""
    try:
        yield
    except Unavailable as exc:
        pytest.skip(str(exc))


# == the tests ===================================================================================

pytestmark = [pytest.mark.fuse]


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


@pytest.fixture(scope="module", autouse=True)
def _nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    left = clear_leftovers(tmp_path_factory.getbasetemp())
    assert left == [], f"mounts left behind (now cleared): {left}"


@pytest.fixture(scope="module")
def boot_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[SourceImage, str]:
    """The small boot image (300 small files, 4 multi-chunk ones, ~3 MB) and the
    manifest reference of a clean index of it."""
    root = tmp_path_factory.mktemp("boot-image")
    image = write_image(root, [boot_files()])
    ref = index_cli(image, f"file://{root / 'clean-store'}")
    return image, ref


@pytest.mark.s3
@pytest.mark.parametrize("name,index_through_faults,boots", [("10%", True, 1), ("30%", False, 2)])
def test_boots_and_index_survive_a_faulty_store(name: str, index_through_faults: bool,
                                                boots: int, seaweed: SeaweedServer,
                                                boot_image: tuple[SourceImage, str],
                                                tmp_path: Path) -> None:
    """At 10%: index through the faults (same manifest as a clean index), a first boot.
    At 30%: a first boot, then a boot replaying its trace (ranged GETs of its pack)."""
    image, clean_ref = boot_image
    out = boot_under_faults(seaweed, image, clean_ref, tmp_path, FAULT_PROFILES[name],
                            boots=boots, seed=boots, index=index_through_faults)
    # A first boot of 304 files: ~50 requests (directory packs: a ranged GET per
    # directory, single GETs for the rest), all of them through the faults.
    assert out["boots"][0]["requests"] >= 40, out
    assert out["boots"][0]["injected_errors"] + out["boots"][0]["injected_resets"] > 0, out
    print(f"\n{name}: {json.dumps(out)}")


@pytest.mark.s3
def test_altered_blobs_give_eio_and_a_log_line(seaweed: SeaweedServer, s3_bucket_url: str,
                                               tmp_path: Path) -> None:
    """Blobs overwritten in the store (valid zstd frames of other bytes, a truncated
    frame, garbage): EIO, a log line naming each; the rest of the image reads right."""
    out = altered_blobs_scenario(seaweed, s3_bucket_url, tmp_path, n_files=12, n_altered=4,
                                 seed=1)
    print(f"\naltered blobs: {json.dumps(out)}")


@pytest.mark.s3
def test_altered_pack_never_serves_wrong_bytes(seaweed: SeaweedServer, s3_bucket_url: str,
                                               tmp_path: Path) -> None:
    """A recorded boot's pack altered in the store: the next cold boot's prefetch rejects
    its chunks and reads fetch the blobs (right bytes); where the blob is altered too, EIO."""
    out = altered_pack_scenario(seaweed, s3_bucket_url, tmp_path, n_files=12, n_altered=1,
                                seed=2)
    print(f"\naltered pack: {json.dumps(out)}")


@pytest.fixture(scope="module")
def kill_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[SourceImage, str, float, int]:
    return build_kill_image(tmp_path_factory.mktemp("kill-image"))


def test_kill_9_of_index_into_a_file_store(kill_image: tuple[SourceImage, str, float, int],
                                           tmp_path: Path) -> None:
    image, clean_ref, seconds, blobs = kill_image
    size = sum(map(len, image.files.values()))
    assert size > 30 << 20, size
    url = f"file://{tmp_path / 'store'}"
    out = kill_index_at_random_points(image, url, clean_ref, kills=6, seed=1,
                                      clean_seconds=seconds, total_blobs=blobs)
    assert_kills_landed(out)
    # A lock not rewritten for 15 minutes is stale: gc then goes ahead.
    old = time.time() - 16 * 60
    for lock in (tmp_path / "store" / "locks").glob("index-*"):
        os.utime(lock, (old, old))
    gc = cli("gc", "--dry-run", "--store", url)
    assert gc.returncode == 0, gc.stderr
    # Puts killed midway leave temp files (never objects); a day on, they are swept.
    strays = list((tmp_path / "store" / ".tmp").iterdir())
    for f in strays:
        os.utime(f, (old - 86400, old - 86400))
    open_store(url, create=True)
    assert list((tmp_path / "store" / ".tmp").iterdir()) == []
    out["stray_temp_files"] = len(strays)
    print(f"\nkill -9 index (file store): {json.dumps(out)}")


@pytest.mark.s3
def test_kill_9_of_index_into_seaweedfs(kill_image: tuple[SourceImage, str, float, int],
                                        seaweed: SeaweedServer, s3_bucket_url: str) -> None:
    """As a remote store: 20 ms per request (the checks list and read SeaweedFS directly)."""
    image, clean_ref, seconds, blobs = kill_image
    with LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=20) as proxy:
        out = kill_index_at_random_points(image, s3_bucket_url, clean_ref, kills=6, seed=2,
                                          clean_seconds=seconds, total_blobs=blobs,
                                          env=proxy_env(seaweed, proxy))
    assert_kills_landed(out)
    print(f"\nkill -9 index (SeaweedFS): {json.dumps(out)}")


@pytest.mark.s3
def test_empty_objects_left_by_aborted_uploads_are_rewritten(seaweed: SeaweedServer,
                                                             s3_bucket_url: str,
                                                             tmp_path: Path) -> None:
    """SeaweedFS keeps a zero-byte object when a PUT's connection closes right after its
    headers (an index killed mid-upload, behind a proxy that forwards headers first; the
    reliability benchmark hit it). A later index must not take such an object for the
    blob, manifest or layer record it should be: it writes them again, and the store then
    verifies and mounts."""
    image = write_image(tmp_path / "img", [{"a.bin": rnd(CHUNK + 10, 1), "b.txt": b"b" * 100}])
    ref = index_cli(image, s3_bucket_url, tag="img")
    store = open_store(s3_bucket_url)
    manifest = Manifest(store.get_manifest(ref.split(":", 1)[1]))
    client = seaweed.client()
    bucket, _ = bucket_key(s3_bucket_url, "")
    damaged = [blob_key(next(iter(manifest.chunk_digests()))),
               f"manifests/{ref.split(':', 1)[1]}",
               next(iter(store.backend.list("layers/")))]
    # an aborted PUT: headers, then the connection closes
    assert aborted_put(seaweed, bucket, bucket_key(s3_bucket_url, damaged[0])[1]) in (0, None)
    for key in damaged:
        client.put_object(Bucket=bucket, Key=bucket_key(s3_bucket_url, key)[1], Body=b"")
    store.backend.delete("tags/img")
    assert len(store_problems(store)[0]) >= 2  # the empty blob and manifest
    assert index_cli(image, s3_bucket_url, tag="img") == ref
    problems, _ = store_problems(open_store(s3_bucket_url))
    assert problems == [], problems
    with mounted("img", tmp_path / "mnt", s3_bucket_url, tmp_path / "cache") as m:
        res = check_reads(image_jobs(m, image), [m.mountpoint])
        assert res["files_ok"] == 2 and res["wrong"] == [] and res["errors"] == []


def aborted_put(seaweed: SeaweedServer, bucket: str, key: str) -> int | None:
    """Send a signed PUT's headers (Content-Length 1000) and close the connection before
    the body; returns the size of what SeaweedFS then holds under the key (None: nothing)."""
    import socket

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"{seaweed.endpoint_url}/{bucket}/{key}"
    req = AWSRequest(method="PUT", url=url, data=b"x" * 1000, headers={})
    S3SigV4Auth(Credentials(seaweed.access_key, seaweed.secret_key), "s3",
                seaweed.region).add_auth(req)
    head = f"PUT /{bucket}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{seaweed.s3_port}\r\n"
    head += "Content-Length: 1000\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in req.headers.items() if k.lower() != "host")
    with socket.create_connection(("127.0.0.1", seaweed.s3_port)) as s:
        s.sendall((head + "\r\n").encode())
        time.sleep(0.2)
    time.sleep(0.3)
    try:
        return len(seaweed.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    except Exception:
        return None


@pytest.mark.s3
def test_kill_9_of_the_daemon_during_a_boot(seaweed: SeaweedServer, s3_bucket_url: str,
                                            boot_image: tuple[SourceImage, str],
                                            tmp_path: Path) -> None:
    image, _ = boot_image
    index_cli(image, s3_bucket_url, tag="img")
    with LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=5) as proxy:
        out = kill_daemon_during_boot(image, s3_bucket_url, tmp_path, kill_after_chunks=40,
                                      env=proxy_env(seaweed, proxy))
    print(f"\nkill -9 daemon: {json.dumps(out)}")


def test_cache_disk_full_serves_uncached(tmp_path: Path) -> None:
    """The cache's disk full (a 2 MiB tmpfs): reads are served uncached, no crash."""
    with skip_if_unavailable():
        out = disk_full_scenario(tmp_path)
    print(f"\ndisk full: {json.dumps(out)}")


class _FullDiskIndex:
    """An LMDB environment on a full disk: a write transaction that changed something
    fails to commit (the index cannot grow); one that changed nothing commits (LMDB
    writes nothing for it)."""

    def __init__(self, env: Any) -> None:
        self.env = env

    def begin(self, write: bool = False, **kw: Any) -> Any:
        txn = self.env.begin(write=write, **kw)
        return _FailingTxn(txn) if write else txn

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


class _FailingTxn:
    def __init__(self, txn: Any) -> None:
        self.txn, self.changed = txn, False

    def __enter__(self) -> _FailingTxn:
        return self

    def put(self, *a: Any) -> Any:
        self.changed = True
        return self.txn.put(*a)

    def delete(self, *a: Any) -> Any:
        self.changed = True
        return self.txn.delete(*a)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.txn, name)

    def __exit__(self, exc_type: Any, *rest: Any) -> bool:
        import lmdb

        if exc_type is None and not self.changed:
            self.txn.commit()
            return False
        self.txn.abort()
        if exc_type is None:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return False


def test_cache_index_that_cannot_grow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the cache's index cannot be written (its disk full), inserts give up
    quietly (the caller serves the bytes uncached), leave no orphan chunk file behind,
    and an eviction that cannot commit does not turn into an error either."""
    cache = ChunkCache(tmp_path / "cache", 1 << 20)
    kept = rnd(5000, 1)
    assert cache.insert(b3(kept), kept) is not None
    cache.env = _FullDiskIndex(cache.env)  # type: ignore[assignment]
    data = rnd(7000, 2)
    assert cache.insert(b3(data), data) is None
    assert not cache.chunk_path(b3(data)).exists(), "an unindexed chunk file was left behind"
    assert cache.lookup(b3(data)) is None and cache.stats.insert_failures == 1
    # A full disk at the temp file: the insert evicts (which cannot commit either).
    import casfs.cache

    def no_space(*a: Any, **kw: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(casfs.cache, "open", no_space, raising=False)
    assert cache.insert(b3(data), data) is None
    assert cache.lookup(b3(kept)) is not None  # nothing was evicted: it could not commit
    # A damaged file whose entry cannot be dropped: a miss, not an error.
    monkeypatch.undo()
    cache.chunk_path(b3(kept)).write_bytes(b"damaged")
    cache.invalidate(b3(kept))
    assert cache.lookup(b3(kept)) is None
    cache.close()


# -- found by the reliability suite (benchmarks/faults.py) ------------------------------------

@pytest.mark.parametrize("damage", ["bad checksum", "cut in a header", "zero block then data"])
def test_tar_damaged_after_its_first_member_is_refused(damage: str) -> None:
    """tarfile's stream reader took a damaged header after the first member for the end
    of the archive and silently dropped every later entry (Docker's Go tar reader fails
    such a layer): now refused as corrupt."""
    import io
    import tarfile

    from casfs.errors import CorruptLayer
    from casfs.store import Store
    from casfs.testing.doubles import MemoryBackend
    from indexer.layer import read_layer
    from indexer.upload import BlobUploader

    tar = ob.layer_tar([ob.file("a", b"a" * 600), ob.file("b", b"b"), ob.file("c", b"c")])
    second = 512 + 1024  # a's header, a's data padded to two blocks
    end = len(tar.rstrip(b"\0")) + (-len(tar.rstrip(b"\0")) % 512)
    damaged = {
        "bad checksum": tar[:second + 148] + b"9999999\0" + tar[second + 156:],
        "cut in a header": tar[:second + 100],
        "zero block then data": tar[:end + 512] + b"x" * 512,
    }[damage]
    uploader = BlobUploader(Store(MemoryBackend()), workers=1)
    try:
        assert [op["path"] for op in read_layer(io.BytesIO(tar), uploader, "L")] == ["a", "b", "c"]
        with pytest.raises(CorruptLayer, match="corrupt or truncated"):
            read_layer(io.BytesIO(damaged), uploader, "L")
    finally:
        uploader.close()
    assert tarfile.BLOCKSIZE == 512


def test_cache_disk_full_before_a_new_manifest(tmp_path: Path) -> None:
    """The cache exists but its disk is full, and the image's manifest is not cached yet:
    the mount serves it from memory, or fails with one line that says why."""
    image = write_image(tmp_path / "img", [{"f": rnd(5000, 1)}])
    url = f"file://{tmp_path / 'store'}"
    index_cli(image, url, tag="img")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with skip_if_unavailable(), small_tmpfs(tmp_path / "tmpfs", "1m") as disk:
        prune_cache(disk / "cache")  # creates it
        fill_disk(disk)
        proc = cli("mount", "img", str(mnt), "--store", url, "--cache-dir", str(disk / "cache"))
        if proc.returncode == 0:
            pid = int(proc.stdout.split("daemon pid ")[1].split(",")[0])
            try:
                res = check_reads([(mnt / "f", image.truth_path("f"))], [mnt])
                assert_no_wrong_bytes(res, "manifest served from memory")
                assert res["files_ok"] == 1
            finally:
                force_cleanup(mnt, pid)
        else:
            assert proc.stderr.count("\n") == 1, proc.stderr
            assert "No space left" in proc.stderr, proc.stderr  # not "exited with status 1"


def test_many_mounts_share_one_cache_under_concurrent_reads(tmp_path: Path) -> None:
    out = many_mounts_scenario(tmp_path)
    print(f"\n8 mounts: {json.dumps(out)}")
