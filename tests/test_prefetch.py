"""Trace-based prefetch (issue 5): recording a boot, replaying it on the next cold boot.

Unit tests (no mount): the trace format and its validation, merging several boots,
grouping a plan into pack ranges, the recorder and save_trace, load_traces with
hostile objects. Real mounts (tests/mounthelp.py): a scripted boot's trace lists the
files it read in order; the next boot on an empty cache has them prefetched before
they are read (checked with the daemon's counters, never with timings) in a few
ranged GETs of the pack; reads join or overtake prefetch behind a 200 ms latency
proxy; hostile traces are rejected with a log line while the mount keeps serving
correct bytes; a trace of image A prefetches image B's shared layer; --no-prefetch
and --no-trace. The end-to-end and hostile-trace tests run on the file store and on
SeaweedFS (a real S3 server; the latency test uses it behind casfs.testing.proxy).
"""

from __future__ import annotations

import io
import json
import logging
import random
import struct
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import pytest
import trio
import trio.testing

from casfs.cache import ChunkCache
from casfs.manifest import Manifest
from casfs.store import Store, open_store
from casfs.store.content import compress, verify_blob
from casfs.testing import ocibuild as ob
from prefetch.recorder import Recorder, save_trace
from prefetch.replay import PrefetchStatus, load_traces, packed_locations, plan_groups
from prefetch.trace import MAX_TRACE_BYTES, PlanItem, Trace, TraceChunk, TraceError, merge
from tests.fakes import RecordingFetcher
from tests.mounthelp import (
    Mount,
    build_and_index,
    cli,
    mounted,
    read_in_subprocess,
    require_fuse,
    wait_stats,
)

IDLE = "1"  # --trace-idle for the recording mounts
READ_TIMEOUT = 30.0


# -- helpers ----------------------------------------------------------------------------------

def rnd(n: int, seed: int) -> bytes:
    """Incompressible, distinct content (no dedup between files)."""
    return random.Random(seed).randbytes(n)


def chunk_reader(cache: ChunkCache) -> Callable[[str], bytes | None]:
    """What save_trace reads chunks through (the fetcher's cached_bytes), over a cache."""

    def read(digest: str) -> bytes | None:
        path = cache.lookup(digest)
        return None if path is None else path.read_bytes()

    return read


def dig(i: int) -> str:
    return blake3.blake3(str(i).encode()).hexdigest()


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def files_layer(files: dict[str, bytes]) -> list[ob.Member]:
    members: list[ob.Member] = []
    dirs: set[str] = set()
    for name in files:
        for m in ob.parent_dirs(name):
            if m.name not in dirs:
                dirs.add(m.name)
                members.append(m)
    members += [ob.file(name, data) for name, data in files.items()]
    return members


@dataclass
class Image:
    ref: str
    files: dict[str, bytes]
    store_url: str

    @property
    def digest(self) -> str:
        return self.ref.split(":", 1)[1]

    def store(self) -> Store:
        return open_store(self.store_url)

    def manifest(self) -> Manifest:
        return Manifest(self.store().get_manifest(self.digest), self.digest)


def make_image(tmp: Path, name: str, layers: list[Any], store_url: str) -> Image:
    files: dict[str, bytes] = {}
    for layer in layers:
        if isinstance(layer, ob.Layer):
            with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
                for info in tar.getmembers():
                    if info.isfile():
                        f = tar.extractfile(info)
                        assert f is not None
                        files[info.name] = f.read()
        else:
            files.update({m.name: m.data for m in layer if m.type == "file"})
    ref = build_and_index(tmp / name, layers, store_url)
    return Image(ref, files, store_url)


def chunks_of(manifest: Manifest, path: str) -> list[str]:
    return [c.digest for c in manifest.chunks(manifest.resolve(path))]


def read_checked(m: Mount, image: Image, names: list[str]) -> None:
    """Read whole files in this order through the mount; every byte must be right."""
    out = read_in_subprocess([m.path(n) for n in names], READ_TIMEOUT, m.mountpoint)
    for name, res in zip(names, out, strict=True):
        assert res["ok"], f"reading {name}: errno {res.get('errno')}\n{m.log()[-2000:]}"
        assert res["hash"] == b3(image.files[name]), f"wrong bytes read from {name}"


def prefetch_done(m: Mount) -> dict:
    return wait_stats(m, lambda s: s["prefetch"]["state"] in ("done", "failed"), "prefetch to end")


def stored_traces(image: Image) -> list[Trace]:
    store = image.store()
    return [Trace.parse(store.get_trace(image.digest, t, MAX_TRACE_BYTES), t)
            for t in store.list_traces(image.digest)]


def record(manifest: Manifest, paths: list[str], step_ms: int = 10,
           clock_start: float = 100.0) -> Recorder:
    """A Recorder fed reads of whole files in this order, on a fake clock."""
    now = [clock_start]
    rec = Recorder(manifest, idle_seconds=1.0, max_seconds=60.0, clock=lambda: now[0])
    for p in paths:
        now[0] += step_ms / 1000
        ino = manifest.resolve(p)
        rec.on_read(ino, manifest.chunks(ino))
    return rec


def fill_cache(cache: ChunkCache, store: Store, digests: list[str]) -> None:
    for d in digests:
        cache.insert(d, store.get_blob(d))


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket_url")
    return f"file://{tmp_path}/store"


@pytest.fixture
def fuse() -> None:
    require_fuse()


# -- the trace format ---------------------------------------------------------------------------

def sample_trace(n: int = 4, pack: bool = True) -> Trace:
    chunks = [TraceChunk(dig(i), 1000 + i, 10 * i, f"/f{i % 2}", 100 * i if pack else -1,
                         90 if pack else 0) for i in range(n)]
    return Trace(dig(999), 1.7e9, 1.5, chunks, dig(998) if pack else None)


def test_trace_roundtrip() -> None:
    t = sample_trace()
    back = Trace.parse(t.to_json(), "id1")
    assert back.trace_id == "id1"
    assert (back.manifest, back.pack, back.boot_seconds) == (t.manifest, t.pack, t.boot_seconds)
    assert back.chunks == t.chunks
    doc = json.loads(t.to_json())
    assert doc["version"] == 1 and doc["paths"] == ["/f0", "/f1"]


