"""The first boot of a never-seen image (issue 18): the background stream, its policy and
caps, the boot's end, counting the reads that still waited, and the trace a streamed boot
leaves for the next one.

In-process (a real store, cache and fetcher; the store wrapped to log every GET with its
byte range, optionally slowed): the plan's tiers and order, the focus on the package
being read, reads served ahead of the stream, the cap, the boot's end, the bandwidth
cap, and that no byte crosses the wire twice. Real mounts, in both serving modes (the
`mode` fixture): the policy (off / likely / all, set through CASFS_BACKGROUND_FETCH while
`casfs mount` has no flag for it) does what it says; a boot the stream served leaves a
full trace that the next boot on another node replays; the stream stops when the boot
ends and at its byte cap, and `casfs stats` tells what it fetched, what the boot used and
which reads still waited.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from casfs.cache import ChunkCache
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.metrics import MountMetrics
from casfs.packindex import PackIndex
from casfs.ranges import ranges_of
from casfs.store import Store, open_store
from casfs.testing.mounting import cli
from prefetch.policy import ALL, LIKELY, OFF, StreamPolicy, is_tree, parse_bytes
from prefetch.stream import (
    CODE,
    LIBRARIES,
    REST,
    BackgroundStream,
    IdleCpu,
    build_plan,
    depth_below,
    package_root,
)
from tests.mounthelp import mounted, wait_stats
from tests.test_elf import DYN_OFF, make_elf
from tests.test_prefetch import (
    Image,
    files_layer,
    make_image,
    read_checked,
    stored_traces,
)

PY = "usr/lib/python3.11"
SITE = PY + "/site-packages"
MIB = 1 << 20
BIG_LIBRARY_MAX = 4 * MIB  # libraries above this get their loader parts only, in tests


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def big_library() -> bytes:
    """A 12 MiB ELF library (tests.test_elf's layout), random but for its headers and
    dynamic section, so that its 48 chunks are distinct."""
    data = bytearray(make_elf(12 * MIB))
    dyn = DYN_OFF + 512
    data[4096:DYN_OFF] = rnd(DYN_OFF - 4096, 12)
    data[dyn:] = rnd(len(data) - dyn, 13)
    return bytes(data)


def _files() -> dict[str, bytes]:
    files: dict[str, bytes] = {
        f"{PY}/os.py": rnd(3000, 1),
        f"{PY}/__pycache__/os.cpython-311.pyc": rnd(2500, 2),
        f"{PY}/encodings/__init__.py": rnd(1500, 3),
        f"{PY}/encodings/__pycache__/__init__.cpython-311.pyc": rnd(1200, 4),
        f"{SITE}/alpha-1.0.dist-info/METADATA": rnd(900, 5),
        f"{SITE}/alpha-1.0.dist-info/entry_points.txt": rnd(300, 6),
        f"{SITE}/plain/mod.py": rnd(4000, 7),  # no __pycache__: its source is its code
        f"{SITE}/plain/README.txt": rnd(2000, 8),
        "usr/lib/libsmall.so.1": rnd(50_000, 9),
        f"{SITE}/gamma/lib/libbig.so": big_library(),  # as torch/lib/libtorch_cpu.so
        "usr/share/doc/notes.txt": rnd(5000, 10),
        "usr/share/big.dat": rnd(600_000, 11),  # 3 chunks, not packed
    }
    for i, pkg in enumerate(("alpha", "beta", "gamma")):
        base = f"{SITE}/{pkg}"
        for j, mod in enumerate(("__init__", "core", "util")):
            files[f"{base}/{mod}.py"] = rnd(6000, 100 * i + j)
            files[f"{base}/__pycache__/{mod}.cpython-311.pyc"] = rnd(20_000, 100 * i + 10 + j)
        files[f"{base}/sub/__init__.py"] = rnd(1000, 100 * i + 20)
        files[f"{base}/sub/__pycache__/__init__.cpython-311.pyc"] = rnd(9000, 100 * i + 21)
        files[f"{base}/_ext.cpython-311-x86_64-linux-gnu.so"] = rnd(300_000, 100 * i + 30)
        files[f"{base}/data/table.bin"] = rnd(100_000, 100 * i + 40)
    return files


FILES = _files()
CODE_FILES = [p for p in FILES if p.endswith((".pyc", "METADATA", "entry_points.txt"))
              or p == f"{SITE}/plain/mod.py"]
LIBRARY_FILES = ["usr/lib/libsmall.so.1"] + [p for p in FILES if p.endswith("-gnu.so")]
BIG = f"{SITE}/gamma/lib/libbig.so"


def of_package(paths: list[str], pkg: str) -> list[str]:
    return [p for p in paths if f"/{pkg}/" in p]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    tmp = tmp_path_factory.mktemp("firstboot")
    return make_image(tmp, "img", [files_layer(FILES)], f"file://{tmp}/store")


def chunks_of(m: Manifest, path: str) -> list[str]:
    return [c.digest for c in m.chunks(m.resolve("/" + path))]


def digests_of(m: Manifest, paths: list[str]) -> set[str]:
    return {d for p in paths for d in chunks_of(m, p)}


def all_chunks(m: Manifest) -> set[str]:
    return set(m.chunk_digests())


# -- policy and plan ----------------------------------------------------------------------------

def test_policy_from_settings_and_environment() -> None:
    assert StreamPolicy.from_settings({}, env={}) == StreamPolicy(mode="auto")
    env = {"CASFS_BACKGROUND_FETCH": "ALL", "CASFS_BACKGROUND_CAP": "2G",
           "CASFS_BACKGROUND_RATE": "50M"}
    assert StreamPolicy.from_settings({}, env=env) == StreamPolicy(ALL, 2 << 30, 50 << 20)
    # A mount's own setting wins over the node's environment, each key on its own.
    p = StreamPolicy.from_settings({"background_fetch": "off", "background_cap": 1000}, env=env)
    assert p == StreamPolicy(OFF, 1000, 50 << 20)
    assert parse_bytes("1.5K") == 1536 and parse_bytes("10MB/s") == 10 << 20
    assert parse_bytes(None) is None and parse_bytes("") is None
    for bad in ({"background_fetch": "sometimes"}, {"background_cap": "lots"},
                {"background_rate": "0"}):
        with pytest.raises(ValueError):
            StreamPolicy.from_settings(bad, env={})


def test_session_takes_a_policy_settings_or_a_mode(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """What the daemons pass PrefetchSession(background=...): a MountConfig's settings
    (its fields or `extra`), a mode, a policy; a bad setting is logged, the default used."""
    from prefetch.session import _policy

    monkeypatch.setenv("CASFS_BACKGROUND_RATE", "1M")
    assert _policy({"background_fetch": "all", "background_cap": "1G"}) == \
        StreamPolicy(ALL, 1 << 30, 1 << 20)
    assert _policy("off") == StreamPolicy(OFF, None, 1 << 20)
    assert _policy(None).mode == "auto"
    assert _policy(StreamPolicy(LIKELY)) == StreamPolicy(LIKELY)
    with caplog.at_level("WARNING"):
        assert _policy({"background_fetch": "sometimes"}) == StreamPolicy()
    assert "background fetch 'sometimes'" in caplog.text


def test_idle_cpus(tmp_path: Path) -> None:
    """IdleCpu reads the node's idle time from /proc/stat between two looks."""
    stat_file = tmp_path / "stat"

    def ticks(user: int, idle: int) -> None:
        stat_file.write_text(f"cpu  {user} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4\n")

    ticks(100, 100)
    cpu = IdleCpu(str(stat_file), interval=0.0)
    cpu.cpus = 4
    assert cpu.idle_cpus() is None  # one look: nothing to compare yet
    ticks(130, 170)  # of 100 ticks since, 70 idle: 2.8 of 4 CPUs
    assert cpu.idle_cpus() == pytest.approx(2.8)
    ticks(230, 170)
    assert cpu.idle_cpus() == 0.0
    assert IdleCpu(str(tmp_path / "missing")).idle_cpus() is None
    assert StreamPolicy.from_settings({}, env={}).idle_cpus == 1.0
    assert StreamPolicy.from_settings({}, env={"CASFS_BACKGROUND_IDLE_CPUS": "0"}).idle_cpus == 0
    with pytest.raises(ValueError):
        StreamPolicy.from_settings({"background_idle_cpus": "many"}, env={})


def test_stream_waits_for_an_idle_cpu(image: Image, tmp_path: Path) -> None:
    """While no CPU is idle (the boot computing) the stream starts no request."""
    class Busy(IdleCpu):
        idle = 0.0

        def idle_cpus(self) -> float | None:
            return self.idle

    busy = Busy(interval=0.01)
    rig = Rig(image, tmp_path, policy=StreamPolicy(ALL), min_idle_cpus=1.0, idle_cpu=busy)

    async def boot() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.stream.run)
            await trio.sleep(0.5)
            assert rig.stream.status.requests == 0 and rig.stream.status.cpu_waits > 10
            busy.idle = 1.5  # the boot waits on the network: a CPU is free

    trio.run(boot)
    assert rig.stream.status.stopped == "done" and rig.stream.status.requests > 0
    rig.cache.close()


