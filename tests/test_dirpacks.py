"""Directory packs: `casfs index` packs each layer's small files by directory, gc keeps
what live layers' pack indexes name, and a first boot (no trace) fetches a directory's
files with one ranged GET; a damaged or lying pack index never yields wrong bytes."""

from __future__ import annotations

import random
import struct
import time
from pathlib import Path

import blake3
import pytest
import trio
import trio.testing

from casfs import packindex
from casfs.gc import collect
from casfs.manifest import Manifest
from casfs.packindex import PackIndex, PackIndexError
from casfs.store import Store, open_store
from casfs.store.content import verify_blob
from casfs.testing.ocibuild import file, write_oci_layout
from indexer.dirpack import PACKED_FILE_MAX
from tests.fakes import RecordingFetcher
from tests.mounthelp import Mount, mounted, read_in_subprocess, require_fuse, wait_stats
from tests.treecheck import index, store_keys

PYC = "usr/lib/pkg/__pycache__"
SMALL = {f"{PYC}/m{i:02d}.cpython-311.pyc": random.Random(i).randbytes(3000 + 97 * i)
         for i in range(40)}
OTHER = {f"usr/lib/other/f{i}.txt": f"other {i}\n".encode() * 50 for i in range(5)}
BIG = {"usr/lib/pkg/weights.bin": random.Random(99).randbytes(PACKED_FILE_MAX + 1)}
FILES = {**SMALL, **OTHER, **BIG}


def layout(path: Path, files: dict[str, bytes]) -> str:
    write_oci_layout(path, [[file(n, d) for n, d in files.items()]], tag="v")
    return f"oci:{path}:v"


def locations(store: Store, m: Manifest) -> dict[str, packindex.Location]:
    out: dict[str, packindex.Location] = {}
    for layer in m.meta["layers"]:
        raw = store.get_pack_index(layer["digest"], packindex.MAX_INDEX_BYTES)
        assert raw is not None, f"layer {layer['digest']} has no pack index"
        out.update(packindex.parse(raw, "test"))
    return out


def digest_of(m: Manifest, path: str) -> str:
    return m.chunks(m.resolve("/" + path))[0].digest


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    url = f"file://{tmp_path / 'store'}" if request.param == "file" \
        else request.getfixturevalue("s3_bucket_url")
    return open_store(url, create=True)


# -- the pack index format --------------------------------------------------------------

def test_pack_index_roundtrip_and_ranges() -> None:
    packs = ["aa" * 32, "bb" * 32]
    entries = [(f"{i:064x}", 0, i * 100, 100) for i in range(5)]  # back to back in pack aa
    entries += [(f"{9:064x}", 0, 900, 50)]  # 400 bytes after the last: a gap
    entries += [(f"{i:064x}", 1, (i - 20) * 10, 10) for i in range(20, 23)]
    locs = packindex.parse(packindex.encode(packs, entries), "t")
    assert locs[f"{3:064x}"] == ("aa" * 32, 300, 100)
    assert locs[f"{21:064x}"] == ("bb" * 32, 10, 10)

    idx = PackIndex()
    idx.add(locs)
    wanted = [f"{i:064x}" for i in (4, 0, 2, 9, 21, 20, 77)]
    ranges, loose = idx.ranges(wanted, max_gap=500, range_bytes=1 << 20)
    assert loose == [f"{77:064x}"]
    assert [(r.pack, [d for d, _, _ in r.items]) for r in ranges] == [
        ("aa" * 32, [f"{i:064x}" for i in (0, 2, 4, 9)]),  # pack order; gaps bridged
        ("bb" * 32, [f"{20:064x}", f"{21:064x}"]),
    ]
    assert ranges[0].length == 950
    # A small gap limit or range size splits runs.
    split, _ = idx.ranges(wanted, max_gap=0, range_bytes=1 << 20)
    assert len(split) == 5  # 0 | 2 | 4 | 9 | 20+21
    capped, _ = idx.ranges([f"{i:064x}" for i in range(5)], max_gap=0, range_bytes=250)
    assert [len(r.items) for r in capped] == [2, 2, 1]


@pytest.mark.parametrize("damage", ["short", "magic", "version", "counts", "size",
                                    "pack-number", "zero-length"])