def _doc(**over: Any) -> dict:
    doc = json.loads(sample_trace().to_json())
    doc.update(over)
    return doc


def _row(**over: Any) -> list:
    row = [dig(1), 100, 5, 0, 0, 50]
    for k, v in over.items():
        row[["digest", "length", "t_ms", "path", "off", "plen"].index(k)] = v
    return row


@pytest.mark.parametrize("data", [
    pytest.param(b"\x28\xb5\x2f\xfd garbage", id="not-json"),
    pytest.param(b"[1, 2, 3]", id="json-list"),
    pytest.param(json.dumps(_doc(version=2)).encode(), id="version-2"),
    pytest.param(json.dumps(_doc(manifest="zz" * 32)).encode(), id="bad-manifest-digest"),
    pytest.param(json.dumps(_doc(pack="../../etc/passwd")).encode(), id="bad-pack-digest"),
    pytest.param(json.dumps(_doc(paths="/x")).encode(), id="paths-not-list"),
    pytest.param(json.dumps(_doc(paths=[1])).encode(), id="path-not-str"),
    pytest.param(json.dumps(_doc(chunks={})).encode(), id="chunks-not-list"),
    pytest.param(json.dumps(_doc(chunks=[[dig(1), 100]])).encode(), id="short-row"),
    pytest.param(json.dumps(_doc(chunks=[_row(digest="A" * 64)])).encode(), id="bad-digest"),
    pytest.param(json.dumps(_doc(chunks=[_row(digest=dig(1)[:-1])])).encode(), id="short-digest"),
    pytest.param(json.dumps(_doc(chunks=[_row(length=0)])).encode(), id="zero-length"),
    pytest.param(json.dumps(_doc(chunks=[_row(length=1 << 40)])).encode(), id="absurd-length"),
    pytest.param(json.dumps(_doc(chunks=[_row(length=True)])).encode(), id="bool-length"),
    pytest.param(json.dumps(_doc(chunks=[_row(length=1.5)])).encode(), id="float-length"),
    pytest.param(json.dumps(_doc(chunks=[_row(t_ms=-1)])).encode(), id="negative-time"),
    pytest.param(json.dumps(_doc(chunks=[_row(path=2)])).encode(), id="path-index-too-big"),
    pytest.param(json.dumps(_doc(chunks=[_row(path=-1)])).encode(), id="path-index-negative"),
    pytest.param(json.dumps(_doc(chunks=[_row(off=-5)])).encode(), id="negative-pack-offset"),
    pytest.param(json.dumps(_doc(chunks=[_row(plen=1 << 40)])).encode(), id="absurd-pack-length"),
    pytest.param(json.dumps(_doc(chunks=[_row(off=1 << 50)])).encode(), id="absurd-pack-offset"),
    pytest.param(json.dumps(_doc(pack=None, chunks=[_row()])).encode(), id="offset-without-pack"),
    pytest.param(json.dumps(_doc(created="yesterday")).encode(), id="bad-times"),
])
def test_parse_rejects(data: bytes) -> None:
    with pytest.raises(TraceError):
        Trace.parse(data, "hostile")


def test_parse_rejects_oversized(monkeypatch: pytest.MonkeyPatch) -> None:
    import prefetch.trace as tr

    with pytest.raises(TraceError, match="larger"):
        Trace.parse(b" " * (MAX_TRACE_BYTES + 1))
    monkeypatch.setattr(tr, "MAX_TRACE_CHUNKS", 3)
    with pytest.raises(TraceError, match="oversized"):
        Trace.parse(sample_trace(4).to_json())
    Trace.parse(sample_trace(3).to_json())


# -- merging boots, planning requests -----------------------------------------------------------

def _trace(rows: list[tuple[int, int]], pack: str | None = None, offsets: bool = False) -> Trace:
    """A trace of (chunk number, t_ms) rows; with offsets, chunk i sits at 1000*i in pack."""
    chunks = [TraceChunk(dig(i), 500, t, "/p", 1000 * i if offsets else -1, 400 if offsets else 0)
              for i, t in rows]
    return Trace(dig(999), 1.7e9, 1.0, chunks, pack)


def test_merge_three_boots() -> None:
    # Chunk 1 in all three boots, 2 and 3 in two, 4 and 5 in one only.
    t1 = _trace([(1, 10), (2, 20), (3, 30), (4, 40)])
    t2 = _trace([(2, 5), (1, 50), (3, 60)])
    t3 = _trace([(3, 1), (1, 30), (5, 70)])
    plan = merge([t1, t2, t3])
    assert [p.digest for p in plan] == [dig(2), dig(3), dig(1)]
    # medians: 2 -> (20, 5) = 12.5; 3 -> (30, 60, 1) = 30; 1 -> (10, 50, 30) = 30, later boot order
    assert [p.t_ms for p in plan] == [12.5, 30, 30]
    assert [p.boots for p in plan] == [2, 3, 3]
    # Everything when every boot counts; one boot keeps all its chunks.
    assert {p.digest for p in merge([t1, t2, t3], min_share=0.0)} == {dig(i) for i in range(1, 6)}
    assert [p.digest for p in merge([t1])] == [dig(1), dig(2), dig(3), dig(4)]
    assert merge([]) == []
    # Half of two boots is one: a chunk touched by either is kept.
    assert {p.digest for p in merge([t1, t2])} == {dig(1), dig(2), dig(3), dig(4)}
    # All three must have it.
    assert [p.digest for p in merge([t1, t2, t3], min_share=1.0)] == [dig(3), dig(1)]


def test_merge_ties_keep_trace_order_and_pack_locations() -> None:
    # The chunks of one read share a time: they must stay in the trace's (pack) order
    # so that they form one pack range, whatever their digests.
    rows = [(i, 7) for i in (5, 1, 9, 3, 2)]
    t = _trace(rows, pack=dig(500), offsets=True)
    plan = merge([t])
    assert [p.digest for p in plan] == [dig(i) for i in (5, 1, 9, 3, 2)]
    assert plan[0].locations == [(dig(500), 5000, 400)]
    # Two boots with packs: both locations known, newest last.
    t2 = _trace(rows, pack=dig(501), offsets=True)
    assert merge([t, t2])[0].locations == [(dig(500), 5000, 400), (dig(501), 5000, 400)]
    # Duplicate rows in one trace count once.
    dup = _trace([(1, 1), (1, 2)])
    assert merge([dup])[0].boots == 1