def test_default_mode_images_and_trees(image: Image, tmp_path: Path) -> None:
    """auto: `likely` for an image, `off` for a directory indexed as a tree (its meta
    says so: `casfs index tree:`), whatever is asked for otherwise."""
    from indexer.index import index_image

    meta = image.manifest().meta
    assert not is_tree(meta)
    assert StreamPolicy().mode_for(meta) == LIKELY
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.safetensors").write_bytes(rnd(300_000, 50))
    (weights / "config.json").write_bytes(b"{}")
    store = open_store(f"file://{tmp_path}/store", create=True)
    tree_meta = Manifest(store.get_manifest(index_image(f"tree:{weights}", store).digest)).meta
    for tree in (tree_meta, {"casfs": "manifest", "source": "tree", "layers": []},
                 {"layers": [{"digest": "x", "media_type": "application/vnd.casfs.tree.v1"}]}):
        assert is_tree(tree), tree
        assert StreamPolicy().mode_for(tree) == OFF
        assert StreamPolicy(ALL).mode_for(tree) == ALL  # asked for: streamed


def test_package_root() -> None:
    site = b"/usr/lib/python3.11/site-packages"
    assert package_root(site + b"/torch/nn/__pycache__/x.pyc") == site + b"/torch"
    assert package_root(site + b"/numpy.libs/libopenblas.so") == site + b"/numpy"
    assert package_root(site + b"/six.py") == site
    assert package_root(site + b"/__pycache__/six.cpython-311.pyc") == site
    stdlib = b"/usr/lib/python3.11"  # the standard library is one package
    assert package_root(stdlib + b"/__pycache__/os.cpython-311.pyc") == stdlib
    assert package_root(stdlib + b"/encodings/__pycache__/a.pyc") == stdlib
    assert package_root(stdlib + b"/lib-dynload/math.cpython-311-x86_64-linux-gnu.so") == stdlib
    assert package_root(b"/usr/share/doc/notes.txt") is None
    assert package_root(b"/usr/bin/python3.11") is None
    assert depth_below(site + b"/torch/__pycache__/x.pyc", site + b"/torch") == 0
    assert depth_below(site + b"/torch/nn/modules/__pycache__/x.pyc", site + b"/torch") == 2
    assert depth_below(site + b"/torch/lib/libc10.so", site + b"/torch") == 1


