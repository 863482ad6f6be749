"""The store: one suite run against both backends (a local directory and SeaweedFS over S3),
plus the retry wrapper's logic against a fake flaky backend."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import zstandard
from hypothesis import given
from hypothesis import strategies as st

from casfs.errors import (
    BadStoreURL,
    BlobCorrupt,
    CasfsError,
    ObjectNotFound,
    StoreError,
    StoreUnreachable,
    TagNotFound,
    TransientStoreError,
)
from casfs.store import Store, keys, open_store
from casfs.store.backend import ObjectTooLarge
from casfs.store.content import STORE_MARKER, blob_key, compress, manifest_key
from casfs.store.retry import RetryingBackend

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_bucket_url")


@pytest.fixture
def store(store_url: str) -> Store:
    return open_store(store_url, create=True)


class CountingBackend:
    """Passes every call through and counts the puts."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url
        self.puts: list[str] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes) -> None:
        self.puts.append(key)
        self.inner.put(key, data)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on it now
    return port


# --- blobs ---------------------------------------------------------------------------------


def test_blob_round_trip(store: Store) -> None:
    data = os.urandom(100_000) + b"\0" * 100_000
    digest, uploaded = store.put_blob(data)
    assert digest == blake3.blake3(data).hexdigest()  # BLAKE3-256 of the uncompressed bytes
    assert 0 < uploaded < len(data)  # compressed: the zero half shrinks
    assert store.has_blob(digest)
    assert store.get_blob(digest) == data
    # A second Store over the same backend (nothing cached) reads it back the same.
    assert Store(store.backend).get_blob(digest) == data
    # the empty blob is a blob like any other
    empty, _ = store.put_blob(b"")
    assert empty == blake3.blake3(b"").hexdigest() and store.get_blob(empty) == b""


def test_blob_stored_zstd_compressed(store: Store) -> None:
    data = b"casfs " * 10_000
    digest, uploaded = store.put_blob(data)
    stored = store.backend.get(blob_key(digest))
    assert stored.startswith(ZSTD_MAGIC)
    assert len(stored) == uploaded < len(data) // 10
    assert zstandard.ZstdDecompressor().decompress(stored) == data
    assert blob_key(digest) == f"blobs/{digest[:2]}/{digest}"


def test_put_existing_blob_uploads_nothing(store: Store) -> None:
    data = os.urandom(5000)
    digest, uploaded = store.put_blob(data)
    assert uploaded > 0
    assert store.put_blob(data) == (digest, 0)
    # Also from a fresh Store that has never seen the blob: the backend is asked.
    counting = CountingBackend(store.backend)
    fresh = Store(counting)
    assert fresh.put_blob(data) == (digest, 0)
    assert fresh.put_blob(data, digest) == (digest, 0)
    assert counting.puts == []
    other, uploaded = fresh.put_blob(data + b"!")
    assert uploaded > 0 and counting.puts == [blob_key(other)]


def test_corrupt_blob_raises(store: Store) -> None:
    data = b"the real content" * 100
    digest, _ = store.put_blob(data)
    # valid zstd, wrong content
    store.backend.put(blob_key(digest), compress(b"tampered content" * 100))
    with pytest.raises(BlobCorrupt, match=digest):
        Store(store.backend).get_blob(digest)
    # not zstd at all
    store.backend.put(blob_key(digest), b"garbage, not a zstd frame")
    with pytest.raises(BlobCorrupt, match=digest):
        store.get_blob(digest)
    # truncated frame
    store.backend.put(blob_key(digest), compress(data)[:-5])
    with pytest.raises(BlobCorrupt):
        store.get_blob(digest)


def test_missing_blob_raises_not_found(store: Store) -> None:
    digest = blake3.blake3(b"never stored").hexdigest()
    assert not store.has_blob(digest)
    with pytest.raises(ObjectNotFound, match=digest):
        store.get_blob(digest)


