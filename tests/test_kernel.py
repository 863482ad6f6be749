"""Kernel serving mode, what only it does (what a mount shows is tested in both modes in
test_mount.py): the choice of mode, boots served by the kernel and still recorded, objects
made whole (after a boot, from a replayed plan), an object evicted under a reader, a file
opened through the view kept readable, one view shared by several mounts."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from casfs.store import open_store
from casfs.testing.ocibuild import Member, directory, file
from indexer.chunking import SMALL_CHUNK as CHUNK
from tests.mounthelp import (
    build_and_index,
    cli,
    drop_file_cache,
    is_mounted,
    mounted,
    process_alive,
    require_mode,
    start_mount,
    unmount_checked,
    wait_gone,
    wait_stats,
)

pytestmark = pytest.mark.fuse
IDLE = "1"  # seconds without a new first access that end a boot


@pytest.fixture(autouse=True)
def _kernel() -> None:
    require_mode("kernel")


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def h(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def url(path: Path) -> str:
    return f"file://{path}"


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


SMALL = {f"app/s{i}": rnd(3000 + i, i) for i in range(6)}
MULTI = {"app/multi": rnd(CHUNK * 3 + 11, 50)}  # several chunks: an object of its own
BIG = {"data/big": rnd(CHUNK * 12 + 5, 60)}
FILES = {**SMALL, **MULTI, **BIG}


def members(files: dict[str, bytes]) -> list[Member]:
    dirs = sorted({p.rsplit("/", 1)[0] for p in files})
    return [*map(directory, dirs), *(file(p, d) for p, d in files.items())]


@pytest.fixture
def image(tmp_path: Path) -> tuple[str, Path]:
    store = tmp_path / "store"
    return build_and_index(tmp_path / "img", [members(FILES)], url(store)), store


def objects_in(cache: Path) -> dict[str, bytes]:
    d = cache / "objects"
    return {f.name: f.read_bytes() for sub in d.iterdir() for f in sub.iterdir()} \
        if d.is_dir() else {}


def delete_traces(store: Path) -> None:
    for p in (store / "traces").rglob("*"):
        if p.is_file():
            p.unlink()


def traces_of(store: Path, ref: str) -> list:
    from prefetch.trace import Trace

    s = open_store(url(store))
    digest = ref.removeprefix("blake3:")
    return [Trace.parse(s.get_trace(digest, t, 64 << 20), t) for t in s.list_traces(digest)]


# -- the choice of mode -------------------------------------------------------------------

def test_auto_mode_serves_in_the_kernel_and_falls_back_for_a_whiteout_device(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    ref, store = image
    with mounted(ref, tmp_path / "mnt", url(store), tmp_path / "cache", mode="auto") as m:
        assert m.mode == "kernel" and m.stats()["mount"]["mode"] == "kernel"
        assert read(m.path("app/s1")) == FILES["app/s1"]
    # overlayfs would hide a 0/0 character device (its whiteout): such an image is
    # served through FUSE in auto mode, and refused in kernel mode, with the reason
    odd = build_and_index(tmp_path / "odd", [[file("a", "x"),
                                              Member("w", "char", mode=0o600, devmajor=0,
                                                     devminor=0)]], url(store))
    with mounted(odd, tmp_path / "mnt2", url(store), tmp_path / "cache", mode="auto") as m:
        assert m.mode == "fuse" and os.path.exists(m.path("w"))
    out = cli("mount", odd, str(tmp_path / "mnt2"), "--store", url(store), "--cache-dir",
              str(tmp_path / "cache"), "--mode", "kernel")
    assert out.returncode == 7 and "0/0" in out.stderr or "whiteout" in out.stderr, out.stderr
    assert not is_mounted(tmp_path / "mnt2")


# -- boots the kernel serves --------------------------------------------------------------

def test_a_warm_boot_is_served_by_the_kernel_and_still_recorded(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    wanted = [*SMALL, "app/multi"]
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--trace-idle", IDLE,
                 mode="kernel") as m:
        for p in wanted:
            assert read(m.path(p)) == FILES[p]
        st = wait_stats(m, lambda s: s["prefetch"]["trace_saved"] != "", "a saved trace")
        # the first file came through the view; its siblings, guessed and fetched while it
        # was read, may already have been on the node when opened
        k = st["kernel"]
        assert k["view_opens"] >= 1 and k["view_opens"] + k["native_opens"] == len(wanted)
    # the unmount made the file of several chunks whole: the next boot needs no daemon
    assert h(FILES["app/multi"]) in {h(d) for d in objects_in(cache).values()}
    delete_traces(store)
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--trace-idle", IDLE,
                 mode="kernel") as m:
        for p in wanted:
            assert read(m.path(p)) == FILES[p]
        st = wait_stats(m, lambda s: s["prefetch"]["trace_saved"] != "", "a saved trace")
        assert st["metrics"]["reads"] == 0  # no byte through the view
        assert st["kernel"]["native_opens"] == len(wanted) and st["kernel"]["view_opens"] == 0
    # the boot was recorded from the opens the kernel served (fanotify)
    (trace,) = traces_of(store, ref)
    assert {c.path.lstrip("/") for c in trace.chunks} == set(wanted)


def test_opens_through_a_stacked_overlay_are_recorded(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    """A container's root is an overlay stacked on the image's mount (casfs run,
    containerd): the kernel opens the image's files for it internally. Those opens are
    seen and recorded as the image's own: a boot run in a container leaves a full trace."""
    ref, store = image
    cache = tmp_path / "cache"
    wanted = [*SMALL, "app/multi"]
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--trace-idle", IDLE,
                 mode="kernel") as m:  # brings every file to the node
        for p in wanted:
            assert read(m.path(p)) == FILES[p]
        wait_stats(m, lambda s: s["prefetch"]["trace_saved"] != "", "a saved trace")
    delete_traces(store)
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--trace-idle", IDLE,
                 mode="kernel") as m:
        top = tmp_path / "container"
        for d in ("upper", "work", "container"):
            (tmp_path / d).mkdir()
        subprocess.run(["mount", "-t", "overlay", "container", "-o",
                        f"lowerdir={m.mountpoint},upperdir={tmp_path / 'upper'},"
                        f"workdir={tmp_path / 'work'}", str(top)], check=True)
        try:
            for p in wanted:
                assert read(top / p) == FILES[p]
            st = wait_stats(m, lambda s: s["prefetch"]["trace_saved"] != "", "a saved trace")
        finally:
            subprocess.run(["umount", str(top)], check=True)
        assert st["metrics"]["reads"] == 0  # all native
        assert st["kernel"]["native_opens"] == len(wanted), st["kernel"]
    (trace,) = traces_of(store, ref)
    assert {c.path.lstrip("/") for c in trace.chunks} == set(wanted)