def load_packs(store: Store, m: Manifest) -> PackIndex:
    packs = PackIndex()
    packs.load(store, [ly["digest"] for ly in m.meta["layers"]], m.chunk_digests())
    assert packs.locations, "the test image has directory packs"
    return packs


def test_plan_tiers(image: Image) -> None:
    store, m = image.store(), image.manifest()
    packs = load_packs(store, m)
    likely = build_plan(m, packs.locations, LIKELY, BIG_LIBRARY_MAX)
    tiers = [{it.digest for it in t} for t in likely.tiers]
    assert tiers[CODE] == digests_of(m, CODE_FILES)
    # `likely` streams packages: a library of no package (usr/lib) is left to the guesses.
    assert tiers[LIBRARIES] == digests_of(m, LIBRARY_FILES[1:])
    assert tiers[REST] == set()  # streamed only with `all`
    gamma = likely.roots.index(f"/{SITE}/gamma".encode())
    assert likely.big_libraries == {gamma: [m.resolve("/" + BIG)]}
    assert {likely.roots[it.focus] for it in likely.tiers[LIBRARIES]} == \
        {f"/{SITE}/{pkg}".encode() for pkg in ("alpha", "beta", "gamma")}
    # Packed chunks come in pack order (a directory at a time), then the others.
    code = likely.tiers[CODE]
    offsets = [(it.location.pack, it.location.offset) for it in code if it.location]
    assert offsets == sorted(offsets) and len(offsets) == len(code)
    libs = likely.tiers[LIBRARIES]
    packed = [it.location is not None for it in libs]
    assert packed == sorted(packed, reverse=True)
    everything = build_plan(m, packs.locations, ALL, BIG_LIBRARY_MAX)
    assert set().union(*({it.digest for it in t} for t in everything.tiers)) == all_chunks(m)
    assert everything.chunks == len(all_chunks(m))
    # The image's stored size as known at mount: packed chunks at their stored size.
    assert everything.stored_bytes == likely.stored_bytes > 0


# -- the stream, in-process ---------------------------------------------------------------------