def test_plan_groups() -> None:
    pack, other = dig(700), dig(701)

    def item(i: int, off: int, length: int = 100, where: str | None = pack) -> PlanItem:
        locs = [(where, off, length)] if where else []
        return PlanItem(dig(i), length, float(i), 1, locs)

    plan = [item(0, 0), item(1, 100), item(2, 250),  # gap 50 <= max_gap: same range
            item(3, 10_000),  # gap too big
            item(4, 10_100, where=None),  # not in any pack: a blob GET
            item(5, 10_000 + 100),  # back in the pack, right after 3
            item(6, 5_000),  # going backwards: a new range
            item(7, 5_100, where=other)]  # another pack
    groups = plan_groups(plan, range_bytes=1_000, max_gap=100)
    assert [(None, [g]) if isinstance(g, str) else (g.pack, [d for d, _, _ in g.items])
            for g in groups] == [
        (pack, [dig(0), dig(1), dig(2)]),
        (pack, [dig(3), dig(5)]),  # a blob GET between them does not split the range
        (None, [dig(4)]),
        (pack, [dig(6)]),
        (other, [dig(7)]),
    ]
    # range_bytes bounds a group's span.
    contiguous = [item(i, 100 * i) for i in range(10)]
    sizes = [len(g.items) for g in plan_groups(contiguous, range_bytes=300, max_gap=0)]
    assert sizes == [3, 3, 3, 1]
    assert len(plan_groups(contiguous, range_bytes=1 << 20, max_gap=0)) == 1
    # The newest boot's pack is used.
    two = PlanItem(dig(1), 100, 0.0, 2, [(other, 0, 100), (pack, 500, 100)])
    assert plan_groups([two], 1 << 20, 0)[0].items == [(dig(1), 500, 100)]


# -- the recorder and save_trace (no mount) -----------------------------------------------------

UNIT_FILES = {
    "app/a.bin": rnd(300_000, 11),  # 2 chunks
    "app/b.bin": rnd(20_000, 12),
    "app/sub/c.bin": rnd(600_000, 13),  # 3 chunks
    "app/d.bin": rnd(5_000, 14),
}


@pytest.fixture(scope="module")
def unit_image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    tmp = tmp_path_factory.mktemp("unit")
    return make_image(tmp, "img", [files_layer(UNIT_FILES)], f"file://{tmp}/store")


def test_recorder_first_access_order_and_boot_end(unit_image: Image) -> None:
    m = unit_image.manifest()
    now = [50.0]
    rec = Recorder(m, idle_seconds=2.0, max_seconds=30.0, clock=lambda: now[0])
    assert not rec.boot_over()  # nothing read yet: not idle, however long it waits
    now[0] += 10
    assert not rec.boot_over()
    c = m.resolve("/app/sub/c.bin")
    a = m.resolve("/app/a.bin")
    cc, ac = m.chunks(c), m.chunks(a)
    rec.on_read(c, cc[:1])
    now[0] += 0.5
    rec.on_read(c, cc[:2])  # chunk 0 again: not a first access
    rec.on_read(a, ac)
    now[0] += 0.25
    rec.on_read(c, cc[2:])
    assert [d for d, *_ in rec.order] == [cc[0].digest, cc[1].digest, ac[0].digest,
                                          ac[1].digest, cc[2].digest]
    assert [t for _, _, t, _ in rec.order] == [10_000, 10_500, 10_500, 10_500, 10_750]
    now[0] += 1.9
    assert not rec.boot_over()
    now[0] += 0.2
    assert rec.boot_over()  # 2 s with no new first access
    trace = rec.build_trace()
    assert rec.finished
    assert [ch.path for ch in trace.chunks] == ["/app/sub/c.bin"] * 2 + ["/app/a.bin"] * 2 + [
        "/app/sub/c.bin"]
    assert trace.manifest == m.digest and trace.boot_seconds == pytest.approx(10.75)
    rec.on_read(m.resolve("/app/b.bin"), m.chunks(m.resolve("/app/b.bin")))
    assert len(rec.order) == 5  # finished: no more recording
    # The hard limit ends a boot that never goes idle.
    now2 = [0.0]
    busy = Recorder(m, idle_seconds=2.0, max_seconds=30.0, clock=lambda: now2[0])
    for i in range(30):
        now2[0] = float(i)
        assert not busy.boot_over()
        busy.order.append((dig(i), 1, i * 1000, c))
        busy.last_new = now2[0]
    now2[0] = 30.0
    assert busy.boot_over()


def test_recorder_boot_not_idle_while_a_read_is_in_flight(unit_image: Image) -> None:
    m = unit_image.manifest()
    now = [0.0]
    rec = Recorder(m, idle_seconds=2.0, max_seconds=60.0, clock=lambda: now[0])
    a, b = m.resolve("/app/a.bin"), m.resolve("/app/b.bin")
    rec.read_started()
    rec.on_read(a, m.chunks(a))  # a first access, then the read waits on the store
    now[0] += 10.0
    assert not rec.boot_over()  # long past idle_seconds, but the read is still in flight
    with rec.reading():  # a second, quick read while the first one is stalled
        rec.on_read(b, m.chunks(b))
    now[0] += 10.0
    assert not rec.boot_over()  # the first read is still in flight
    rec.read_finished()  # t = 20: the stalled read returns
    now[0] += 1.9
    assert not rec.boot_over()  # idle counts from the end of the read, not the first access
    now[0] += 0.2
    assert rec.boot_over()
    # A read that fails or is cancelled ends too (reading() is a try/finally).
    with pytest.raises(OSError), rec.reading():
        raise OSError("EIO")
    assert rec.in_flight == 0 and not rec.boot_over()  # and restarts the idle clock
    # The hard limit ends the boot even while a read is in flight.
    rec.read_started()
    now[0] = 60.0
    assert rec.boot_over()