def test_pack_index_rejects_damage(damage: str) -> None:
    good = bytearray(packindex.encode(["aa" * 32], [(f"{1:064x}", 0, 0, 10)]))
    head = packindex.HEADER.size + 32
    if damage == "short":
        bad = bytes(good[:10])
    elif damage == "magic":
        bad = b"NOTCASFS" + bytes(good[8:])
    elif damage == "version":
        bad = bytes(good[:8]) + struct.pack("<I", 2) + bytes(good[12:])
    elif damage == "counts":
        bad = bytes(good[:12]) + struct.pack("<II", 9, 10**9) + bytes(good[20:])
    elif damage == "size":
        bad = bytes(good) + b"\0"
    elif damage == "pack-number":
        good[head + 32 : head + 36] = struct.pack("<I", 5)
        bad = bytes(good)
    else:
        good[head + 36 : head + 40] = struct.pack("<I", 0)
        bad = bytes(good)
    with pytest.raises(PackIndexError):
        packindex.parse(bad, "t")


# -- casfs index writes them ------------------------------------------------------------------

def test_index_packs_small_files_by_directory(store: Store, tmp_path: Path) -> None:
    result, m = index(layout(tmp_path / "img", FILES), store, tag="t")
    locs = locations(store, m)
    small = {digest_of(m, p) for p in {**SMALL, **OTHER}}
    assert set(locs) == small, "exactly the small files are packed"
    assert digest_of(m, next(iter(BIG))) not in locs
    assert result.packs.files == len(small) and result.packs.packs == 1
    # Every packed frame is the blob, and a directory's files lie back to back in name order.
    for path, data in FILES.items():
        d = digest_of(m, path)
        if d in locs:
            pack, off, length = locs[d]
            assert verify_blob(d, store.get_pack_range(pack, off, length)) == data
    pyc = [locs[digest_of(m, p)] for p in sorted(SMALL)]
    for (_, off, length), (_, nxt, _) in zip(pyc, pyc[1:], strict=False):
        assert nxt == off + length
    # A re-index reuses the layer: no second pack.
    packs_before = store_keys(store, "packs/")
    again, _ = index(layout(tmp_path / "img", FILES), store, tag="t")
    assert again.layers_reused == 1 and again.packs.packs == 0
    assert store_keys(store, "packs/") == packs_before


def test_layer_indexed_before_dir_packs_is_packed_on_reindex(store: Store, tmp_path: Path) -> None:
    _, m = index(layout(tmp_path / "img", SMALL), store, tag="t")
    layer = m.meta["layers"][0]["digest"]
    algo, _, hex_ = layer.partition(":")
    store.backend.delete(f"packidx/{algo}/{hex_}")  # as a store written before them
    result, again = index(layout(tmp_path / "img", SMALL), store, tag="t")
    assert result.layers_reused == 0, "the layer is read again to pack it"
    assert again.digest == m.digest, "the manifest is unchanged"
    assert set(locations(store, again)) == {digest_of(m, p) for p in SMALL}


def test_gc_keeps_live_dir_packs_and_sweeps_dead_ones(store: Store, tmp_path: Path) -> None:
    _, a = index(layout(tmp_path / "a", SMALL), store, tag="a")
    _, b = index(layout(tmp_path / "b", OTHER), store, tag="b")
    packs_a = {f"packs/{p}" for p, _, _ in locations(store, a).values()}
    packs_b = {f"packs/{p}" for p, _, _ in locations(store, b).values()}
    assert collect(store, grace=0).swept == {}
    store.delete_tag("b")
    report = collect(store, grace=0)
    assert report.swept.get("packidx") == 1 and report.swept.get("packs") == len(packs_b)
    keys = store_keys(store, "packs/")
    assert packs_a <= keys and not packs_b & keys
    assert set(locations(store, a)) == {digest_of(a, p) for p in SMALL}


# -- a mount uses them ------------------------------------------------------------------------