class Wire:
    """A store backend logging every GET in order: (key, offset, length or -1 whole),
    each after `delay` seconds (a slow link)."""

    def __init__(self, inner: Any, delay: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.delay = delay
        self.log: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self.lock:
            self.log.append((key, 0, -1))
        time.sleep(self.delay)
        return self.inner.get(key, max_bytes=max_bytes)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with self.lock:
            self.log.append((key, offset, length))
        time.sleep(self.delay)
        return self.inner.get_range(key, offset, length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Rig:
    """A fetcher over a logged store and a fresh cache, and a stream over them."""

    def __init__(self, image: Image, tmp: Path, *, delay: float = 0.0,
                 policy: StreamPolicy | None = None, boot_over: Callable[[], bool]
                 = lambda: False, **stream_kw: Any) -> None:
        policy = policy or StreamPolicy(LIKELY)
        stream_kw.setdefault("grace", 0.0)
        stream_kw.setdefault("min_idle_cpus", 0.0)  # whatever the machine's load
        self.manifest = image.manifest()
        self.wire = Wire(open_store(image.store_url).backend, delay)
        self.store = Store(self.wire)
        self.cache = ChunkCache(tmp / "cache", 1 << 30)
        self.metrics = MountMetrics()
        self.fetcher = Fetcher(self.store, self.cache, self.metrics)
        self.packs = load_packs(open_store(image.store_url), self.manifest)
        self.stream = BackgroundStream(self.manifest, self.fetcher, self.packs, policy=policy,
                                       boot_over=boot_over,
                                       whole_library_max=BIG_LIBRARY_MAX, **stream_kw)
        self.stream.booting.set()  # as if the boot had begun (tests that read say so)

    def requests(self) -> list[set[str]]:
        """The chunks each logged GET carried (a blob, or the packed chunks a range
        covers), in order; manifests and pack indexes left out."""
        out = []
        for key, offset, length in self.wire.log:
            if key.startswith("blobs/"):
                out.append({key.rsplit("/", 1)[1]})
            elif key.startswith("packs/"):
                pack = key.split("/", 1)[1]
                out.append({d for d, (p, off, n) in self.packs.locations.items()
                            if p == pack and off >= offset and off + n <= offset + length})
        return out

    async def read(self, path: str) -> bytes:
        m = self.manifest
        ino = m.resolve("/" + path)
        chunks = m.chunks(ino)
        self.stream.on_read(ino, chunks)
        return bytes(await self.fetcher.read(ranges_of(chunks, 0, m.inode(ino).size)))

    def on_node(self, digests: set[str]) -> set[str]:
        ordered = sorted(digests)
        return {d for d, have in zip(ordered, self.cache.contains_many(ordered), strict=True)
                if have}


def test_likely_streams_the_packages_the_boot_enters(image: Image, tmp_path: Path) -> None:
    """One request at a time: the package being imported, its libraries (small ones
    whole, the big one's loader parts) then its code; then nothing until the boot enters
    another package; nothing of a package it never enters; stopped by the boot's end."""
    over = [False]
    rig = Rig(image, tmp_path, concurrency=1, boot_over=lambda: over[0])
    m = rig.manifest
    beta_code, beta_libs = (digests_of(m, of_package(CODE_FILES, "beta")),
                            digests_of(m, of_package(LIBRARY_FILES, "beta")))
    gamma_code, gamma_libs = (digests_of(m, of_package(CODE_FILES, "gamma")),
                              digests_of(m, of_package(LIBRARY_FILES, "gamma")))
    seen: dict[str, Any] = {}

    async def idle() -> None:
        while rig.stream.status.state != "idle":
            await trio.sleep(0.01)

    async def boot() -> None:
        async with trio.open_nursery() as nursery:
            await rig.read(f"{SITE}/beta/__pycache__/__init__.cpython-311.pyc")
            nursery.start_soon(rig.stream.run)
            await idle()
            seen["beta"] = rig.requests()
            await rig.read(f"{SITE}/gamma/__pycache__/__init__.cpython-311.pyc")
            await trio.sleep(0.05)
            await idle()
            seen["gamma"] = rig.requests()[len(seen["beta"]):]
            over[0] = True

    trio.run(boot)
    st = rig.stream.status
    assert st.stopped == "boot over" and st.state == "stopped", st
    first = seen["beta"][1:]  # [0]: the boot's own read
    first_code = next(i for i, r in enumerate(first) if r & beta_code)
    assert beta_libs <= set().union(*first[:first_code]), "libraries first"
    assert beta_code - set(chunks_of(m, f"{SITE}/beta/__pycache__/__init__.cpython-311.pyc")) \
        <= set().union(*first[first_code:])
    assert not set().union(*first) & (gamma_code | gamma_libs)
    then = set().union(*seen["gamma"][1:])
    assert gamma_code - set(chunks_of(m, f"{SITE}/gamma/__pycache__/__init__.cpython-311.pyc")) \
        <= then and gamma_libs <= then
    got = rig.on_node(all_chunks(m))
    big = set(chunks_of(m, BIG))
    assert 0 < len(got & big) < len(big) / 2, "the big library's loader parts only"
    alpha = digests_of(m, of_package(CODE_FILES + LIBRARY_FILES, "alpha"))
    assert not got & alpha, "a package the boot never entered"
    assert not got & set(chunks_of(m, "usr/share/big.dat")), "no rest in `likely`"
    assert st.used_chunks == 0 and st.focus_switches == 2
    rig.cache.close()


def test_all_streams_tier_by_tier(image: Image, tmp_path: Path) -> None:
    """`all`, no package entered: all the code, then all the libraries, then the rest."""
    rig = Rig(image, tmp_path, concurrency=1, policy=StreamPolicy(ALL))
    trio.run(rig.stream.run)
    st = rig.stream.status
    assert st.stopped == "done", st
    m = rig.manifest
    code, libs = digests_of(m, CODE_FILES), digests_of(m, LIBRARY_FILES)
    reqs = rig.requests()
    first_lib = next(i for i, r in enumerate(reqs) if r & libs)
    last_lib = max(i for i, r in enumerate(reqs) if r & libs)
    assert code <= set().union(*reqs[:first_lib])
    rest = set(chunks_of(m, "usr/share/big.dat"))
    assert rest <= set().union(*reqs[last_lib + 1:])
    assert rig.on_node(all_chunks(m)) == all_chunks(m)
    rig.cache.close()


def test_stream_starts_with_the_boot(image: Image, tmp_path: Path) -> None:
    """Nothing is streamed before the boot's first read (a mount nobody reads costs
    nothing), then `grace` seconds later (the read's own guesses go first)."""
    over = [False]
    rig = Rig(image, tmp_path, grace=0.3, boot_over=lambda: over[0])
    rig.stream.booting = trio.Event()
    at: dict[str, float] = {}

    async def boot() -> None:
        with trio.fail_after(20):
            await booting()

    async def booting() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.stream.run)
            await trio.sleep(0.5)
            at["before"] = len(rig.wire.log)
            assert rig.stream.status.state == "waiting" and rig.stream.plan is not None
            t = trio.current_time()
            await rig.read(f"{SITE}/alpha/__pycache__/core.cpython-311.pyc")
            while rig.stream.status.requests == 0:
                await trio.sleep(0.01)
            at["after"] = trio.current_time() - t
            over[0] = True

    trio.run(boot)
    assert at["before"] == 0
    assert at["after"] >= 0.3
    assert rig.stream.status.stopped == "boot over"
    rig.cache.close()


def test_stream_focuses_on_the_package_being_read(image: Image, tmp_path: Path) -> None:
    """`all` too takes the package being imported first, then the image in order."""
    rig = Rig(image, tmp_path, concurrency=1, policy=StreamPolicy(ALL))
    m = rig.manifest
    gamma = f"{SITE}/gamma/__pycache__/util.cpython-311.pyc"

    async def boot() -> None:
        await rig.read(gamma)  # the process is importing gamma when the stream starts
        rig.wire.log.clear()
        await rig.stream.run()

    trio.run(boot)
    reqs = rig.requests()
    gamma_code = digests_of(m, [p for p in CODE_FILES if "/gamma/" in p]) - \
        set(chunks_of(m, gamma))
    # gamma first: its libraries, the big one's loader parts, its code (a range may run
    # on into what follows it in the pack); then the rest of the image.
    last = max(i for i, r in enumerate(reqs) if r & gamma_code)
    gamma_files = digests_of(m, [p for p in FILES if "/gamma/" in p])
    assert all(r & gamma_files for r in reqs[: last + 1]), "only gamma until its code is in"
    # The read chunk was not fetched again; the boot used nothing the stream brought.
    assert not any(set(chunks_of(m, gamma)) & r for r in reqs)
    assert rig.stream.status.focus_switches == 1 and rig.stream.status.stopped == "done"
    rig.cache.close()


def test_reads_go_ahead_of_the_stream(image: Image, tmp_path: Path) -> None:
    """Behind 100 ms per GET, a read of a chunk far down the plan is fetched at once by
    the read itself (reads have their own limiter), while the stream is still running;
    the stream then skips it. A read of a chunk the stream is fetching joins it."""
    rig = Rig(image, tmp_path, delay=0.1, policy=StreamPolicy(ALL), concurrency=2)
    m = rig.manifest
    late = "usr/share/big.dat"  # the rest tier: the end of the plan
    seen: dict[str, Any] = {}

    async def boot() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.stream.run)
            while rig.stream.status.requests < 2:
                await trio.sleep(0.01)
            data = await rig.read(late)
            assert data == FILES[late]
            seen["state"] = rig.stream.status.state
            seen["fetches"] = rig.metrics.fetches

    trio.run(boot)
    assert seen["state"] == "running", "the read did not wait for the stream"
    assert seen["fetches"] == len(chunks_of(m, late))
    st = rig.stream.status
    assert st.stopped == "done" and st.skipped_chunks >= len(chunks_of(m, late))
    blob_gets = [k for k, _, _ in rig.wire.log if k.startswith("blobs/")]
    assert len(blob_gets) == len(set(blob_gets)), "a chunk fetched twice"
    rig.cache.close()