def test_recorder_watch_waits_for_a_stalled_read(unit_image: Image) -> None:
    """watch() (the daemon's boot-end task) ends the boot idle_seconds after the stalled read
    returns, not idle_seconds after its first access. Trio's MockClock jumps over the sleeps."""
    m = unit_image.manifest()
    a = m.resolve("/app/a.bin")
    ended: list[tuple[float, int]] = []  # (seconds since start, reads in flight) at boot end
    saves: list[bool] = []

    class Probe(Recorder):
        def boot_over(self) -> bool:  # on the trio thread, just before watch() saves
            over = super().boot_over()
            if over:
                ended.append((self.clock() - self.started, self.in_flight))
            return over

    async def main() -> None:
        rec = Probe(m, idle_seconds=2.0, max_seconds=300.0, clock=trio.current_time)

        async def stalled_read() -> None:
            with rec.reading():
                rec.on_read(a, m.chunks(a))
                await trio.sleep(30)  # the store answers after 30 s

        async with trio.open_nursery() as nursery:
            nursery.start_soon(stalled_read)
            await trio.sleep(0.1)
            await rec.watch(lambda: saves.append(True))

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert saves == [True] and len(ended) == 1
    at, in_flight = ended[0]
    assert in_flight == 0, f"boot ended {at:.1f} s in while a read was in flight"
    assert 32.0 <= at <= 33.0, at  # 30 s stalled, then 2 s idle (+ watch's 0.5 s polling)


def test_recorder_bounded(unit_image: Image, monkeypatch: pytest.MonkeyPatch) -> None:
    import prefetch.recorder as recmod

    monkeypatch.setattr(recmod, "MAX_TRACE_CHUNKS", 3)
    m = unit_image.manifest()
    rec = record(m, ["/app/sub/c.bin", "/app/a.bin"])
    assert len(rec.order) == 3


def test_save_trace_writes_trace_pack_and_layer_pointers(unit_image: Image, tmp_path: Path) -> None:
    store, m = unit_image.store(), unit_image.manifest()
    order = ["/app/sub/c.bin", "/app/b.bin", "/app/a.bin"]
    rec = record(m, order)
    want = [d for p in order for d in chunks_of(m, p)]
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    fill_cache(cache, store, want[:-1])  # the last chunk was evicted: not packed
    tid = save_trace(rec, store, chunk_reader(cache), known_packed=set())
    assert tid and store.list_traces(m.digest) == [tid]
    assert save_trace(rec, store, chunk_reader(cache), set()) == tid  # saved once
    trace = Trace.parse(store.get_trace(m.digest, tid, MAX_TRACE_BYTES), tid)
    assert [c.digest for c in trace.chunks] == want
    assert [c.t_ms for c in trace.chunks] == sorted(c.t_ms for c in trace.chunks)
    assert trace.pack is not None
    # The pack holds each chunk's stored form, back to back, in first-access order.
    end = 0
    for c in trace.chunks[:-1]:
        assert c.pack_offset == end
        frame = store.get_pack_range(trace.pack, c.pack_offset, c.pack_length)
        assert verify_blob(c.digest, frame) == store.get_blob(c.digest)
        end += c.pack_length
    assert trace.chunks[-1].pack_offset == -1
    assert len(store.get_pack_range(trace.pack, 0, end + 100)) == end
    # Images sharing a layer find it.
    for layer in m.meta["layers"]:
        assert (m.digest, tid) in store.list_layer_traces(layer["digest"])
    # A boot whose chunks earlier packs already hold writes no new pack.
    rec2 = record(m, order)
    tid2 = save_trace(rec2, store, chunk_reader(cache), known_packed=set(want))
    assert Trace.parse(store.get_trace(m.digest, tid2, MAX_TRACE_BYTES)).pack is None
    # A boot that read nothing saves nothing.
    assert save_trace(Recorder(m), store, chunk_reader(cache), set()) is None
    cache.close()


def test_pack_stays_in_use_after_many_boots(tmp_path: Path) -> None:
    """Boots whose chunks a pack already holds write no new pack but point into it, so
    the pack is still used once the boot that wrote it is no longer among the newest
    traces merged (max_traces)."""
    image = make_image(tmp_path, "img", [files_layer(UNIT_FILES)], f"file://{tmp_path}/store")
    store, m = image.store(), image.manifest()
    order = ["/app/sub/c.bin", "/app/a.bin", "/app/b.bin"]
    want = [d for p in order for d in chunks_of(m, p)]
    cache = ChunkCache(tmp_path / "cache", 1 << 30)
    fill_cache(cache, store, want)
    first = save_trace(record(m, order), store, chunk_reader(cache), set())
    assert first
    packs = set(store.backend.list("packs/"))  # the index's directory pack and this one
    pack = Trace.parse(store.get_trace(m.digest, first, MAX_TRACE_BYTES)).pack
    assert pack and store.list_layer_traces(m.meta["layers"][0]["digest"])
    for boot in range(9):  # each boot learns the packed locations from the newest traces
        status = PrefetchStatus()
        traces = load_traces(store, m, status, max_traces=4)
        known = packed_locations(traces)
        assert set(known) == set(want), f"boot {boot}: pack locations lost"
        time.sleep(0.002)  # distinct trace ids (milliseconds)
        save_trace(record(m, list(reversed(order))), store, chunk_reader(cache), known)
    assert len(store.list_traces(m.digest)) == 10
    assert f"packs/{pack}" in packs
    assert set(store.backend.list("packs/")) == packs  # no other boot wrote one
    traces = load_traces(store, m, PrefetchStatus(), max_traces=4)
    assert first not in [t.trace_id for t in traces]
    groups = plan_groups(merge(traces), 8 << 20, 1 << 20)
    assert all(g.pack == pack for g in groups) and len(groups) <= len(order)
    cache.close()


# -- hostile trace objects ----------------------------------------------------------------------

def zstd_frame_declaring(size: int, payload: bytes) -> bytes:
    """A zstd frame whose header declares `size` bytes but holds `payload` (one raw block)."""
    header = b"\x28\xb5\x2f\xfd" + bytes([0b11100000]) + struct.pack("<Q", size)
    return header + struct.pack("<I", (len(payload) << 3) | 1)[:3] + payload