def test_get_range(store: Store) -> None:
    store.backend.put("misc/obj", bytes(range(256)) * 4)
    assert store.backend.get_range("misc/obj", 10, 5) == bytes(range(10, 15))
    assert store.backend.get_range("misc/obj", 1020, 100) == bytes(range(252, 256))
    assert store.backend.get_range("misc/obj", 0, 1024) == bytes(range(256)) * 4
    assert store.backend.get_range("misc/obj", 2000, 10) == b""
    with pytest.raises(ObjectNotFound):
        store.backend.get_range("misc/missing", 0, 10)
    with pytest.raises(ObjectNotFound):
        store.backend.get("misc/missing")


def test_list_and_delete(store: Store) -> None:
    for key in ("a/1", "a/2", "a/b/3", "ab/4", "c"):
        store.backend.put(key, key.encode())
    assert set(store.backend.list("a/")) == {"a/1", "a/2", "a/b/3"}
    assert set(store.backend.list("a")) == {"a/1", "a/2", "a/b/3", "ab/4"}
    assert set(store.backend.list("zzz/")) == set()
    store.backend.delete("a/1")
    store.backend.delete("a/1")  # deleting a missing key is no error
    assert not store.backend.exists("a/1") and store.backend.exists("a/2")
    assert set(store.backend.list("a/")) == {"a/2", "a/b/3"}


def test_concurrent_puts(store: Store) -> None:
    payloads = [os.urandom(2000) for _ in range(40)]
    results: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(offset: int) -> None:
        try:
            for i in range(len(payloads)):  # every thread puts every blob, in its own order
                r = store.put_blob(payloads[(i + offset) % len(payloads)])
                with lock:
                    results.append(r)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k * 5,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    digests = {blake3.blake3(p).hexdigest() for p in payloads}
    assert {d for d, _ in results} == digests and len(results) == 8 * 40
    for p in payloads:
        assert store.get_blob(blake3.blake3(p).hexdigest()) == p
    assert {k.rsplit("/", 1)[1] for k in store.backend.list("blobs/")} == digests
    if store.url.startswith("file://"):
        assert os.listdir(Path(store.url[len("file://"):]) / ".tmp") == []  # no leftovers


# --- manifests and tags ----------------------------------------------------------------------


def test_manifest_round_trip(store: Store) -> None:
    data = b"CASFSMF\0" + os.urandom(3000)
    digest = store.put_manifest(data)
    assert digest == blake3.blake3(data).hexdigest()
    assert store.has_manifest(digest)
    assert store.get_manifest(digest) == data
    assert store.backend.get(manifest_key(digest)).startswith(ZSTD_MAGIC)
    assert store.put_manifest(data) == digest
    store.backend.put(manifest_key(digest), compress(data + b"x"))
    with pytest.raises(BlobCorrupt):
        store.get_manifest(digest)
    missing = blake3.blake3(b"no such manifest").hexdigest()
    assert not store.has_manifest(missing)
    with pytest.raises(ObjectNotFound, match=missing):
        store.get_manifest(missing)


def test_tags(store: Store) -> None:
    d1, d2 = blake3.blake3(b"1").hexdigest(), blake3.blake3(b"2").hexdigest()
    assert store.list_tags() == []
    store.set_tag("app:v1", d1)
    store.set_tag("app:latest", d1)
    store.set_tag("base", d2)
    store.set_tag("registry.example/team/app:1.2", d2)  # registry-style: one key
    assert store.backend.exists("tags/registry.example%2Fteam%2Fapp:1.2")
    assert store.get_tag("registry.example/team/app:1.2") == d2
    store.delete_tag("registry.example/team/app:1.2")
    assert store.get_tag("app:v1") == d1
    store.set_tag("app:latest", d2)  # last writer wins
    assert store.get_tag("app:latest") == d2
    assert store.list_tags() == ["app:latest", "app:v1", "base"]
    with pytest.raises(TagNotFound, match="nope"):
        store.get_tag("nope")
    store.delete_tag("base")
    with pytest.raises(TagNotFound):
        store.get_tag("base")
    assert store.list_tags() == ["app:latest", "app:v1"]
    for bad in ("", "a//b", "/a", "a/", "../x", "a/../x", ".hidden", "a/.b", "sp ace",
                "x" * 300):
        with pytest.raises(CasfsError, match="invalid tag"):
            store.set_tag(bad, d1)
    store.backend.put("tags/broken", b"not a digest")
    with pytest.raises(StoreError, match="broken"):
        store.get_tag("broken")