def test_nothing_crosses_the_wire_twice(image: Image, tmp_path: Path) -> None:
    """`all`, six requests in flight, reads of some files meanwhile: every chunk of the
    image ends up on the node, verified, and each came over the wire once."""
    rig = Rig(image, tmp_path, delay=0.02, policy=StreamPolicy(ALL))
    m = rig.manifest
    reads = [f"{SITE}/beta/__pycache__/core.cpython-311.pyc", f"{SITE}/beta/core.py",
             "usr/share/big.dat", f"{SITE}/alpha/_ext.cpython-311-x86_64-linux-gnu.so"]

    async def boot() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.stream.run)
            for p in reads:
                assert await rig.read(p) == FILES[p]

    trio.run(boot)
    st = rig.stream.status
    assert st.stopped == "done", st
    everything = all_chunks(m)
    assert rig.on_node(everything) == everything
    counts: dict[str, int] = {}
    for r in rig.requests():
        for d in r:
            counts[d] = counts.get(d, 0) + 1
    twice = {d: n for d, n in counts.items() if n > 1}
    assert not twice, f"{len(twice)} chunks crossed the wire twice"
    assert set(counts) == everything
    # Every byte the ranges carried was a chunk of the image, inserted (none thrown away).
    ranged = sum(n for k, _, n in rig.wire.log if k.startswith("packs/"))
    assert ranged == sum(rig.packs.locations[d][2] for d in counts if d in rig.packs.locations
                         and not any(k.endswith(d) for k, _, _ in rig.wire.log))
    assert st.used_chunks <= st.fetched_chunks and st.fetched_chunks > 0
    rig.cache.close()