def plant_hostile(image: Image, path: str) -> dict[str, str]:
    """Store hostile objects as traces of the image; returns {trace id: what}."""
    store, m = image.store(), image.manifest()
    good = record(m, [path]).build_trace()
    good_json = good.to_json()
    doc = json.loads(good_json)
    key = f"traces/m/{image.digest}/"
    planted: dict[str, str] = {}

    def put(what: str, data: bytes, raw: bool = False) -> None:
        tid = f"{len(planted):013d}-hostile"
        planted[tid] = what
        if raw:
            store.backend.put(key + tid, data)
        else:
            store.put_trace(image.digest, tid, data, [])

    put("truncated zstd", compress(good_json)[:-9], raw=True)
    put("not zstd", good_json, raw=True)
    put("absurd declared size", zstd_frame_declaring(1 << 40, b"{}"), raw=True)
    put("not json", b"\x00\x01 this is not json")
    put("unknown digest", json.dumps({**doc, "chunks": [[dig(5), 10, 0, 0, -1, 0]]}).encode())
    put("unknown path", json.dumps({**doc, "paths": ["/no/such/file"]}).encode())
    put("path index out of range",
        json.dumps({**doc, "chunks": [[*doc["chunks"][0][:3], 7, -1, 0]]}).encode())
    put("absurd length", json.dumps({**doc, "chunks": [[doc["chunks"][0][0], 1 << 40, 0, 0, -1,
                                                         0]]}).encode())
    put("other manifest", json.dumps({**doc, "manifest": dig(1)}).encode())
    put("too large", b" " * (MAX_TRACE_BYTES + 1))
    return planted