def test_heuristics_fetch_a_directory_in_one_range(tmp_path: Path) -> None:
    """The guessing logic with a recording fetcher: the first read in a packed
    `__pycache__` asks for its other files as one ranged GET."""
    from prefetch.heuristics import Heuristics

    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    _, m = index(layout(tmp_path / "img", FILES), store)
    packs = PackIndex()
    packs.add(locations(store, m))

    fetcher = RecordingFetcher()
    first = sorted(SMALL)[0]

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery, packs=packs)  # type: ignore[arg-type]
            ino = m.resolve("/" + first)
            h.on_read(ino, m.chunks(ino))
            await trio.testing.wait_all_tasks_blocked()
            assert h.ranged == 1

    trio.run(scenario)
    assert fetcher.got == []
    assert fetcher.ranges == [[digest_of(m, p) for p in sorted(SMALL)[1:]]]


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket_url")
    return f"file://{tmp_path}/store"


def _read_all(mnt: Mount, names: list[str]) -> None:
    out = read_in_subprocess([mnt.path("/" + n) for n in names], 30.0, mnt.mountpoint)
    for name, res in zip(names, out, strict=True):
        assert res["ok"], f"reading {name}: {res}\n{mnt.log()[-2000:]}"
        assert res["hash"] == blake3.blake3(FILES[name]).hexdigest(), f"wrong bytes: {name}"


def read_first_then_wait_for_siblings(mnt: Mount, names: list[str]) -> dict:
    """Once the pack indexes are loaded, read the first file of the directory; the
    mount's stats once the directory's other files have been prefetched."""
    wait_stats(mnt, lambda s: s["prefetch"]["state"] == "done", "pack indexes to load")
    _read_all(mnt, names[:1])
    return wait_stats(mnt, lambda s: s["metrics"]["prefetch_chunks"] >= len(names) - 1,
                      "the directory's other files to arrive")


def test_first_boot_fetches_a_directory_with_one_request(store_url: str, tmp_path: Path) -> None:
    require_fuse()
    store = open_store(store_url, create=True)
    _, m = index(layout(tmp_path / "img", FILES), store, tag="t")
    names = sorted(SMALL)
    with mounted(m.digest, tmp_path / "mnt", store_url, tmp_path / "cache", "--no-trace") as mnt:
        st = read_first_then_wait_for_siblings(mnt, names)
        assert st["prefetch"]["dir_packs"] == {"layers": 1, "blobs": len(SMALL) + len(OTHER),
                                               "layers_without": 0, "rejected": 0}
        assert st["prefetch"]["heuristic_ranges"] == 1
        assert st["metrics"]["prefetch_requests"] == 1, "39 files, one ranged GET"
        _read_all(mnt, names)
        mt = mnt.stats()["metrics"]
        assert mt["fetches"] == 1, "only the first file waited on a GET of its own"
        assert mt["prefetch_hits"] == len(names) - 1


@pytest.mark.parametrize("damage", ["garbage", "lying"])
def test_damaged_pack_index_never_serves_wrong_bytes(damage: str, tmp_path: Path) -> None:
    """A pack index that does not parse is ignored (counted, logged); one that parses but
    points at the wrong frames fails verification: either way every byte read is right."""
    require_fuse()
    url = f"file://{tmp_path}/store"
    store = open_store(url, create=True)
    _, m = index(layout(tmp_path / "img", FILES), store, tag="t")
    layer = m.meta["layers"][0]["digest"]
    if damage == "garbage":
        store.put_pack_index(layer, b"CASFSPI\0" + b"\xff" * 40)
    else:  # each digest given its neighbour's frame
        locs = locations(store, m)
        digests = sorted(locs)
        pack = next(iter(locs.values()))[0]
        shifted = [(d, 0, locs[digests[(i + 1) % len(digests)]][1],
                    locs[digests[(i + 1) % len(digests)]][2]) for i, d in enumerate(digests)]
        store.put_pack_index(layer, packindex.encode([pack], sorted(shifted, key=lambda e: e[2])))
    names = sorted(SMALL)
    with mounted(m.digest, tmp_path / "mnt", url, tmp_path / "cache", "--no-trace") as mnt:
        st = wait_stats(mnt, lambda s: s["prefetch"]["state"] == "done", "pack indexes to load")
        if damage == "garbage":
            assert st["prefetch"]["dir_packs"]["rejected"] == 1
            assert "ignoring the directory packs" in mnt.log()
        _read_all(mnt, names)
        _read_all(mnt, sorted(OTHER))
        if damage == "lying":
            time.sleep(0.2)
            assert "rejected" in mnt.log() or "does not match" in mnt.log()