def test_stream_stops_at_the_cap(image: Image, tmp_path: Path) -> None:
    cap = 150_000
    rig = Rig(image, tmp_path, policy=StreamPolicy(ALL, cap=cap), concurrency=1)
    trio.run(rig.stream.run)
    st = rig.stream.status
    assert st.stopped == "cap" and st.cap_bytes == cap
    assert 0 < rig.metrics.fetched_bytes + rig.metrics.prefetch_bytes <= cap
    assert st.fetched_chunks < st.planned_chunks
    rig.cache.close()


def test_default_cap_is_the_stored_size(image: Image, tmp_path: Path) -> None:
    rig = Rig(image, tmp_path, policy=StreamPolicy(ALL))
    trio.run(rig.stream.run)
    st = rig.stream.status
    assert st.cap_bytes == st.image_stored_bytes > 0
    assert rig.metrics.fetched_bytes + rig.metrics.prefetch_bytes <= st.image_stored_bytes
    rig.cache.close()


def test_stream_stops_when_the_boot_ends(image: Image, tmp_path: Path) -> None:
    over = [False]
    rig = Rig(image, tmp_path, delay=0.05, policy=StreamPolicy(ALL), concurrency=1,
              boot_over=lambda: over[0])

    async def boot() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rig.stream.run)
            while rig.stream.status.requests < 3:
                await trio.sleep(0.01)
            over[0] = True

    trio.run(boot)
    st = rig.stream.status
    assert st.stopped == "boot over" and st.state == "stopped"
    assert 3 <= st.requests <= 4 and st.fetched_chunks < st.planned_chunks
    rig.cache.close()