def test_load_traces_rejects_hostile_objects(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    image = make_image(tmp_path, "img", [files_layer(UNIT_FILES)], f"file://{tmp_path}/store")
    planted = plant_hostile(image, "/app/a.bin")
    status = PrefetchStatus()
    with caplog.at_level(logging.WARNING, logger="prefetch.replay"):
        traces = load_traces(image.store(), image.manifest(), status, max_traces=100)
    assert traces == []
    assert status.rejected_traces == len(planted)
    logged = caplog.text
    for tid, what in planted.items():
        assert f"ignoring trace {tid}" in logged, f"no log line for the {what} trace"
    # A good trace next to them is used.
    store, m = image.store(), image.manifest()
    rec = record(m, ["/app/a.bin", "/app/b.bin"])
    cache = ChunkCache(tmp_path / "c", 1 << 30)
    good_id = save_trace(rec, store, chunk_reader(cache), set())
    cache.close()
    status = PrefetchStatus()
    traces = load_traces(store, m, status, max_traces=100)
    assert [t.trace_id for t in traces] == [good_id]
    assert status.rejected_traces == len(planted) and status.source == "manifest"


# -- real mounts --------------------------------------------------------------------------------

CORE_FILES = {
    "app/zeta.bin": rnd(600_000, 1),  # 3 chunks
    "app/alpha.bin": rnd(300_000, 2),  # 2 chunks
    "app/mid/beta.bin": rnd(100_000, 3),  # 1 chunk
    "app/unread.bin": rnd(200_000, 4),
    "app/mid/unread2.bin": rnd(50_000, 5),
    "app/big-unread.bin": rnd(1_000_000, 6),
}
BOOT = ["app/zeta.bin", "app/alpha.bin", "app/mid/beta.bin"]  # not in name order


def test_record_then_prefetch(fuse: None, store_url: str, tmp_path: Path) -> None:
    """The core loop, on the file store and on SeaweedFS: record a boot, replay it cold."""
    image = make_image(tmp_path, "img", [files_layer(CORE_FILES)], store_url)
    m = image.manifest()
    boot_chunks = [d for p in BOOT for d in chunks_of(m, "/" + p)]
    assert len(boot_chunks) == 6

    # Boot 1: read A, B, C in that order; the trace is saved once the boot idles.
    with mounted(image.ref, tmp_path / "mnt1", store_url, tmp_path / "cache1",
                 "--trace-idle", IDLE) as mnt:
        assert mnt.stats()["prefetch"]["source"] == ""  # no trace yet
        for p in BOOT:
            read_checked(mnt, image, [p])
        st = wait_stats(mnt, lambda s: s["prefetch"]["trace_saved"] != "", "the trace to be saved")
        assert st["prefetch"]["recorded_chunks"] == 6
    traces = stored_traces(image)
    assert len(traces) == 1
    trace = traces[0]
    assert trace.trace_id == st["prefetch"]["trace_saved"]
    paths = list(dict.fromkeys(c.path for c in trace.chunks))
    assert paths == ["/" + p for p in BOOT]
    assert sorted(c.digest for c in trace.chunks) == sorted(boot_chunks)
    assert trace.pack is not None and all(c.pack_offset >= 0 for c in trace.chunks)

    shown = cli("trace", "show", image.ref, "--store", store_url, check=True).stdout
    assert "1 boots merged (from manifest)" in shown
    listed = shown.split("in first-access order:\n", 1)[1].split()
    listed_paths = [w for w in listed if w.startswith("/")]
    assert listed_paths == ["/" + p for p in BOOT], shown

    # Boot 2, empty cache: everything the boot reads is prefetched before it is read,
    # in one ranged GET of the pack.
    with mounted(image.ref, tmp_path / "mnt2", store_url, tmp_path / "cache2",
                 "--trace-idle", IDLE) as mnt:
        st = prefetch_done(mnt)
        pf, mt = st["prefetch"], st["metrics"]
        assert pf["state"] == "done" and pf["source"] == "manifest" and pf["traces"] == 1
        assert pf["planned_chunks"] == 6 and pf["done_chunks"] == 6
        assert mt["prefetch_chunks"] == 6
        assert mt["prefetch_requests"] == 1 == pf["groups"]  # the pack, one ranged GET
        assert mt["fetches"] == 0 and mt["reads"] == 0
        read_checked(mnt, image, BOOT)
        mt = mnt.stats()["metrics"]
        assert mt["fetches"] == 0 and mt["cache_misses"] == 0, mt
        assert mt["prefetch_hits"] == 6
        assert mt["prefetch_chunks"] == 6  # nothing the boot does not read was fetched
        # Files outside the trace still work (fetched on demand).
        read_checked(mnt, image, ["app/unread.bin"])
        assert mnt.stats()["metrics"]["fetches"] >= 1
    # Boot 2 was recorded too (saved at unmount, as it read a file after idling).
    traces = stored_traces(image)
    assert len(traces) == 2 and traces[1].chunks[-1].path == "/app/unread.bin"

    # Boot 3, on boot 2's cache: nothing to fetch; the planned chunks already on disk
    # are verified ahead of the process (warmed), and its reads find them ready.
    with mounted(image.ref, tmp_path / "mnt3", store_url, tmp_path / "cache2",
                 "--no-trace") as mnt:
        st = prefetch_done(mnt)
        pf, mt = st["prefetch"], st["metrics"]
        assert pf["local_chunks"] == pf["planned_chunks"] == pf["warmed_chunks"] >= 6, pf
        assert pf["done_chunks"] == 0 and mt["prefetch_requests"] == 0
        assert st["cache"]["hits"] == 0 and mt["reads"] == 0  # warming is not reading
        read_checked(mnt, image, BOOT)
        mt = mnt.stats()["metrics"]
        assert mt["fetches"] == 0 and mt["cache_misses"] == 0 and mt["cache_hits"] >= 6, mt


def test_reads_join_or_overtake_prefetch(fuse: None, seaweed: Any, s3_bucket_url: str,
                                         tmp_path: Path) -> None:
    """Behind 200 ms per request, reads do not wait for a long prefetch plan: a read of
    a chunk in flight joins it; a read of a chunk late in the plan fetches it at once."""
    from casfs.testing.proxy import LatencyProxy

    n = 128
    files = {f"app/pkg/m{i:03d}.py": rnd(3_000, 100 + i) for i in range(n)}
    image = make_image(tmp_path, "img", [files_layer(files)], s3_bucket_url)
    store, m = image.store(), image.manifest()
    order = sorted(files)
    # An earlier boot read every file in order; its pack holds the first 16 files (the
    # rest had left its cache), so the plan is one ranged GET then 112 blob GETs: at
    # 8 in flight and 200 ms each, at least 2.8 s.
    rec = record(m, ["/" + p for p in order])
    # Without directory packs (as an image indexed before them), or the plan's other
    # chunks would come in one more ranged GET.
    layer_hex = m.meta["layers"][0]["digest"].partition(":")[2]
    store.backend.delete(f"packidx/sha256/{layer_hex}")
    cache = ChunkCache(tmp_path / "reccache", 1 << 30)
    fill_cache(cache, store, [d for p in order[:16] for d in chunks_of(m, "/" + p)])
    save_trace(rec, store, chunk_reader(cache), set())
    cache.close()
    first, late = order[3], order[-1]

    with LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=200) as proxy, \
            mounted(image.ref, tmp_path / "mnt", s3_bucket_url, tmp_path / "cache",
                    "--no-trace", env={"AWS_ENDPOINT_URL": proxy.url}) as mnt:
        wait_stats(mnt, lambda s: s["prefetch"]["state"] != "loading"
                   and s["prefetch"]["state"] != "idle", "prefetch to start", interval=0.005)
        # first: in the pack range being fetched; late: the last chunk of the plan.
        read_checked(mnt, image, [first, late])
        st = mnt.stats()
        pf, mt = st["prefetch"], st["metrics"]
        # Both reads were served long before the plan finished...
        assert pf["state"] == "running" and pf["done_chunks"] < pf["planned_chunks"] == n, pf
        # ...the first by the prefetch (joined in flight, or already landed), the late
        # one by a fetch of its own, ahead of the queue.
        assert mt["prefetch_joined"] + mt["prefetch_hits"] == 1, mt
        assert mt["fetches"] == 1 and mt["fetch_joined"] == mt["prefetch_joined"], mt
        joined = mt["prefetch_joined"]
        st = prefetch_done(mnt)
        read_checked(mnt, image, order)
        mt = mnt.stats()["metrics"]
        # Every chunk came from the store exactly once: the pack range, the blob GETs
        # prefetch made, and the one the late read made itself.
        assert mt["fetches"] == 1
        assert mt["prefetch_requests"] == 1 + (n - 16) - 1, mt
        assert mt["prefetch_chunks"] == n - 1
        print(f"\nlatency test: joined {joined}, prefetch requests {mt['prefetch_requests']} "
              f"for {n} chunks, groups {st['prefetch']['groups']}, proxy GETs "
              f"{proxy.stats()['by_method'].get('GET', {}).get('requests')}")


def test_hostile_traces_rejected_mount_works(fuse: None, store_url: str, tmp_path: Path) -> None:
    image = make_image(tmp_path, "img", [files_layer(CORE_FILES)], store_url)
    store, m = image.store(), image.manifest()
    # Seven hostile objects...
    planted = plant_hostile(image, "/" + BOOT[1])
    for tid in list(planted)[7:]:
        store.backend.delete(f"traces/m/{image.digest}/{tid}")
        del planted[tid]
    # ...and one well-formed trace whose pack locations lie: the first chunk's frame
    # is cut short, another's offset is far beyond the end of the pack.
    rec = record(m, ["/" + p for p in BOOT])
    cache = ChunkCache(tmp_path / "reccache", 1 << 30)
    fill_cache(cache, store, [d for p in BOOT for d in chunks_of(m, "/" + p)])
    tid = save_trace(rec, store, chunk_reader(cache), set())
    cache.close()
    assert tid
    bad = Trace.parse(store.get_trace(image.digest, tid, MAX_TRACE_BYTES), tid)
    bad.chunks[0].pack_length -= 7
    bad.chunks[3].pack_offset = 1 << 30
    store.put_trace(image.digest, tid, bad.to_json(), [])

    with mounted(image.ref, tmp_path / "mnt", store_url, tmp_path / "cache", "--no-trace") as mnt:
        st = prefetch_done(mnt)
        pf = st["prefetch"]
        assert pf["rejected_traces"] == 7 and pf["traces"] == 1, pf
        read_checked(mnt, image, list(CORE_FILES))
        mt = mnt.stats()["metrics"]
        assert mt["io_errors"] == 0
        # The two chunks whose pack locations lied were fetched by the reads themselves.
        assert mt["fetches"] >= 2
        log = mnt.log()
    for t, what in planted.items():
        assert f"ignoring trace {t}" in log, f"no log line for the {what} trace:\n{log}"
    assert f"pack {bad.pack}: chunk {bad.chunks[0].digest} rejected" in log, log
    assert f"prefetch from pack {bad.pack} failed" in log, log