def test_layer_records(store: Store) -> None:
    key = "sha256:" + "ab" * 32
    assert store.get_layer_record(key) is None
    store.put_layer_record(key, b'{"ops":[]}')
    assert store.get_layer_record(key) == b'{"ops":[]}'
    assert list(store.backend.list("layers/")) == ["layers/sha256/" + "ab" * 32]


# --- bounded reads (both backends) -----------------------------------------------------------------
# The S3 half needs S3Backend.get(key, max_bytes=) raising ObjectTooLarge (casfs.store.s3,
# landing separately): these pass on SeaweedFS once it does.


def test_get_max_bytes(store: Store) -> None:
    """A bounded get returns an object of up to max_bytes, and refuses a bigger one with
    ObjectTooLarge (permanent: the retry wrapper does not retry it)."""
    data = os.urandom(10_000)
    store.backend.put("packs/" + "0" * 64, data)
    key = "packs/" + "0" * 64
    assert store.backend.get(key, max_bytes=10_000) == data
    assert store.backend.get(key) == data
    with pytest.raises(ObjectTooLarge):
        store.backend.get(key, max_bytes=9_999)
    with pytest.raises(ObjectTooLarge):
        store.backend.get(key, max_bytes=0)
    store.backend.put("packs/" + "1" * 64, b"")
    assert store.backend.get("packs/" + "1" * 64, max_bytes=0) == b""
    with pytest.raises(ObjectNotFound):
        store.backend.get("packs/" + "2" * 64, max_bytes=10)


