"""An index whose store goes away fails fast: the first request that runs out of retries
stops the whole index with one clear error, within about the retry deadline; nothing is
published (no layer record, manifest or tag) and the index lock is released.

One test kills a real SeaweedFS under `casfs index` (behind the latency proxy, as a remote
store); the others make the store's blob requests fail for good in-process, where the
lock's removal can be checked (a killed store cannot be told to remove anything).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casfs.errors import StoreError, TransientStoreError
from casfs.store import Store
from casfs.store.retry import RetryingBackend
from casfs.testing import ocibuild as ob
from casfs.testing.doubles import FaultyBackend, MemoryBackend
from casfs.testing.proxy import LatencyProxy
from casfs.testing.seaweed import SeaweedServer, s3_env
from indexer.index import index_image
from tests.treecheck import store_keys

DEADLINE = 2.0


def make_tree(root: Path, files: int, size: int, seed: int = 7) -> Path:
    rng = random.Random(seed)
    root.mkdir()
    for d in range(files // 100 + 1):
        (root / f"d{d:03}").mkdir()
    for i in range(files):
        (root / f"d{i // 100:03}" / f"f{i:05}.bin").write_bytes(rng.randbytes(size))
    return root


class StoreGone:
    """Blob requests work for the first `allowed` uploads, then fail (transiently, like
    a refused connection) for ever; everything else works."""

    def __init__(self, allowed: int) -> None:
        self.allowed = allowed
        self.puts = 0
        self.after = 0  # blob requests made once the store was gone

    def __call__(self, op: str, key: str, nth: int) -> BaseException | None:
        if not key.startswith(("blobs/", "packs/")):
            return None
        if op == "put" and self.puts < self.allowed:
            self.puts += 1
            return None
        if self.puts < self.allowed:
            return None
        self.after += 1
        return TransientStoreError(f"cannot reach store memory://test (ConnectionRefused) on {key}")


def gone_store(allowed: int) -> tuple[Store, FaultyBackend, StoreGone]:
    fault = StoreGone(allowed)
    faulty = FaultyBackend(MemoryBackend(), fault)
    return Store(RetryingBackend(faulty, deadline=DEADLINE)), faulty, fault


def assert_nothing_published(store: Store) -> None:
    for prefix in ("manifests/", "tags/", "layers/", "packidx/"):
        assert store_keys(store, prefix) == set(), prefix


@pytest.mark.parametrize("kind", ["tree", "oci"])
def test_first_chunk_out_of_retries_stops_the_index(kind: str, tmp_path: Path) -> None:
    store, faulty, fault = gone_store(allowed=20)
    if kind == "tree":
        ref = f"tree:{make_tree(tmp_path / 'tree', files=600, size=3000)}"
    else:
        rng = random.Random(3)
        layer = [ob.directory("d"), *[ob.file(f"d/f{i}", rng.randbytes(3000)) for i in range(600)]]
        ob.write_oci_layout(tmp_path / "img", [layer], tag="t")
        ref = f"oci:{tmp_path / 'img'}:t"
    t0 = time.monotonic()
    with pytest.raises(TransientStoreError) as info:
        index_image(ref, store, tag="never")
    took = time.monotonic() - t0
    # About the retry deadline (every request started while the store was up gives up at
    # its next attempt once the first one ran out), not one deadline per remaining chunk.
    assert took < DEADLINE + 3, took
    message = str(info.value)
    assert "gave up after" in message and "published nothing" in message
    assert message.count("cannot reach store") == 1
    # The queued chunks were dropped, not each retried: a few attempts per worker thread.
    assert fault.after < 16 * 40, fault.after
    assert_nothing_published(store)
    assert store_keys(store, "locks/") == set()  # the lock was released
    assert faulty.calls["delete"] >= 1


def test_permanent_failure_stops_at_once(tmp_path: Path) -> None:
    """A store error that is not transient (a full disk, access denied) stops the index on
    its first occurrence, without waiting for anything."""

    def full(op: str, key: str, nth: int) -> BaseException | None:
        if op == "put" and key.startswith("blobs/"):
            return StoreError("store memory://test is full (no space left writing a blob)")
        return None

    store = Store(RetryingBackend(FaultyBackend(MemoryBackend(), full), deadline=30))
    root = make_tree(tmp_path / "tree", files=300, size=2000)
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="is full"):
        index_image(f"tree:{root}", store, tag="never")
    assert time.monotonic() - t0 < 5
    assert_nothing_published(store)
    assert store_keys(store, "locks/") == set()


@pytest.mark.s3
def test_seaweedfs_killed_mid_upload(tmp_path: Path) -> None:
    """The issue's case: SeaweedFS's endpoint disappears while `casfs index` uploads."""
    if subprocess.run(["which", "weed"], capture_output=True).returncode != 0:
        pytest.skip("SeaweedFS 'weed' not installed")
    deadline = 5.0
    root = make_tree(tmp_path / "tree", files=3000, size=40_000)
    data = tmp_path / "seaweed"
    server = SeaweedServer(data).start()
    proxy = None
    try:
        bucket = server.make_bucket()
        proxy = LatencyProxy("127.0.0.1", server.s3_port, 20).start()
        env = {**os.environ, **s3_env(server, proxy.url), "CASFS_RETRY_DEADLINE": str(deadline)}
        env.pop("CASFS_STORE", None)
        store_url = f"s3://{bucket}/casfs"
        proc = subprocess.Popen(
            [sys.executable, "-m", "casfs.cli", "index", f"tree:{root}", "--store", store_url,
             "--tag", "never"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        client = server.client()
        try:
            t_start = time.monotonic()
            while True:  # wait until it is well into the upload
                found = client.list_objects_v2(Bucket=bucket, Prefix="casfs/blobs/", MaxKeys=1000)
                if found.get("KeyCount", 0) >= 300:
                    break
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() - t_start < 120, "the upload never got going"
                time.sleep(0.05)
            server.stop()  # SIGTERM, then SIGKILL: the endpoint is gone
            t_kill = time.monotonic()
            out, err = proc.communicate(timeout=deadline + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        took = time.monotonic() - t_kill
        assert proc.returncode == 3, (proc.returncode, err)
        assert took < deadline + 10, took  # about one retry deadline, not one per chunk
        errors = [line for line in err.splitlines() if line.startswith("casfs: error:")]
        assert len(errors) == 1, err
        assert "gave up after" in errors[0] and "published nothing" in errors[0], errors[0]
        assert out.strip() == ""  # no manifest reference printed
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
    # Back up on the same data: the index published nothing.
    again = SeaweedServer(data).start()
    try:
        client = again.client()
        for prefix in ("manifests/", "tags/", "layers/"):
            listed = client.list_objects_v2(Bucket=bucket, Prefix=f"casfs/{prefix}")
            assert listed.get("KeyCount", 0) == 0, prefix
    finally:
        again.stop()