def test_missing_pack_falls_back_to_single_gets(store_url: str, tmp_path: Path) -> None:
    """Packs deleted from the store (a pack index outliving them): one failed ranged GET,
    a log line, then the directory's files are prefetched one GET each; bytes right."""
    require_fuse()
    store = open_store(store_url, create=True)
    _, m = index(layout(tmp_path / "img", FILES), store, tag="t")
    for key in store_keys(store, "packs/"):
        store.backend.delete(key)
    names = sorted(SMALL)
    with mounted(m.digest, tmp_path / "mnt", store_url, tmp_path / "cache", "--no-trace") as mnt:
        st = read_first_then_wait_for_siblings(mnt, names)
        assert "is missing" in mnt.log()
        assert st["metrics"]["prefetch_requests"] == len(names) - 1  # the singles
        _read_all(mnt, names + sorted(OTHER))
        assert mnt.stats()["metrics"]["io_errors"] == 0


# -- packing never fails an index ---------------------------------------------------------------

def test_spill_failure_leaves_the_layer_unpacked_then_packed_later(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import indexer.dirpack as dirpack

    store = open_store(f"file://{tmp_path / 'store'}", create=True)

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(dirpack.os, "pwrite", full)
        result, m = index(layout(tmp_path / "img", FILES), store, tag="t")
    assert result.packs.packs == 0
    assert store.get_pack_index(m.meta["layers"][0]["digest"], 1 << 20) is None
    again, m2 = index(layout(tmp_path / "img", FILES), store, tag="t")
    assert m2.digest == m.digest and again.layers_reused == 0, "read again to pack it"
    assert set(locations(store, m2)) == {digest_of(m, p) for p in {**SMALL, **OTHER}}


def test_packer_ignores_adds_after_close(tmp_path: Path) -> None:
    from indexer.dirpack import DirPacker

    packer = DirPacker(open_store(f"file://{tmp_path / 'store'}", create=True))
    packer.add("d/a", "aa" * 32, b"x" * 10)
    packer.close()
    packer.add("d/b", "bb" * 32, b"y" * 10)  # an upload thread of a failed layer: no-op
    assert [f[1] for f in packer._files] == ["a"]


def test_unreadable_layer_keeps_its_record_without_packs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer indexed before directory packs that cannot be read again now is reused
    from its record (packing is an optimisation, never a reason to fail)."""
    import indexer.index as index_module
    from casfs.errors import CorruptLayer

    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    _, m = index(layout(tmp_path / "img", SMALL), store, tag="t")
    hex_ = m.meta["layers"][0]["digest"].partition(":")[2]
    store.backend.delete(f"packidx/sha256/{hex_}")

    def unreadable(*args: object, **kw: object) -> None:
        raise CorruptLayer("the layer's blob is gone")

    monkeypatch.setattr(index_module, "_index_layer", unreadable)
    result, again = index(layout(tmp_path / "img", SMALL), store, tag="t")
    assert again.digest == m.digest and result.layers_reused == 1


def test_swept_packs_are_written_again(store: Store, tmp_path: Path) -> None:
    """Packs gone under a pack index (an older casfs's gc sweeps packs/ it does not
    know): the next index packs the layer again."""
    _, m = index(layout(tmp_path / "img", SMALL), store, tag="t")
    for key in store_keys(store, "packs/"):
        store.backend.delete(key)
    result, _ = index(layout(tmp_path / "img", SMALL), store, tag="t")
    assert result.layers_reused == 0 and result.packs.packs == 1
    for d, (pack, off, length) in locations(store, m).items():
        assert verify_blob(d, store.get_pack_range(pack, off, length))


def test_gc_stops_when_a_pack_index_cannot_be_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from casfs.errors import CasfsError, StoreError

    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    index(layout(tmp_path / "img", SMALL), store, tag="t")
    before = store_keys(store, "")

    def failing(*args: object, **kw: object) -> None:
        raise StoreError("the store timed out")

    monkeypatch.setattr(store, "get_pack_index", failing)
    with pytest.raises(CasfsError, match="nothing was deleted"):
        collect(store, grace=0)
    assert {k for k in before if not k.startswith("locks/")} <= store_keys(store, "")
