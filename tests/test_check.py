"""casfs check, on the file store and on SeaweedFS: a store built by indexing a small
image (with directory packs, a layer record naming a whited-out file's blob, and a boot
trace with its pack) passes; each kind of damage done to it is reported, one line per
problem, with a non-zero exit; and checking changes nothing in the store."""

from __future__ import annotations

import argparse
import random
import struct
import time
from pathlib import Path

import pytest

from casfs import packindex
from casfs.check import CHECK_FAILED_EXIT, CheckReport, add_arguments, cmd_check, run_check
from casfs.manifest import Manifest
from casfs.store import Store, open_store
from casfs.store.content import compress
from casfs.store.keys import blob_key, pack_key, trace_key
from casfs.testing.ocibuild import file, whiteout, write_oci_layout
from prefetch.trace import Trace, TraceChunk
from tests.treecheck import index

RANDOM = random.Random(7).randbytes(3000)  # incompressible: its frame holds it raw
TRACE_ID = "1795257722000-0a1b2c3d"


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file://{tmp_path / 'store'}"
    return request.getfixturevalue("s3_bucket_url")


@pytest.fixture
def built(store_url: str, tmp_path: Path) -> tuple[Store, Manifest]:
    """A store holding one tagged image and a boot trace of it with its pack."""
    store = open_store(store_url, create=True)
    write_oci_layout(tmp_path / "img", [
        [file("big", bytes(range(256)) * 2000), file("small/random", RANDOM),
         file("small/ys", b"y" * 4000), file("gone", b"g" * 9000)],
        [whiteout("gone"), file("z", b"z" * 100)],
    ], tag="v")
    _, m = index(f"oci:{tmp_path / 'img'}:v", store, tag="a")
    add_trace(store, m)
    return Store(open_store(store_url).backend), m  # a fresh Store: no memo of blobs seen


def add_trace(store: Store, m: Manifest, trace_id: str = TRACE_ID) -> str:
    """A trace of m whose pack holds the stored form of each of its chunks."""
    chunks, frames, offset = [], [], 0
    for path, ino in m.walk():
        for c in m.chunks(ino):
            frame = store.get_blob_compressed(c.digest)
            chunks.append(TraceChunk(c.digest, c.length, len(chunks), path.decode(), offset,
                                     len(frame)))
            frames.append(frame)
            offset += len(frame)
    pack = store.put_pack(b"".join(frames))
    trace = Trace(m.digest, time.time(), 1.0, chunks, pack)
    store.put_trace(m.digest, trace_id, trace.to_json(), [ly["digest"] for ly in m.meta["layers"]])
    return pack


def snapshot(store: Store) -> dict[str, bytes]:
    """Every object of the store, byte for byte."""
    return {key: store.backend.get(key) for key in store.backend.list("")}


def check(store: Store, read_data: bool = False) -> CheckReport:
    """run_check, asserting it left the store as it found it."""
    before = snapshot(store)
    report = run_check(store, read_data=read_data, workers=4)
    assert snapshot(store) == before, "check changed the store"
    return report


def lines(report: CheckReport) -> list[str]:
    return [str(p) for p in report.problems]


def chunk_of(store: Store, m: Manifest, path: str) -> str:
    return m.chunks(m.resolve(path))[0].digest


def dir_pack(store: Store, m: Manifest) -> tuple[str, int]:
    """A directory pack of the image's first layer, and its size."""
    raw = store.get_pack_index(m.meta["layers"][0]["digest"], packindex.MAX_INDEX_BYTES)
    pack = next(iter(packindex.parse(raw or b"", "x").values()))[0]
    return pack, len(store.backend.get(pack_key(pack)))


def run_cmd(url: str, *extra: str) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store")
    add_arguments(parser)
    return cmd_check(parser.parse_args(["--store", url, *extra]))


# -- a clean store ------------------------------------------------------------------------