def test_bandwidth_cap(image: Image, tmp_path: Path) -> None:
    """Each request waits its turn: all the stream sent, but its last request, at `rate`."""
    rate = 8 * MIB
    rig = Rig(image, tmp_path, policy=StreamPolicy(ALL, rate=rate), concurrency=4,
              range_bytes=64 << 10)
    t0 = time.monotonic()
    trio.run(rig.stream.run)
    took = time.monotonic() - t0
    st = rig.stream.status
    assert st.stopped == "done" and st.rate_bytes_per_second == rate
    sent = st.fetched_bytes
    assert sent > rate, "the test image is too small to see the cap"
    assert took >= 0.9 * (sent - 300_000) / rate, (took, sent)
    rig.cache.close()


# -- real mounts ----------------------------------------------------------------------------------

def stream_done(mnt: Any) -> dict:
    return wait_stats(mnt, lambda s: s["prefetch"]["stream"]["state"] in ("stopped", "off"),
                      "the background fetch to stop")


def node_chunks(cache_dir: Path, digests: set[str]) -> set[str]:
    cache = ChunkCache(cache_dir, 1 << 30)
    try:
        ordered = sorted(digests)
        return {d for d, have in zip(ordered, cache.contains_many(ordered), strict=True)
                if have}
    finally:
        cache.close()


def policy_env(mode: str, **more: str) -> dict[str, str]:
    env = {"CASFS_BACKGROUND_FETCH": mode, "CASFS_BACKGROUND_IDLE_CPUS": "0"}
    env.update({f"CASFS_BACKGROUND_{k.upper()}": v for k, v in more.items()})
    return env


FIRST = "usr/share/doc/notes.txt"  # a boot's first read that makes no guesses
ENTRY = f"{SITE}/alpha/__pycache__/core.cpython-311.pyc"  # the boot enters package alpha


@pytest.mark.parametrize("policy", [OFF, LIKELY, ALL])
def test_policy_off_likely_all(mode: str, policy: str, image: Image, tmp_path: Path) -> None:
    """off: nothing streamed; likely: the code and libraries of the package the boot
    entered, nothing of the others, until the boot ends; all: the whole image."""
    m = image.manifest()
    everything = all_chunks(m)
    alpha = digests_of(m, of_package(CODE_FILES + LIBRARY_FILES, "alpha"))
    beta = digests_of(m, of_package(CODE_FILES + LIBRARY_FILES, "beta"))
    with mounted(image.ref, tmp_path / "mnt", image.store_url, tmp_path / "cache",
                 "--no-trace", "--trace-idle", "1", env=policy_env(policy), mode=mode) as mnt:
        wait_stats(mnt, lambda s: s["prefetch"]["state"] == "done", "the trace lookup")
        time.sleep(0.3)
        assert mnt.stats()["metrics"]["prefetch_requests"] == 0, "nothing before the boot"
        read_checked(mnt, image, [ENTRY])
        st = stream_done(mnt)
        stream, mt = st["prefetch"]["stream"], st["metrics"]
        assert stream["mode"] == policy
        assert mt["fetches"] == 1 and mt["read_waits"] == 1, mt  # the first read
        if policy == OFF:
            assert stream["state"] == "off" and st["prefetch"]["stream_requests"] == 0
        else:
            assert stream["stopped"] == ("done" if policy == ALL else "boot over"), stream
            assert stream["fetched_chunks"] > 0 and stream["requests"] > 0
    got = node_chunks(tmp_path / "cache", everything)
    lib = set(chunks_of(m, f"{SITE}/alpha/_ext.cpython-311-x86_64-linux-gnu.so"))
    if policy == OFF:
        assert not got & lib, "the guesses fetch no library nobody read"
    elif policy == LIKELY:
        assert alpha <= got
        assert not got & beta
        assert not got & set(chunks_of(m, "usr/share/big.dat"))
    else:
        assert got == everything


