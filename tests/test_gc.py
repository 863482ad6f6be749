"""casfs gc and store locks, on the file store and on SeaweedFS: what is live survives
(and still reads back byte for byte), what nothing reaches goes, young objects wait out
the grace period, and gc and index refuse to run over each other."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from casfs.errors import CasfsError, StoreBusy, TransientStoreError
from casfs.gc import collect, parse_duration
from casfs.manifest import Manifest
from casfs.store import Store, open_store
from casfs.store.locks import gc_lock, index_lock
from casfs.testing.ocibuild import file, write_oci_layout
from prefetch.trace import Trace, TraceChunk
from tests.treecheck import index, manifest_snapshot, run_cli, store_keys

SHARED = bytes(range(256)) * 2000  # two chunks, in both images


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = f"file://{tmp_path / 'store'}" if request.param == "file" else request.getfixturevalue("s3_bucket_url")
    return open_store(url, create=True)


def two_images(tmp_path: Path, store: Store) -> tuple[Manifest, Manifest]:
    write_oci_layout(tmp_path / "a", [[file("shared", SHARED), file("only-a", b"a" * 5000)]], tag="v")
    write_oci_layout(tmp_path / "b", [[file("shared", SHARED), file("only-b", b"b" * 7000)]], tag="v")
    _, a = index(f"oci:{tmp_path / 'a'}:v", store, tag="a")
    _, b = index(f"oci:{tmp_path / 'b'}:v", store, tag="b")
    return a, b


def add_trace(store: Store, m: Manifest) -> str:
    """A trace with a pack, as a boot of m would leave."""
    digest = next(iter(m.chunk_digests()))
    pack = store.put_pack(b"not really frames of " + m.digest.encode())
    trace = Trace(m.digest, time.time(), 1.0, [TraceChunk(digest, 10, 0, "/x", 0, 5)], pack)
    layers = [ly["digest"] for ly in m.meta["layers"]]
    store.put_trace(m.digest, "0000000000001-abcdef01", trace.to_json(), layers)
    return pack


def test_gc_keeps_everything_tagged(store: Store, tmp_path: Path) -> None:
    a, b = two_images(tmp_path, store)
    before = store_keys(store, "")
    report = collect(store, grace=0)
    assert report.swept == {} and report.live_manifests == 2
    assert store_keys(store, "") - {k for k in store_keys(store, "") if k.startswith("locks/")} \
        == before - {k for k in before if k.startswith("locks/")}
    assert manifest_snapshot(a, store)  # every byte still reads back, verified


def test_gc_sweeps_what_an_untagged_image_alone_held(store: Store, tmp_path: Path) -> None:
    a, b = two_images(tmp_path, store)
    pack_b = add_trace(store, b)
    pack_a = add_trace(store, a)
    only_b = set(b.chunk_digests()) - set(a.chunk_digests())
    assert len(only_b) == 1
    store.delete_tag("b")

    dry = collect(store, grace=0, dry_run=True)
    assert dry.swept.get("blobs") == 1 and dry.swept.get("manifests") == 1
    assert store.has_manifest(b.digest), "a dry run deletes nothing"

    report = collect(store, grace=0)
    assert report.swept == dry.swept
    assert not store.has_manifest(b.digest)
    assert not store.has_blob(next(iter(only_b)))
    assert store.list_traces(b.digest) == []
    assert f"packs/{pack_b}" not in store_keys(store, "packs/")
    assert f"packs/{pack_a}" in store_keys(store, "packs/")
    assert store.list_traces(a.digest) and all(m == a.digest for m, _ in
                                               store.list_layer_traces(a.meta["layers"][0]["digest"]))
    # The survivor is whole: every chunk of a still reads back and verifies.
    fresh = Manifest(store.get_manifest(a.digest), a.digest)
    assert manifest_snapshot(fresh, store)
    assert store_keys(store, "locks/") == set(), "gc releases its lock"


def test_gc_grace_period_protects_young_objects(store: Store, tmp_path: Path) -> None:
    _, b = two_images(tmp_path, store)
    store.delete_tag("b")
    report = collect(store, grace=3600)
    assert report.swept == {}
    assert store.has_manifest(b.digest), "an untagged manifest younger than the grace is live"
    # Pretend an hour has passed: now it goes.
    later = collect(store, grace=3600, now=time.time() + 7200)
    assert later.swept.get("manifests") == 1


def test_kept_layer_record_keeps_its_blobs(store: Store, tmp_path: Path) -> None:
    """A layer whose files are all whited out leaves chunks only its record names: gc must
    keep them while it keeps the record, or a re-index would reuse the record and
    produce a manifest pointing at swept blobs."""
    from casfs.testing.ocibuild import whiteout

    write_oci_layout(tmp_path / "w", [[file("gone", b"g" * 9000)], [whiteout("gone")]], tag="v")
    _, m = index(f"oci:{tmp_path / 'w'}:v", store, tag="w")
    assert m.resolve("/gone") == 0
    collect(store, grace=0)
    # Re-index reuses the layer records; the result must read back whole.
    result, again = index(f"oci:{tmp_path / 'w'}:v", store, tag="w")
    assert result.layers_reused == 2
    record = json.loads(store.get_layer_record(m.meta["layers"][0]["digest"]) or b"{}")
    digest = record["ops"][0]["chunks"][0][0]
    assert store.has_blob(digest)


def test_gc_refuses_while_an_index_holds_its_lock(store: Store, tmp_path: Path) -> None:
    _, b = two_images(tmp_path, store)
    store.delete_tag("b")
    lock = index_lock(store)
    with pytest.raises(StoreBusy, match="index running"):
        collect(store, grace=0)
    assert store.has_manifest(b.digest), "nothing deleted"
    lock.release()
    collect(store, grace=0)
    assert not store.has_manifest(b.digest)


def test_index_refuses_while_gc_holds_its_lock(store: Store) -> None:
    lock = gc_lock(store)
    with pytest.raises(StoreBusy, match="gc running"):
        index_lock(store)
    assert [k for k in store_keys(store, "locks/") if "index" in k] == [], "the loser removes its lock"
    lock.release()
    index_lock(store).release()


def test_gc_cli(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url, create=True)
    two_images(tmp_path, store)
    run_cli("tag", "rm", "b", "--store", url)
    out = run_cli("gc", "--dry-run", "--grace", "0", "--store", url).stdout
    assert "would delete: 1 blobs" in out and "1 manifests" in out
    out = run_cli("gc", "--grace", "0s", "--store", url).stdout
    assert "deleted: 1 blobs" in out
    assert "b\t" not in run_cli("tag", "ls", "--store", url).stdout


def test_parse_duration() -> None:
    assert parse_duration("90") == 90 and parse_duration("15m") == 900
    assert parse_duration("6h") == 21600 and parse_duration("2d") == 172800
    with pytest.raises(Exception, match="bad duration"):
        parse_duration("soon")


def test_index_cli_refuses_while_gc_runs(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url, create=True)
    write_oci_layout(tmp_path / "a", [[file("x", b"x")]], tag="v")
    lock = gc_lock(store)
    proc = run_cli("index", f"oci:{tmp_path / 'a'}:v", "--store", url)
    assert proc.returncode == 9 and proc.stderr.startswith("casfs: error: store")
    assert "gc running" in proc.stderr and proc.stderr.count("\n") == 1
    assert store_keys(store, "manifests/") == set()
    lock.release()
    assert run_cli("index", f"oci:{tmp_path / 'a'}:v", "--store", url).returncode == 0
    assert store_keys(store, "locks/") == set(), "index releases its lock"


def test_gc_keeps_keys_it_does_not_understand(store: Store, tmp_path: Path) -> None:
    """gc deletes only what it can name: a key of no kind the store format has (under
    blobs/, packs/, traces/...) is kept and counted, whatever its age."""
    _, b = two_images(tmp_path, store)
    store.delete_tag("b")
    strangers = {"blobs/zz/not-a-digest", "packs/garbage", "traces/m/xyz/1", "layers/md5/ab",
                 "manifests/" + "A" * 64}
    for key in strangers:
        store.backend.put(key, b"someone else's")
    report = collect(store, grace=0, now=time.time() + 3600)
    assert report.kept.get("unknown") == len(strangers)
    assert report.swept.get("manifests") == 1, "the untagged image still goes"
    assert strangers <= store_keys(store, "")


def test_gc_sweeps_damaged_records_and_traces(store: Store, tmp_path: Path) -> None:
    """A layer record or a trace that does not parse protects nothing and is swept (its
    readers ignore it: index reads the layer again); the image stays whole."""
    a, _ = two_images(tmp_path, store)
    layer = a.meta["layers"][0]["digest"]
    store.put_layer_record(layer, b'{"version": 1, "ops": [{"op": "add"}]}')
    store.put_trace(a.digest, "0000000000002-deadbeef", b"not json", [layer])
    report = collect(store, grace=0)
    assert report.swept.get("layers") == 1 and report.swept.get("traces") == 1
    assert report.swept.get("trace-pointers") == 1
    assert store.get_layer_record(layer) is None and store.list_traces(a.digest) == []
    result, again = index(f"oci:{tmp_path / 'a'}:v", store, tag="a")
    assert result.layers_reused == 0 and again.digest == a.digest
    assert manifest_snapshot(again, store)


class _TracesFail:
    """A backend whose trace reads fail (the store, not the trace, is at fault)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        if key.startswith("traces/m/"):
            raise TransientStoreError(f"injected: {key} timed out")
        return self.inner.get(key, max_bytes=max_bytes)  # type: ignore[attr-defined]


def test_gc_stops_when_the_store_fails_reading_a_trace(store: Store, tmp_path: Path) -> None:
    """A trace that cannot be read now is no damaged trace: gc stops, deletes nothing
    (before, it swept the trace and the pack it located)."""
    a, b = two_images(tmp_path, store)
    pack = add_trace(store, a)
    store.delete_tag("b")
    before = store_keys(store, "")
    with pytest.raises(CasfsError, match="gc stopped: cannot read trace"):
        collect(Store(_TracesFail(store.backend)), grace=0)  # type: ignore[arg-type]
    assert store_keys(store, "") == before and f"packs/{pack}" in before