def test_clean_store_passes(built: tuple[Store, Manifest], store_url: str,
                            capsys: pytest.CaptureFixture[str]) -> None:
    store, m = built
    report = check(store, read_data=True)
    assert report.ok, lines(report)
    assert report.checked["manifests"] == 1 and report.checked["layers"] == 2
    assert report.checked["packidx"] == 2 and report.checked["traces"] == 1
    assert report.read_blobs == report.checked["blobs"] >= len(m.chunk_digests()) + 1
    # Each chunk is in the trace's pack, the small files in a directory pack as well.
    assert report.read_pack_entries >= len(m.chunk_digests()) + 2
    assert run_cmd(store_url, "--read-data") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "no problems found" and out[0].startswith("checked: ")


# -- damage, one kind at a time -------------------------------------------------------------


def test_missing_blob(built: tuple[Store, Manifest], store_url: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    store, m = built
    digest = chunk_of(store, m, "/big")
    store.backend.delete(blob_key(digest))
    report = check(store)
    assert lines(report) == [f"blobs {blob_key(digest)}: missing (a chunk of manifest "
                             f"{m.digest})"]
    assert run_cmd(store_url) == CHECK_FAILED_EXIT
    out = capsys.readouterr().out.splitlines()
    assert out[0] == lines(report)[0] and out[-1] == "1 problems"


def test_blob_changed_in_place_is_found_by_read_data(built: tuple[Store, Manifest]) -> None:
    """Bytes changed but the size kept: the listing cannot tell; reading the blob can."""
    store, m = built
    digest = chunk_of(store, m, "/small/random")
    key = blob_key(digest)
    frame = bytearray(store.backend.get(key))
    frame[len(frame) // 2] ^= 0xFF
    store.backend.put(key, bytes(frame))
    assert check(store).ok
    report = check(store, read_data=True)
    assert len(report.problems) == 1
    assert lines(report)[0].startswith(f"blobs {key}: damaged: blob {digest} does not match")


def test_truncated_blob_frame_is_found_by_read_data(built: tuple[Store, Manifest]) -> None:
    store, m = built
    digest = chunk_of(store, m, "/small/ys")
    key = blob_key(digest)
    store.backend.put(key, store.backend.get(key)[:-5])
    assert check(store).ok
    report = check(store, read_data=True)
    assert [(p.kind, p.key) for p in report.problems] == [("blobs", key)]
    assert "not a valid zstd frame" in report.problems[0].what


def test_truncated_pack(built: tuple[Store, Manifest], store_url: str) -> None:
    store, m = built
    pack, size = dir_pack(store, m)
    store.backend.put(pack_key(pack), store.backend.get(pack_key(pack))[: size - 10])
    report = check(store)
    assert [(p.kind, p.key) for p in report.problems] == [("packs", pack_key(pack))]
    assert f"truncated: {size - 10} bytes, but packidx/sha256/" in report.problems[0].what
    assert run_cmd(store_url) == CHECK_FAILED_EXIT


def test_pack_entry_changed_in_place_is_found_by_read_data(
        built: tuple[Store, Manifest]) -> None:
    store, m = built
    pack, _ = dir_pack(store, m)
    data = bytearray(store.backend.get(pack_key(pack)))
    data[len(data) // 2] ^= 0xFF
    store.backend.put(pack_key(pack), bytes(data))
    assert check(store).ok
    report = check(store, read_data=True)
    assert report.problems and all(p.key == pack_key(pack) for p in report.problems)
    assert "does not verify" in report.problems[0].what


def test_dangling_tag(built: tuple[Store, Manifest], store_url: str) -> None:
    store, m = built
    ghost = "ab" * 32
    store.set_tag("ghost", ghost)
    report = check(store)
    assert lines(report) == [f"tags tags/ghost: names manifest {ghost}, which is missing"]
    assert run_cmd(store_url) == CHECK_FAILED_EXIT


def test_manifest_that_does_not_validate(built: tuple[Store, Manifest]) -> None:
    """A manifest stored under its own digest (so it reads back fine) whose file size
    disagrees with its chunks."""
    store, m = built
    buf = bytearray(m.buf)
    ino = m.resolve("/big")
    at = m._inodes + (ino - 1) * 72 + 16  # u64 size after mode, uid, gid, nlink
    struct.pack_into("<Q", buf, at, m.inode(ino).size + 1)
    bad = store.put_manifest(bytes(buf))
    store.set_tag("bad", bad)
    report = check(store)
    assert [(p.kind, p.key) for p in report.problems] == [("manifests", f"manifests/{bad}")]
    assert "does not validate" in report.problems[0].what
    assert "disagrees with its chunks" in report.problems[0].what


def test_unparsable_trace(built: tuple[Store, Manifest]) -> None:
    store, m = built
    other = "0000000000002-deadbeef"
    store.backend.put(trace_key(m.digest, other), compress(b'{"version": 1, "chunks": 7}'))
    report = check(store)
    assert [(p.kind, p.key) for p in report.problems] == [("traces", trace_key(m.digest, other))]
    assert report.problems[0].what.startswith("does not parse")


def test_trace_naming_a_missing_pack(built: tuple[Store, Manifest]) -> None:
    store, m = built
    pack = add_trace(store, m, "0000000000003-0a0a0a0a")
    # The same pack as the first trace's (the same chunks): delete it from under both.
    store.backend.delete(pack_key(pack))
    report = check(store)
    assert sorted(lines(report)) == sorted(
        f"packs {pack_key(pack)}: missing (named by {trace_key(m.digest, t)})"
        for t in (TRACE_ID, "0000000000003-0a0a0a0a"))


def test_layer_record_naming_a_missing_blob(built: tuple[Store, Manifest]) -> None:
    """A whited-out file's blob is named only by its layer's record: gone, a re-index
    would reuse the record and write a manifest naming a missing blob."""
    store, m = built
    record = __import__("json").loads(store.get_layer_record(m.meta["layers"][0]["digest"]))
    gone = next(op for op in record["ops"] if op["path"] == "gone")["chunks"][0][0]
    store.backend.delete(blob_key(gone))
    report = check(store)
    assert [p.kind for p in report.problems] == ["layers"]
    assert f"names 1 blobs the store lacks (first {blob_key(gone)})" in report.problems[0].what


def test_keys_of_no_kind_and_bad_marker(built: tuple[Store, Manifest]) -> None:
    store, m = built
    store.backend.put("blobs/zz/not-a-digest", b"?")
    store.backend.put("casfs-store.json", b'{"format": "something else"}')
    report = check(store)
    assert [(p.kind, p.key) for p in report.problems] == [
        ("marker", "casfs-store.json"), ("unknown", "blobs/zz/not-a-digest")]


class _ReadOnly:
    """A backend that refuses every write (read-only credentials)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def put(self, key: str, data: bytes) -> None:
        raise AssertionError(f"check wrote {key}")

    def delete(self, key: str) -> None:
        raise AssertionError(f"check deleted {key}")


def test_check_needs_no_write_access_and_notes_a_running_gc(
        built: tuple[Store, Manifest]) -> None:
    """No write at all, not even a lock; a gc holding its lock meanwhile is noted (and
    blocks nothing: check takes no lock an index or gc waits on)."""
    from casfs.store.locks import gc_lock, index_lock

    store, m = built
    report = run_check(Store(_ReadOnly(store.backend)), read_data=True)  # type: ignore[arg-type]
    assert report.ok and not any("gc ran" in n for n in report.notes)
    lock = gc_lock(store)
    try:
        report = run_check(Store(_ReadOnly(store.backend)))  # type: ignore[arg-type]
    finally:
        lock.release()
    assert report.ok and any("a gc ran during the check" in n for n in report.notes)
    index_lock(store).release()  # nothing of check's is in the way


class _ListsNoPacks(_ReadOnly):
    """A listing taken before the packs were written (a boot recording its trace while
    check lists: the pack first, the trace after, and packs/ sorts before traces/)."""

    def list_info(self, prefix: str) -> object:
        return ((k, s, t) for k, s, t in self.inner.list_info(prefix)  # type: ignore[attr-defined]
                if not k.startswith("packs/"))


def test_pack_written_after_the_listing_is_no_problem(built: tuple[Store, Manifest]) -> None:
    store, m = built
    report = run_check(Store(_ListsNoPacks(store.backend)), read_data=True)  # type: ignore[arg-type]
    assert report.ok, lines(report)
    assert report.read_pack_entries >= len(m.chunk_digests())