def test_streamed_boot_leaves_a_full_trace(mode: str, tmp_path: Path) -> None:
    """The stream brings the whole image before the process reads a byte; the boot's
    reads are all served from the node, and its trace still lists every file it read,
    so the next boot (another node: an empty cache) replays it instead of streaming."""
    url = f"file://{tmp_path}/store"
    image = make_image(tmp_path, "img", [files_layer(FILES)], url)
    m = image.manifest()
    boot = [f"{PY}/__pycache__/os.cpython-311.pyc", f"{SITE}/beta/__pycache__/core.cpython-311.pyc",
            f"{SITE}/beta/_ext.cpython-311-x86_64-linux-gnu.so", "usr/share/big.dat",
            f"{SITE}/plain/mod.py"]
    with mounted(image.ref, tmp_path / "mnt", url, tmp_path / "cache", "--trace-idle", "4",
                 env=policy_env(ALL), mode=mode) as mnt:
        read_checked(mnt, image, boot[:1])  # the boot begins: the stream starts
        st = stream_done(mnt)
        assert st["prefetch"]["stream"]["stopped"] == "done"
        for p in boot[1:]:
            read_checked(mnt, image, [p])
        st = wait_stats(mnt, lambda s: s["prefetch"]["trace_saved"] != "", "the trace")
        mt = st["metrics"]
        # The stream served every read but the first.
        assert mt["fetches"] == len(chunks_of(m, boot[0])) and mt["read_waits"] == 1, mt
        if mode == "fuse":
            assert st["prefetch"]["stream"]["used_chunks"] == len(digests_of(m, boot[1:]))
    (trace,) = stored_traces(image)
    assert [p for p in dict.fromkeys(c.path for c in trace.chunks)] == ["/" + p for p in boot]
    recorded = {c.digest for c in trace.chunks}
    if mode == "fuse":
        assert recorded == digests_of(m, boot)
    else:  # the kernel read the node's files itself: what fanotify saw of each open
        assert {chunks_of(m, p)[0] for p in boot} <= recorded <= digests_of(m, boot)

    with mounted(image.ref, tmp_path / "mnt2", url, tmp_path / "cache2", "--no-trace",
                 env=policy_env(ALL), mode=mode) as mnt:
        st = wait_stats(mnt, lambda s: s["prefetch"]["state"] in ("done", "failed"), "replay")
        pf = st["prefetch"]
        assert pf["source"] == "manifest" and pf["planned_chunks"] == len(recorded)
        assert pf["stream"]["state"] == "off" and pf["stream"]["stopped"] == "trace replayed"
        read_checked(mnt, image, boot)
        mt = mnt.stats()["metrics"]
        if mode == "fuse":
            assert mt["fetches"] == 0 and mt["prefetch_hits"] == len(recorded), mt


def test_stream_stops_when_the_boot_ends_and_reads_wait(mode: str, image: Image,
                                                        tmp_path: Path) -> None:
    """At 100 kB/s the stream would take minutes; the boot (one file read, then 1 s with
    no read) ends it. The read found its file not yet streamed: it waited, and says so."""
    read = f"{SITE}/gamma/data/table.bin"
    with mounted(image.ref, tmp_path / "mnt", image.store_url, tmp_path / "cache",
                 "--no-trace", "--trace-idle", "1", env=policy_env(ALL, rate="100K"),
                 mode=mode) as mnt:
        read_checked(mnt, image, [FIRST])
        wait_stats(mnt, lambda s: s["prefetch"]["stream"]["state"] == "running", "the stream")
        read_checked(mnt, image, [read])
        st = stream_done(mnt)
        stream, mt = st["prefetch"]["stream"], st["metrics"]
        assert stream["stopped"] == "boot over", stream
        assert stream["fetched_chunks"] < stream["planned_chunks"]
        assert mt["read_waits"] >= 2 and mt["read_wait_seconds"] > 0, mt
        assert stream["rate_bytes_per_second"] == 100 << 10


def test_stream_stops_at_its_cap_on_a_mount(mode: str, image: Image, tmp_path: Path) -> None:
    """The flags, not the environment (which says otherwise), set the policy."""
    with mounted(image.ref, tmp_path / "mnt", image.store_url, tmp_path / "cache",
                 "--no-trace", "--background-fetch", "all", "--background-cap", "200K",
                 env=policy_env(OFF, cap="10M"), mode=mode) as mnt:
        read_checked(mnt, image, [FIRST])
        st = stream_done(mnt)
        stream, mt = st["prefetch"]["stream"], st["metrics"]
        assert stream["stopped"] == "cap" and stream["cap_bytes"] == 200 << 10
        assert 0 < mt["fetched_bytes"] + mt["prefetch_bytes"] <= 200 << 10


@pytest.mark.parametrize("flags", [["--background-fetch", "some"], ["--background-cap", "lots"],
                                   ["--background-rate", "0"]])
def test_bad_background_flags(flags: list[str], image: Image, tmp_path: Path) -> None:
    """A bad setting is refused before anything forks: exit 2, a line naming it, no mount."""
    (tmp_path / "mnt").mkdir()
    r = cli("mount", image.ref, str(tmp_path / "mnt"), "--store", image.store_url,
            "--cache-dir", str(tmp_path / "cache"), "--mode", "fuse", "--no-agent", *flags)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "background" in r.stderr.strip().splitlines()[-1], r.stderr  # argparse: usage first
    assert not os.path.ismount(tmp_path / "mnt")