def test_every_kind_is_read_within_its_bound(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object bigger than its kind can be is damage: a blob, manifest or tag over its
    bound is refused without being read whole (bounds shrunk here to keep uploads small)."""
    import casfs.store.content as content

    data = os.urandom(5000)
    digest, _ = store.put_blob(data)
    manifest = store.put_manifest(os.urandom(3000))
    store.set_tag("big", manifest)
    monkeypatch.setattr(content, "MAX_STORED_BLOB_SIZE", 1000)
    with pytest.raises(BlobCorrupt, match="damaged"):
        store.get_blob(digest)
    monkeypatch.setattr(content, "MAX_MANIFEST_SIZE", 1000)
    with pytest.raises(BlobCorrupt, match="damaged"):
        store.get_manifest(manifest)
    store.backend.put("tags/huge", manifest.encode() + b" " * (content.MAX_SMALL_OBJECT + 1))
    with pytest.raises(StoreError, match="holds no manifest digest"):
        store.get_tag("huge")
    store.backend.put(STORE_MARKER, b'{"format": "casfs-store", "version": 1}'
                      + b" " * content.MAX_SMALL_OBJECT)
    with pytest.raises(StoreError, match="not a casfs store marker"):
        Store(store.backend).check_format(create=False)


def test_huge_store_marker_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A 3 GiB casfs-store.json (sparse: no disk used) is refused from its size."""
    url = f"file://{tmp_path / 'store'}"
    open_store(url, create=True)
    with open(tmp_path / "store" / STORE_MARKER, "r+b") as f:
        f.truncate(3 << 30)
    with pytest.raises(StoreError, match="not a casfs store marker"):
        open_store(url)


def test_file_store_reads_only_regular_files(tmp_path: Path) -> None:
    """Symlinks, FIFOs and directories under a key are refused (a FIFO without blocking)."""
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    root = tmp_path / "store"
    secret = tmp_path / "secret"
    secret.write_bytes(b"not the store's")
    (root / "tags").mkdir()
    os.symlink(secret, root / "tags" / "link")
    os.mkfifo(root / "tags" / "fifo")
    (root / "tags" / "dir").mkdir()
    for name, why in (("link", "symlink"), ("fifo", "not a regular file"),
                      ("dir", "not a regular file")):
        with pytest.raises(StoreError, match=why):
            store.backend.get(f"tags/{name}")
        with pytest.raises(StoreError, match=why):
            store.backend.get_range(f"tags/{name}", 0, 10)
        with pytest.raises(StoreError):
            store.get_tag(name)


def test_file_store_bounded_read_stops_at_the_bound(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that grows after its size was taken is read to max_bytes + 1 at most."""
    import casfs.store.local as local

    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    store.backend.put("packs/" + "a" * 64, b"x" * 100)
    real_fstat = os.fstat

    class Small:  # fstat reports 100 bytes; the file then holds a million
        def __init__(self, st: os.stat_result) -> None:
            self.st_mode, self.st_size = st.st_mode, 100

    (tmp_path / "store" / "packs" / ("a" * 64)).write_bytes(b"y" * 1_000_000)
    read: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        out = real_read(fd, n)
        read.append(len(out))
        return out

    monkeypatch.setattr(local.os, "fstat", lambda fd: Small(real_fstat(fd)))
    monkeypatch.setattr(local.os, "read", counting_read)
    with pytest.raises(ObjectTooLarge, match="grew"):
        store.backend.get("packs/" + "a" * 64, max_bytes=5000)
    assert sum(read) == 5001


# --- batched syncs -------------------------------------------------------------------------------


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths os.fsync is called on, in order."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return paths


def test_file_put_is_durable_on_return(tmp_path: Path, fsynced: list[str]) -> None:
    """Outside deferred_syncs a put fsyncs its file and the directory the rename changed,
    and every directory it had to create."""
    from casfs.store.local import FileBackend

    backend = FileBackend(tmp_path / "s")
    backend.put("blobs/ab/ab00", b"data")
    root = str(tmp_path / "s")
    assert len(fsynced) == 4 and fsynced[0].startswith(f"{root}/.tmp/"), "the file itself"
    assert fsynced[1:] == [f"{root}/blobs", root, f"{root}/blobs/ab"]
    fsynced.clear()
    backend.put("blobs/ab/ab01", b"more")
    assert len(fsynced) == 2 and fsynced[1] == f"{root}/blobs/ab"


def test_file_deferred_syncs(tmp_path: Path, fsynced: list[str]) -> None:
    """Inside deferred_syncs puts fsync nothing; sync() fsyncs each file written, then
    each directory changed; leaving the block syncs; blocks nest."""
    from casfs.store.local import FileBackend

    backend = FileBackend(tmp_path / "s")
    root = str(tmp_path / "s")
    with backend.deferred_syncs():
        for i in range(20):
            backend.put(f"blobs/{i:02x}/{i:02x}{i}", b"x" * i)
        assert fsynced == []
        backend.sync()
        files = {f"{root}/blobs/{i:02x}/{i:02x}{i}" for i in range(20)}
        dirs = {f"{root}/blobs/{i:02x}" for i in range(20)} | {f"{root}/blobs", root}
        assert set(fsynced[:20]) == files, "files first"
        assert set(fsynced[20:]) == dirs
        fsynced.clear()
        backend.sync()
        assert fsynced == [], "nothing owed twice"
        with backend.deferred_syncs():
            backend.put("tags/inner", b"1")
        assert fsynced[0] == f"{root}/tags/inner"
        assert sorted(fsynced[1:]) == [root, f"{root}/tags"]
        fsynced.clear()
        backend.put("tags/outer", b"2")
        assert fsynced == [], "still deferred: the outer block is open"
    assert fsynced == [f"{root}/tags/outer", f"{root}/tags"]
    fsynced.clear()
    with pytest.raises(RuntimeError), backend.deferred_syncs():
        backend.put("tags/failing", b"3")
        raise RuntimeError("the block's own failure")
    assert f"{root}/tags/failing" in fsynced, "leaving by an exception syncs too"


class RecordingBackend:
    """Passes every call through; records puts with whether a deferred block was open,
    and syncs, in one sequence."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.url = inner.url
        self.events: list[tuple[str, str, bool]] = []
        self.open_blocks = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)
        self.events.append(("put", key, self.open_blocks > 0))

    def sync(self) -> None:
        self.inner.sync()
        self.events.append(("sync", "", self.open_blocks > 0))

    @contextlib.contextmanager
    def deferred_syncs(self) -> Iterator[None]:
        self.open_blocks += 1
        try:
            with self.inner.deferred_syncs():
                yield
        finally:
            self.open_blocks -= 1
            self.events.append(("left", "", False))


def test_index_defers_only_blob_and_pack_syncs(tmp_path: Path) -> None:
    """casfs index writes blobs and packs inside deferred_syncs, leaves it (syncing them)
    before its first pack index, layer record, manifest or tag, which are durable puts."""
    from casfs.store.local import FileBackend
    from casfs.testing.ocibuild import file, write_oci_layout
    from indexer.index import index_image

    write_oci_layout(tmp_path / "img", [[file("a", b"a" * 1000), file("b", os.urandom(300_000))]],
                     tag="v")
    recording = RecordingBackend(FileBackend(tmp_path / "store"))
    index_image(f"oci:{tmp_path / 'img'}:v", Store(recording), tag="t")
    events = recording.events
    left = events.index(("left", "", False))
    inside = [key for what, key, deferred in events[:left] if what == "put" and deferred]
    assert inside and all(k.startswith(("blobs/", "packs/")) for k in inside)
    after = [key for what, key, deferred in events[left:] if what == "put"]
    assert not any(deferred for _w, _k, deferred in events[left:])
    kinds = [k.split("/")[0] for k in after if not k.startswith("locks/")]
    assert kinds == ["packidx", "layers", "manifests", "tags"]


def test_retry_wrapper_passes_bounds_and_syncs_through(no_sleep: list[float]) -> None:
    flaky = FlakyBackend(failures=1)
    r = RetryingBackend(flaky)
    assert r.get("k", max_bytes=100) == b"value of k" and flaky.calls == 2
    with pytest.raises(ObjectTooLarge):
        r.get("k", max_bytes=3)
    assert flaky.calls == 3, "ObjectTooLarge is permanent: not retried"
    with r.deferred_syncs():
        pass
    r.sync()
    assert flaky.deferred == 1 and flaky.synced == 1


def test_backends_keep_the_protocol() -> None:
    """Every backend in casfs has each method of ObjectBackend with its parameters (a
    renamed or missing one is found here, not in the first index that calls it)."""
    import inspect

    from casfs.store.backend import ObjectBackend
    from casfs.store.local import FileBackend
    from casfs.store.s3 import S3Backend

    wanted = {name: inspect.signature(fn) for name, fn in vars(ObjectBackend).items()
              if callable(fn) and not name.startswith("_")}
    assert {"get", "get_range", "put", "sync", "deferred_syncs", "list_info"} <= set(wanted)
    for cls in (FileBackend, RetryingBackend, S3Backend):
        for name, sig in wanted.items():
            have = inspect.signature(getattr(cls, name))
            assert [(p.name, p.kind) for p in have.parameters.values()] == \
                [(p.name, p.kind) for p in sig.parameters.values()], f"{cls.__name__}.{name}"


# --- keys ----------------------------------------------------------------------------------------

H = "0123456789abcdef" * 4  # a 64-hex digest
H2 = "fedcba9876543210" * 4


def test_keys_round_trip() -> None:
    """Every builder's key parses back to its kind and fields."""
    layer = "sha256:" + H2
    cases = [
        (keys.STORE_MARKER, keys.Kind.MARKER, {}),
        (keys.blob_key(H), keys.Kind.BLOB, {"digest": H}),
        (keys.manifest_key(H), keys.Kind.MANIFEST, {"digest": H}),
        (keys.pack_key(H), keys.Kind.PACK, {"digest": H}),
        (keys.tag_key("web:1.0@x+y"), keys.Kind.TAG, {"name": "web:1.0@x+y"}),
        (keys.layer_record_key(layer), keys.Kind.LAYER_RECORD, {"layer": layer}),
        (keys.pack_index_key("sha512:" + H + H2), keys.Kind.PACK_INDEX,
         {"layer": "sha512:" + H + H2}),
        (keys.trace_key(H, "1795257722000-0a1b2c3d"), keys.Kind.TRACE,
         {"manifest": H, "trace_id": "1795257722000-0a1b2c3d"}),
        (keys.trace_pointer_key(layer, H, "1795257722000-0a1b2c3d"), keys.Kind.TRACE_POINTER,
         {"layer": H2, "manifest": H, "trace_id": "1795257722000-0a1b2c3d"}),
        (keys.lock_key("index", 1795257722, "0a1b2c3d4e5f"), keys.Kind.LOCK, {"name": "index"}),
    ]
    for key, kind, fields in cases:
        parsed = keys.parse_key(key)
        assert parsed.kind == kind and parsed.key == key, key
        for name, value in fields.items():
            assert getattr(parsed, name) == value, (key, name)
    pointer = keys.parse_key(keys.trace_pointer_key(layer, H, "1795257722000-0a1b2c3d"))
    assert pointer.trace == keys.trace_key(H, "1795257722000-0a1b2c3d")
    assert keys.blob_key(H) == f"blobs/{H[:2]}/{H}" and keys.layer_record_key(layer) == \
        f"layers/sha256/{H2}" and keys.traces_prefix(H) == f"traces/m/{H}/"


@pytest.mark.parametrize("key", [
    "", "casfs-store.json/x", "blobs/" + H, f"blobs/zz/{H}", f"blobs/{H[:2]}/{H}x",
    f"blobs/{H[:2]}/{H.upper()}", "manifests/abc", f"manifests/{H}/x", "packs/", "tags/",
    "tags/a/b", "tags/.hidden", "tags/" + "a" * 256, "tags/a%2F..%2Fb", f"layers/md5/{H}", f"layers/sha256/{H[:-1]}",
    f"packidx/sha512/{H}", f"traces/m/{H}", f"traces/m/{H}/a.b", "traces/m/abc/1",
    f"traces/l/{H}/{H}", f"traces/l/xyz/{H}.1", f"traces/x/{H}/1", "locks/gc", "locks/gc-1-xyz",
    "random", ".tmp/x.part",
])
def test_bad_keys_are_reported(key: str) -> None:
    with pytest.raises(keys.BadKey):
        keys.parse_key(key)
    assert isinstance(keys.try_parse_key(key), keys.BadKey)


@given(st.text(alphabet=st.sampled_from("abf09/._-:sha256mtlbpckoxz"), max_size=90) | st.text())
def test_parse_key_never_crashes(key: str) -> None:
    """Whatever a listing holds, parse_key answers a ParsedKey or BadKey."""
    try:
        parsed = keys.parse_key(key)
    except keys.BadKey:
        return
    assert parsed.key == key


def test_builders_refuse_bad_names() -> None:
    for bad in ("", "a//b", "/a", "a/../b", "-x", "x" * 256, "a b", "a%2Fb"):
        with pytest.raises(keys.BadKey):
            keys.tag_key(bad)
    for bad in ("", "a/b", "a.b", "../x"):
        with pytest.raises(keys.BadKey):
            keys.trace_key(H, bad)


# --- opening stores ------------------------------------------------------------------------------


def test_store_marker_and_newer_version_refused(store_url: str) -> None:
    store = open_store(store_url, create=True)
    marker = json.loads(store.backend.get(STORE_MARKER))
    assert marker == {"format": "casfs-store", "version": 1}
    open_store(store_url)  # reopening an existing store works
    store.backend.put(STORE_MARKER, json.dumps({"format": "casfs-store", "version": 2}).encode())
    with pytest.raises(StoreError, match="version 2.*upgrade casfs"):
        open_store(store_url)
    with pytest.raises(StoreError):
        open_store(store_url, create=True)
    store.backend.put(STORE_MARKER, b"\xff not json")
    with pytest.raises(StoreError, match="not a casfs store marker"):
        open_store(store_url)


@pytest.mark.parametrize("url", [
    "relative/path", "/abs/path/without/scheme", "file://host/x", "file:relative",
    "s3://", "s3:///prefix", "http://example.com/bucket", "gs://bucket/x", "",
])
def test_bad_store_url(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASFS_STORE", "nonsense://x")  # "" falls back to the environment
    with pytest.raises(BadStoreURL, match="bad store URL"):
        open_store(url)


def test_store_url_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CASFS_STORE", f"file://{tmp_path / 'env-store'}")
    store = open_store(None, create=True)
    assert store.url == f"file://{tmp_path / 'env-store'}"
    assert (tmp_path / "env-store" / STORE_MARKER).is_file()


def test_missing_file_store_not_created_for_reading(tmp_path: Path) -> None:
    with pytest.raises(StoreUnreachable, match="does not exist"):
        open_store(f"file://{tmp_path / 'absent'}")
    assert not (tmp_path / "absent").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreUnreachable, match="cannot create"):
        open_store(f"file://{tmp_path / 'file' / 'store'}", create=True)


@pytest.mark.s3
def test_unreachable_s3_endpoint(s3_bucket_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(StoreError) as info:
        open_store(s3_bucket_url, create=True, retry_deadline=1.0)
    elapsed = time.monotonic() - started
    assert isinstance(info.value, StoreUnreachable)
    message = str(info.value)
    assert "cannot reach store" in message and f"127.0.0.1:{port}" in message
    assert "\n" not in message
    assert elapsed < 15  # the default retry budget is 30 s: it must not be spent here


@pytest.mark.s3
def test_missing_bucket(seaweed: object, s3_bucket_url: str) -> None:
    url = "s3://no-such-bucket-casfs/prefix"
    with pytest.raises(StoreUnreachable, match="no-such-bucket-casfs"):
        open_store(url, create=True, retry_deadline=1.0)


@pytest.mark.s3
@pytest.mark.s3
def test_s3_listing_pages_and_odd_keys(s3_bucket_url: str) -> None:
    """ListObjectsV2 comes in pages of 1,000: a listing follows the continuation token,
    and keys needing percent-encoding (space, plus, unicode) list and delete as written."""
    import time as _time
    from concurrent.futures import ThreadPoolExecutor

    store = open_store(s3_bucket_url, create=True)
    keys = [f"many/{i:05d}" for i in range(1234)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.backend.put(k, b"x"), keys))
    assert sorted(store.backend.list("many/")) == keys
    odd = ["odd/a b+c", "odd/ü=&?", "odd/x~y"]
    for k in odd:
        store.backend.put(k, k.encode())
    info = list(store.backend.list_info("odd/"))
    assert sorted(k for k, _, _ in info) == sorted(odd)
    assert all(size == len(k.encode()) and abs(mtime - _time.time()) < 600
               for k, size, mtime in info)
    store.backend.delete("odd/a b+c")
    assert sorted(store.backend.list("odd/")) == sorted(odd[1:])


def test_s3_prefix_isolation(s3_bucket_url: str) -> None:
    """Two prefixes of one bucket are two stores."""
    a = open_store(s3_bucket_url, create=True)
    b = open_store(s3_bucket_url + "-other", create=True)
    digest, _ = a.put_blob(b"only in a")
    a.set_tag("t", digest)
    assert not b.has_blob(digest)
    assert b.list_tags() == [] and a.list_tags() == ["t"]


# --- retrying ------------------------------------------------------------------------------


class FlakyBackend:
    """Fails the first `failures` calls with `error`, then answers."""

    url = "fake://flaky"

    def __init__(self, failures: int, error: type[StoreError] = TransientStoreError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0
        self.synced = 0
        self.deferred = 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error(f"failure {self.calls}")

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        self._maybe_fail()
        value = b"value of " + key.encode()
        if max_bytes is not None and len(value) > max_bytes:
            raise ObjectTooLarge(f"{key} is {len(value)} bytes")
        return value

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._maybe_fail()
        return b"0123456789"[offset : offset + length]

    def put(self, key: str, data: bytes) -> None:
        self._maybe_fail()

    def exists(self, key: str) -> bool:
        self._maybe_fail()
        return True

    def delete(self, key: str) -> None:
        self._maybe_fail()

    def list(self, prefix: str) -> Iterator[str]:
        self._maybe_fail()
        yield from (prefix + "1", prefix + "2")

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        self._maybe_fail()
        yield from ((prefix + "1", 1, 0.0), (prefix + "2", 1, 0.0))

    def sync(self) -> None:
        self.synced += 1

    def deferred_syncs(self) -> contextlib.AbstractContextManager[None]:
        self.deferred += 1
        return contextlib.nullcontext()


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """time.sleep in the retry module records its delays and advances a fake clock."""
    import casfs.store.retry as retry

    slept: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(retry.time, "sleep", lambda d: (slept.append(d), clock.__setitem__(0, clock[0] + d)))
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    return slept


def test_retry_recovers_from_transient_errors(no_sleep: list[float]) -> None:
    flaky = FlakyBackend(failures=3)
    r = RetryingBackend(flaky, deadline=30, base_delay=0.05, max_delay=2.0)
    assert r.get("k") == b"value of k"
    assert flaky.calls == 4 and r.retries == 3 and len(no_sleep) == 3
    assert all(0 <= d <= 2.0 for d in no_sleep)
    flaky2 = FlakyBackend(failures=2)
    r2 = RetryingBackend(flaky2)
    assert r2.get_range("k", 2, 3) == b"234" and flaky2.calls == 3
    flaky3 = FlakyBackend(failures=1)
    assert list(RetryingBackend(flaky3).list("p/")) == ["p/1", "p/2"] and flaky3.calls == 2
    assert r.url == "fake://flaky"


@pytest.mark.parametrize("error", [ObjectNotFound, StoreUnreachable, StoreError, BlobCorrupt])
def test_retry_passes_permanent_errors_at_once(error: type[StoreError],
                                               no_sleep: list[float]) -> None:
    flaky = FlakyBackend(failures=5, error=error)
    r = RetryingBackend(flaky)
    with pytest.raises(error, match="failure 1"):
        r.put("k", b"x")
    assert flaky.calls == 1 and no_sleep == [] and r.retries == 0


def test_retry_gives_up_at_deadline(no_sleep: list[float]) -> None:
    flaky = FlakyBackend(failures=10**9)
    r = RetryingBackend(flaky, deadline=5.0, base_delay=0.05, max_delay=1.0)
    with pytest.raises(TransientStoreError, match=r"failure \d+ \(gave up after \d+ attempts"):
        r.exists("k")
    assert sum(no_sleep) <= 5.0
    assert 5 <= flaky.calls < 200
    assert max(no_sleep) <= 1.0