def test_after_a_boot_the_files_it_read_are_fetched_whole(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    """A big file read in part through the view is fetched whole once the boot is over
    and made an object: the next mount's reads of it never reach casfs."""
    ref, store = image
    cache = tmp_path / "cache"
    big = FILES["data/big"]
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--trace-idle", IDLE,
                 mode="kernel") as m:
        with open(m.path("data/big"), "rb") as f:
            assert f.read(100) == big[:100]
        st = wait_stats(m, lambda s: s["kernel"]["objects_completed"] >= 1,
                        "the big file's object", timeout=30)
        assert st["prefetch"]["trace_saved"]
    assert h(big) in {h(d) for d in objects_in(cache).values()}
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--no-prefetch", "--no-trace",
                 mode="kernel") as m:
        assert read(m.path("data/big")) == big
        assert m.stats()["metrics"]["reads"] == 0


def test_a_replayed_plan_lands_objects_before_the_boot_opens_them(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    ref, store = image
    wanted = [*SMALL, "app/multi"]
    with mounted(ref, tmp_path / "mnt", url(store), tmp_path / "c1", "--trace-idle", IDLE,
                 mode="kernel") as m:
        for p in wanted:
            assert read(m.path(p)) == FILES[p]
        wait_stats(m, lambda s: s["prefetch"]["trace_saved"] != "", "a saved trace")
    # an empty cache: the plan is fetched and made whole before the process opens a file
    with mounted(ref, tmp_path / "mnt", url(store), tmp_path / "c2", "--no-trace",
                 mode="kernel") as m:
        wait_stats(m, lambda s: s["prefetch"]["state"] == "done"
                   and s["kernel"]["objects_completed"] >= 1, "the plan and its objects")
        for p in wanted:
            assert read(m.path(p)) == FILES[p]
        # opens reach the view's counters a moment later (fanotify, read by a thread)
        st = wait_stats(m, lambda s: s["kernel"]["native_opens"] >= len(wanted), "the opens",
                        timeout=10)
        assert st["kernel"]["native_opens"] == len(wanted) and st["metrics"]["reads"] == 0


# -- objects under running processes ----------------------------------------------------------

def test_an_object_evicted_under_a_reader_stays_readable(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    multi = FILES["app/multi"]
    with mounted(ref, tmp_path / "mnt", url(store), cache, mode="kernel"):
        pass  # nothing read yet
    with mounted(ref, tmp_path / "mnt", url(store), cache, mode="kernel") as m:
        assert read(m.path("app/multi")) == multi
    assert objects_in(cache)
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--no-prefetch", "--no-trace",
                 mode="kernel") as m:
        reader = subprocess.Popen(
            [sys.executable, "-c",
             "import sys, time\n"
             "f = open(sys.argv[1], 'rb')\n"
             "print(f.read(10).hex(), flush=True)\n"
             "sys.stdin.readline()\n"
             "f.seek(0); sys.stdout.write(f.read().hex()); sys.stdout.flush()\n",
             str(m.path("app/multi"))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        assert reader.stdout is not None and reader.stdin is not None
        assert bytes.fromhex(reader.stdout.readline().strip()) == multi[:10]
        wait_stats(m, lambda s: s["kernel"]["native_opens"] == 1, "the open", timeout=10)
        # evict everything: the object file is unlinked while the reader holds it open
        pruned = cli("cache", "prune", "--cache-dir", str(cache), "--cache-size", "1",
                     check=True)
        assert "evicted" in pruned.stdout and not objects_in(cache)
        drop_file_cache(m.path("app/multi"))
        out, _ = reader.communicate("go\n", timeout=30)
        assert bytes.fromhex(out) == multi


def test_a_file_opened_through_the_view_stays_readable_after_its_object_completes(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    """overlayfs keeps the data layer a file was first opened from: the view must serve
    an object the node has since made whole."""
    ref, store = image
    cache = tmp_path / "cache"
    big = FILES["data/big"]
    with mounted(ref, tmp_path / "mnt", url(store), cache, "--trace-idle", IDLE,
                 mode="kernel") as m:
        with open(m.path("data/big"), "rb") as f:
            assert f.read(100) == big[:100]  # opened through the view
            wait_stats(m, lambda s: s["kernel"]["objects_completed"] >= 1, "the object")
            drop_file_cache(m.path("data/big"))
            f.seek(0)
            assert f.read() == big
        with open(m.path("data/big"), "rb") as f:  # the same inode: still the view
            assert f.read() == big
        assert m.stats()["metrics"]["io_errors"] == 0


# -- one view, several mounts --------------------------------------------------------------------

def test_one_view_serves_every_kernel_mount_of_the_node(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    a = start_mount(ref, tmp_path / "a", url(store), cache, mode="kernel")
    b = start_mount(ref, tmp_path / "b", url(store), cache, mode="kernel")
    try:
        assert a.pid == b.pid  # the node's view
        assert read(a.path("app/s0")) == read(b.path("app/s0")) == FILES["app/s0"]
        unmount_checked(a)
        assert process_alive(b.pid) and read(b.path("data/big")) == FILES["data/big"]
        unmount_checked(b)
        assert wait_gone(b.pid, 10)
        assert not is_mounted(cache / "view")
    finally:
        for m in (a, b):
            if is_mounted(m.mountpoint):
                subprocess.run(["umount", "-l", str(m.mountpoint)], check=False)


def test_sigterm_to_the_view_takes_its_mounts_down(
        tmp_path: Path, image: tuple[str, Path]) -> None:
    ref, store = image
    cache = tmp_path / "cache"
    a = start_mount(ref, tmp_path / "a", url(store), cache, mode="kernel")
    b = start_mount(ref, tmp_path / "b", url(store), cache, mode="kernel")
    os.kill(a.pid, signal.SIGTERM)
    assert wait_gone(a.pid, 15)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (is_mounted(a.mountpoint) or is_mounted(b.mountpoint)):
        time.sleep(0.05)
    assert not is_mounted(a.mountpoint) and not is_mounted(b.mountpoint)
    assert not is_mounted(cache / "view")
    assert "unmounted" in (cache / "logs" / "view.log").read_text()


# -- warming, kernel mode's way ---------------------------------------------------------------

def test_kernel_warming_reads_ahead_what_the_kernel_serves(tmp_path: Path,
                                                          image: tuple[str, Path]) -> None:
    """A kernel mount's fetcher warms a chunk by asking the kernel to read ahead the file
    it serves the chunk from (the object of a file of several chunks, else the chunk
    file): no hashing, and never a fetch of a chunk the node holds."""
    import trio

    from casfs.cache import ChunkCache
    from casfs.kernel.pagecache import KernelFetcher
    from casfs.manifest import Manifest
    from casfs.manifest.objects import object_name_of
    from casfs.metrics import MountMetrics

    ref, store_path = image
    store = open_store(url(store_path))
    digest = ref.removeprefix("blake3:")
    manifest = Manifest(store.get_manifest(digest), digest)
    cache = ChunkCache(tmp_path / "cache")
    multi = manifest.chunks(manifest.resolve("/app/multi"))
    small = manifest.chunks(manifest.resolve("/app/s0"))[0]
    for c in [*multi, small]:
        cache.insert(c.digest, store.get_blob(c.digest))
    fetcher = KernelFetcher(store, cache, MountMetrics(), manifest=manifest)
    gets = []
    real_get = store.get_blob_compressed
    store.get_blob_compressed = lambda d: gets.append(d) or real_get(d)  # type: ignore[method-assign]

    async def main() -> tuple[int, int, int]:
        # the object is not whole yet: its chunks' files are read ahead (the view's)
        before = await fetcher.warm([c.digest for c in multi])
        ok = cache.complete_object(object_name_of(multi), [(c.digest, c.length) for c in multi])
        assert ok
        after = await fetcher.warm([c.digest for c in multi] + [small.digest])
        await fetcher.prefetch(multi[1].digest, warm=True)  # cached: warmed, not fetched
        return before, after, fetcher.readahead_bytes

    before, after, ahead = trio.run(main)
    assert before == len(multi) and after == len(multi) + 1
    assert ahead >= sum(c.length for c in multi)  # the object's ranges
    assert gets == [] and cache.stats.hits == 0  # nothing fetched, nothing verified
    cache.close()