def test_trace_travels_to_image_sharing_layers(fuse: None, store_url: str, tmp_path: Path) -> None:
    """A boot of image A (layers X, Y) prefetches for image B (layers X, Z)."""
    url = store_url
    x = ob.Layer.from_members(files_layer({f"usr/lib/torchish/lib{i}.so": rnd(50_000, 200 + i)
                                           for i in range(12)}))
    y = files_layer({"app/a/main.py": rnd(40_000, 300), "app/a/util.py": rnd(9_000, 301)})
    z = files_layer({"app/b/main.py": rnd(30_000, 400), "app/b/extra.bin": rnd(120_000, 401)})
    a = make_image(tmp_path, "a", [x, y], url)
    b = make_image(tmp_path, "b", [x, z], url)
    assert a.digest != b.digest
    shared = [f"usr/lib/torchish/lib{i}.so" for i in range(12)]
    boot_a = [*shared, "app/a/main.py", "app/a/util.py"]

    with mounted(a.ref, tmp_path / "mnta", url, tmp_path / "cache-a", "--trace-idle", IDLE) as mnt:
        read_checked(mnt, a, boot_a)
    assert len(stored_traces(a)) == 1  # saved at unmount
    assert stored_traces(b) == []

    shown = cli("trace", "show", b.ref, "--store", url, check=True).stdout
    assert "from shared layers" in shown, shown

    mb = b.manifest()
    x_chunks = [d for p in shared for d in chunks_of(mb, "/" + p)]
    with mounted(b.ref, tmp_path / "mntb", url, tmp_path / "cache-b", "--trace-idle", IDLE) as mnt:
        st = prefetch_done(mnt)
        pf, mt = st["prefetch"], st["metrics"]
        assert pf["source"] == "shared layers" and pf["traces"] == 1
        assert pf["planned_chunks"] == len(x_chunks)  # A's own files are not B's
        assert mt["prefetch_chunks"] == len(x_chunks)
        assert mt["prefetch_requests"] == 1  # X's chunks sit together in A's pack
        read_checked(mnt, b, [*shared, "app/b/main.py"])
        mt = mnt.stats()["metrics"]
        assert mt["prefetch_hits"] == len(x_chunks)
        assert mt["fetches"] == len(chunks_of(mb, "/app/b/main.py"))  # only Z's file
    # B's own trace now exists (B's next mount uses it rather than A's). A's pack held
    # 12 of its 13 chunks, enough to write no pack of its own but point into A's.
    (tb,) = stored_traces(b)
    assert tb.pack is not None and tb.pack == stored_traces(a)[0].pack
    assert {c.digest for c in tb.chunks if c.pack_offset >= 0} == set(x_chunks)


def test_no_prefetch_and_no_trace(fuse: None, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store"
    image = make_image(tmp_path, "img", [files_layer(CORE_FILES)], url)
    m = image.manifest()
    boot_chunks = [d for p in BOOT for d in chunks_of(m, "/" + p)]

    # --no-trace: nothing recorded, nothing saved, not even at unmount.
    with mounted(image.ref, tmp_path / "m1", url, tmp_path / "c1", "--no-trace",
                 "--trace-idle", "0.2") as mnt:
        read_checked(mnt, image, BOOT)
        time.sleep(1.0)
        pf = mnt.stats()["prefetch"]
        assert "recorded_chunks" not in pf and "trace_saved" not in pf
    assert image.store().list_traces(image.digest) == []

    # Record one boot (saved at unmount).
    with mounted(image.ref, tmp_path / "m2", url, tmp_path / "c2") as mnt:
        read_checked(mnt, image, BOOT)
    assert len(stored_traces(image)) == 1

    # --no-prefetch: no replay, no heuristics; every chunk read is fetched on demand.
    with mounted(image.ref, tmp_path / "m3", url, tmp_path / "c3", "--no-prefetch",
                 "--no-trace") as mnt:
        time.sleep(0.3)
        pf = mnt.stats()["prefetch"]
        assert pf["state"] == "off" and "heuristic_requests" not in pf
        read_checked(mnt, image, BOOT)
        mt = mnt.stats()["metrics"]
        assert mt["prefetch_requests"] == mt["prefetch_chunks"] == mt["prefetch_hits"] == 0
        assert mt["fetches"] == len(boot_chunks)
    assert len(stored_traces(image)) == 1

    # Without the flag the same cold mount prefetches (the control for the above).
    with mounted(image.ref, tmp_path / "m4", url, tmp_path / "c4", "--no-trace") as mnt:
        st = prefetch_done(mnt)
        assert st["metrics"]["prefetch_chunks"] == len(boot_chunks)


HEURISTIC_FILES = {
    "site/pkg/__init__.py": b"x = 1\n",
    "site/pkg/mod.py": b"y = 2\n",
    "site/pkg/__pycache__/__init__.cpython-311.pyc": b"pyc-init" * 100,
    "site/pkg/__pycache__/mod.cpython-311.pyc": b"pyc-mod" * 100,
    "site/pkg/_ext.cpython-311-x86_64-linux-gnu.so": random.Random(3).randbytes(700_000),
    "site/pkg/data.bin": random.Random(4).randbytes(700_000),
    "site/other/__init__.py": b"",
}


def test_heuristics_listing_and_libraries(tmp_path: Path) -> None:
    """Without a trace: listing a package directory fetches its __pycache__; the first
    read of a multi-chunk shared library fetches all of it, of other files only the
    sequential readahead does. (The fetcher is a recorder: this is the guessing logic.)"""
    from prefetch.heuristics import Heuristics

    image = make_image(tmp_path, "h", [files_layer(HEURISTIC_FILES)], f"file://{tmp_path}/store")
    m = image.manifest()

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        fetcher = RecordingFetcher()
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery)  # type: ignore[arg-type]
            h.on_list(m.resolve("/site/pkg"))
            await trio.testing.wait_all_tasks_blocked()
            listed = list(fetcher.got)
            fetcher.got.clear()
            h.on_list(m.resolve("/site/other"))  # no __pycache__: nothing
            h.on_list(m.resolve("/site/pkg"))  # seen already: nothing again
            so = m.resolve("/site/pkg/_ext.cpython-311-x86_64-linux-gnu.so")
            h.on_read(so, m.chunks(so)[:1])
            await trio.testing.wait_all_tasks_blocked()
            library = list(fetcher.got)
            fetcher.got.clear()
            data = m.resolve("/site/pkg/data.bin")
            h.on_read(data, m.chunks(data)[:1])
            await trio.testing.wait_all_tasks_blocked()
            return listed, library, list(fetcher.got)

    listed, library, data = trio.run(scenario)
    assert sorted(listed) == sorted(chunks_of(m, "/site/pkg/__pycache__/" + n)[0]
                                    for n in ("__init__.cpython-311.pyc", "mod.cpython-311.pyc"))
    so_chunks = chunks_of(m, "/site/pkg/_ext.cpython-311-x86_64-linux-gnu.so")
    assert len(so_chunks) == 3
    assert sorted(d for d in library if d in so_chunks) == sorted(so_chunks[1:])  # the rest
    # Not the directory's .py files: beside a __pycache__ they are only stat'ed.
    assert set(library) == set(so_chunks[1:])
    assert data == []  # one read of a plain file: no readahead yet, not a library


def test_readahead_follows_interleaved_sequential_runs(tmp_path: Path) -> None:
    """Page faults walk several regions of a big file at once: each run read in order
    gets its own readahead window, and none is asked for twice."""
    from indexer.chunking import SMALL_CHUNK
    from prefetch.heuristics import Heuristics

    files = {"lib/big.dat": random.Random(7).randbytes(80 * SMALL_CHUNK)}
    image = make_image(tmp_path, "ra", [files_layer(files)], f"file://{tmp_path}/store")
    m = image.manifest()
    ino = m.resolve("/lib/big.dat")
    chunks = m.chunks(ino)

    fetcher = RecordingFetcher()

    async def scenario() -> list[list[str]]:
        steps = []
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery, readahead_chunks=4, siblings=False)  # type: ignore[arg-type]
            for i in (10, 40, 11, 41, 12, 42):
                h.on_read(ino, [chunks[i]])
                await trio.testing.wait_all_tasks_blocked()
                steps.append(list(fetcher.got))
                fetcher.got.clear()
        return steps

    steps = trio.run(scenario)
    d = [c.digest for c in chunks]
    got = [sorted(step) for step in steps]  # trio starts the fetches in any order
    assert got[0] == got[1] == []  # two unrelated first reads
    assert got[2] == sorted(d[12:16])  # 11 follows 10: the next 4 chunks
    assert got[3] == sorted(d[42:46])  # 41 follows 40: its own window, not after 16
    assert got[4] == d[16:17] and got[5] == d[46:47]  # each slides one chunk on
    assert fetcher.warm == []  # interleaved runs (page faults) never warm cached chunks

    async def streaming() -> list[list[str]]:
        """One reader walking the file chunk after chunk (model weights): after
        STREAMING_STEPS steps, readahead also verifies cached chunks ahead of it."""
        steps = []
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery, readahead_chunks=4, siblings=False)  # type: ignore[arg-type]
            for i in (60, 60, 61, 62, 63):
                h.on_read(ino, [chunks[i]])
                await trio.testing.wait_all_tasks_blocked()
                steps.append(list(fetcher.warm))
                fetcher.warm.clear()
        return steps

    warm = trio.run(streaming)
    assert warm[:3] == [[], [], []]  # re-reading one chunk is no step; 61 is the first
    assert warm[3] == d[66:67] and warm[4] == d[67:68]  # 62, 63: streaming, window warmed
    fetcher.got.clear()

    async def planned_boot() -> list[str]:
        """With a trace plan holding the chunks read: the plan, not readahead, decides."""
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery, readahead_chunks=4,  # type: ignore[arg-type]
                           siblings=False, planned=lambda digest: digest in d[:30])
            for i in (10, 11, 12, 40, 41):
                h.on_read(ino, [chunks[i]])
            await trio.testing.wait_all_tasks_blocked()
        return list(fetcher.got)

    assert sorted(trio.run(planned_boot)) == sorted(d[42:46])  # only past the plan


def test_metadata_scan_fetches_every_distribution(tmp_path: Path) -> None:
    """Reading one distribution's entry_points.txt fetches every other one's too (an
    entry-point scan reads them all in turn), besides its own directory's files."""
    from prefetch.heuristics import Heuristics

    files = {"site/a-1.dist-info/entry_points.txt": b"[console_scripts]\na = a:main\n",
             "site/a-1.dist-info/METADATA": b"Name: a\n",
             "site/b-2.dist-info/entry_points.txt": b"[x]\nb = b\n",
             "site/b-2.dist-info/METADATA": b"Name: b\n",
             "site/c.egg-info/entry_points.txt": b"[y]\nc = c\n",
             "site/notmeta/entry_points.txt": b"not a distribution\n"}
    image = make_image(tmp_path, "md", [files_layer(files)], f"file://{tmp_path}/store")
    m = image.manifest()
    fetcher = RecordingFetcher()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            h = Heuristics(m, fetcher, nursery)  # type: ignore[arg-type]
            ino = m.resolve("/site/a-1.dist-info/entry_points.txt")
            h.on_read(ino, m.chunks(ino))
            await trio.testing.wait_all_tasks_blocked()

    trio.run(scenario)
    want = {chunks_of(m, "/" + p)[0] for p in ("site/a-1.dist-info/METADATA",
                                               "site/b-2.dist-info/entry_points.txt",
                                               "site/c.egg-info/entry_points.txt")}
    assert set(fetcher.got) == want
