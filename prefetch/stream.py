"""The background stream: on a first boot (no trace for the image), use the idle link to
bring the rest of the image into the node cache while the process boots.

After the guesses (prefetch.heuristics) the link sits idle between the serial misses of
a boot nobody recorded yet. The stream fills it: large ranged GETs of the image's
directory packs and single GETs of big chunks, in the order a boot is likely to want
them, each chunk verified and inserted into the node cache like any other (so the next
boot on the node finds it there):

1. **code**: compiled modules (`__pycache__/*.pyc`), package metadata (`*.dist-info`,
   `*.egg-info`, `.pth` files) and the sources of packages that have no `__pycache__`;
2. **libraries**: shared libraries (`*.so`, `*.so.*`) of at most `whole_library_max`
   bytes whole, of bigger ones what the dynamic loader reads (prefetch.elf);
3. **rest**: everything else.

Policy (prefetch.policy.StreamPolicy, per mount): `off`; `likely`: the code and libraries of each
package the boot enters (the top-level package of a file read: `site-packages/torch`, a
package of the standard library, the standard library's own directory), from the
moment it enters it, the most recently entered first; `all`: those first too, then the
whole image, tier by tier; `auto` (the default): `likely` for images, `off` for directory
trees indexed with `casfs index tree:` (model weights: their reader streams them itself
and may read only some). A byte cap (`cap`, default the image's stored size: the mount
as a whole never fetches more than that) and a bandwidth cap (`rate`, bytes per second
of the stream's own requests; default none).

The stream always stays behind the process: it starts once the boot has begun (its first
read, and `grace` seconds for the guesses that read made to be under way), it goes
through the fetcher as prefetch (its own limiter below reads'; a read of a chunk the
stream is fetching joins that fetch), a few requests at a time, skipping chunks already
on the node or being fetched. It stops
when the boot ends (the recorder's idle rule: `--trace-idle` seconds with no read in
flight and no new first access), when the cap is reached, near the cache's size cap, or
at unmount, whichever comes first.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import trio

from casfs.errors import CasfsError
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.manifest.reader import ChunkRef
from casfs.packindex import PackIndex
from casfs.ranges import PackedChunk, PackLocation, PackRange, ranges_of
from casfs.store.content import stored_bound
from prefetch.elf import parse_headers
from prefetch.policy import ALL, OFF, StreamPolicy

log = logging.getLogger(__name__)

ROOM_SHARE = 0.85  # as replay: stop once the cache holds this share of its cap
CODE, LIBRARIES, REST = 0, 1, 2
TIER_NAMES = ("code", "libraries", "rest")
PYCACHE = b"__pycache__"
METADATA_DIRS = (b".dist-info", b".egg-info")
SITE_DIRS = (b"site-packages", b"dist-packages")


# -- planning -------------------------------------------------------------------------------

@dataclass
class Item:
    """One chunk to stream: where a directory pack holds it (else a GET of its own)."""

    digest: str
    length: int  # uncompressed
    location: PackLocation | None
    focus: int  # index into StreamPlan.roots: the package it belongs to (-1: none)
    depth: int = 0  # of its file's directory below the package's (depth_below)


@dataclass
class StreamPlan:
    tiers: list[list[Item]] = field(default_factory=lambda: [[], [], []])
    # root (or -1) -> inodes of its libraries too big to take whole: loader parts only
    big_libraries: dict[int, list[int]] = field(default_factory=dict)
    roots: list[bytes] = field(default_factory=list)  # package directories, for focus
    root_of_dir: dict[int, int] = field(default_factory=dict)  # directory ino -> root
    stored_bytes: int = 0  # the image's unique chunks: stored size where packs say it,
    chunks: int = 0  # else their uncompressed size (an upper bound)

    def planned(self, tiers: int) -> tuple[int, int]:
        """(chunks, bytes as stored where known) of the first `tiers` tiers."""
        items = [it for tier in self.tiers[:tiers] for it in tier]
        return len(items), sum(_stored(it) for it in items)


def _stored(item: Item) -> int:
    """Its stored size where a pack says it, else the most it can be."""
    return item.location.length if item.location is not None else stored_bound(item.length)


def _is_library(name: bytes) -> bool:
    return name.endswith(b".so") or b".so." in name


def build_plan(manifest: Manifest, packs: Mapping[str, tuple[str, int, int]], mode: str,
               whole_library_max: int = 64 << 20) -> StreamPlan:
    """Every chunk of the image in streaming order (tiers as in the module docstring;
    for `likely` only the code and libraries of packages). Blocking: walks the manifest
    (~0.3 s for 27k files). Packed chunks in each tier are in pack order (a directory's
    files lie together), the others in the walk's order."""
    plan = StreamPlan()
    for _ in plan_steps(plan, manifest, packs, mode, whole_library_max):
        pass
    return plan


def plan_steps(plan: StreamPlan, manifest: Manifest, packs: Mapping[str, tuple[str, int, int]],
               mode: str, whole_library_max: int = 64 << 20,
               files_per_step: int = 256) -> Iterator[None]:
    """build_plan, a step at a time: fills `plan`, yielding after every
    `files_per_step` files (so that it can run on the event loop between requests)."""
    seen: set[str] = set()
    pack_rank: dict[str, int] = {}
    for where in packs.values():  # layer order: the base layer's packs first
        pack_rank.setdefault(where[0], len(pack_rank))
    root_index: dict[bytes, int] = {}
    has_pycache: dict[int, bool] = {}
    big = False

    dir_roots: dict[int, tuple[int, int]] = {}  # directory -> (root, depth), once each

    def root_for(path: bytes, parent: int) -> tuple[int, int]:
        known = dir_roots.get(parent)
        if known is not None:
            return known
        root = package_root(path)
        if root is None:
            dir_roots[parent] = (-1, 0)
            return -1, 0
        idx = root_index.get(root)
        if idx is None:
            idx = root_index[root] = len(plan.roots)
            plan.roots.append(root)
        plan.root_of_dir[parent] = idx
        dir_roots[parent] = (idx, depth_below(path, root))
        return dir_roots[parent]

    files = 0
    for path, ino in manifest.walk():
        node = manifest.inode(ino)
        if not stat.S_ISREG(node.mode) or node.size == 0:
            continue
        files += 1
        if files % files_per_step == 0:
            yield
        slash = path.rfind(b"/")
        name, dirpath = path[slash + 1 :], path[:slash]
        dirname = dirpath[dirpath.rfind(b"/") + 1 :]
        if dirname == PYCACHE:
            tier = CODE if name.endswith(b".pyc") else REST
        elif dirname.endswith(METADATA_DIRS) or name.endswith(b".pth"):
            tier = CODE
        elif name.endswith(b".py"):
            parent = node.parent
            if parent not in has_pycache:
                has_pycache[parent] = bool(manifest.lookup(parent, PYCACHE))
            tier = REST if has_pycache[parent] else CODE
        elif _is_library(name):
            tier = LIBRARIES
            if node.size > whole_library_max:
                big = True
                tier = REST
        else:
            tier = REST
        focus, depth = root_for(path, node.parent)
        if big:
            plan.big_libraries.setdefault(focus, []).append(ino)
            big = False
        for c in manifest.chunks(ino):
            if c.digest in seen:
                continue
            seen.add(c.digest)
            loc = packs.get(c.digest)
            item = Item(c.digest, c.length, PackLocation(*loc) if loc else None, focus, depth)
            plan.stored_bytes += _stored(item)
            plan.chunks += 1
            if mode == ALL or (tier != REST and focus >= 0):
                plan.tiers[tier].append(item)
    for items in plan.tiers:  # packed items in pack order, then the others as walked
        items.sort(key=lambda it: (0, pack_rank[it.location.pack], it.location.offset)
                  if it.location is not None else (1, 0, 0))


def package_root(path: bytes) -> bytes | None:
    """The package a file belongs to, as a directory: `.../site-packages/torch` for
    `.../site-packages/torch/nn/__pycache__/x.pyc` (and for the libraries a wheel
    vendors beside it, `.../site-packages/torch.libs/...`); `.../site-packages` itself
    for modules right in it; the interpreter's standard library as a whole
    (`.../lib/python3.11`, with its extension modules in `lib-dynload`), which every
    Python boot enters first. None for anything else."""
    parts = path.split(b"/")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in SITE_DIRS:
            if i + 2 >= len(parts) or parts[i + 1] == PYCACHE:
                return b"/".join(parts[: i + 1])
            return b"/".join(parts[: i + 1] + [parts[i + 1].removesuffix(b".libs")])
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].startswith((b"python3", b"python2")) and parts[i - 1] == b"lib":
            return b"/".join(parts[: i + 1])
    return None


def depth_below(path: bytes, root: bytes) -> int:
    """How deep a file's directory lies below its package's (a module's `__pycache__`
    counts as its directory): a package's own modules are imported before its
    subpackages', and those before theirs."""
    rel = path[len(root) + 1 :].split(b"/")[:-1]
    return len(rel) - (1 if rel and rel[-1] == PYCACHE else 0)


# -- streaming ------------------------------------------------------------------------------

@dataclass
class StreamStatus:
    mode: str = OFF
    state: str = "waiting"  # waiting (for the trace lookup, then the boot's first read),
    # planning, running, stopped, off
    stopped: str = ""  # why: done, boot over, cap, cache cap, failed, unmounted,
    # trace replayed (off: this image has a trace)
    tier: str = ""  # the tier being streamed
    planned_chunks: int = 0
    planned_bytes: int = 0  # stored bytes where known (directory packs), else uncompressed
    image_stored_bytes: int = 0  # the same measure over the whole image
    cap_bytes: int = 0
    rate_bytes_per_second: int = 0
    requests: int = 0
    fetched_chunks: int = 0
    fetched_bytes: int = 0  # as planned_bytes
    skipped_chunks: int = 0  # planned, but on the node or being fetched already
    used_chunks: int = 0  # chunks it fetched that the boot then read
    used_bytes: int = 0
    focus_switches: int = 0
    cpu_waits: int = 0  # times a request waited for an idle CPU
    plan_seconds: float = 0.0
    seconds: float = 0.0  # from its first request to its stop

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class IdleCpu:
    """How many of the node's CPUs were idle lately, from /proc/stat (the stream runs
    on idle CPU as on an idle link: on a node with cores to spare it runs flat out, on
    a busy one it waits while the boot computes). None where /proc/stat is not."""

    def __init__(self, path: str = "/proc/stat", interval: float = 0.02) -> None:
        self.path = path
        self.interval = interval
        self.cpus = os.cpu_count() or 1
        self._last: tuple[float, int, int] | None = None  # (when, idle, total) ticks
        self._idle: float | None = None

    def _sample(self) -> tuple[int, int] | None:
        try:
            with open(self.path, "rb") as f:
                fields = f.readline().split()[1:]
        except OSError:
            return None
        ticks = [int(x) for x in fields[:8]]
        if len(ticks) < 5:
            return None
        return ticks[3] + ticks[4], sum(ticks)  # idle + iowait, all

    def idle_cpus(self) -> float | None:
        """Idle CPUs (0..cpus) since the previous call at least `interval` ago."""
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval:
            return self._idle
        sample = self._sample()
        if sample is None:
            return None
        if self._last is not None:
            d_idle, d_total = sample[0] - self._last[1], sample[1] - self._last[2]
            if d_total > 0:
                self._idle = self.cpus * d_idle / d_total
        self._last = (now, *sample)
        return self._idle


class BackgroundStream:
    """Streams the plan's tiers into the cache; see the module docstring.

    Requests: a ranged GET starts at the next chunk to stream and takes in what follows
    it in its pack, up to `range_bytes`: chunks of the tier being streamed (or an
    earlier one), and the chunks between them when they add at most `max_gap` bytes
    (those are inserted too: every byte fetched is verified and kept). It ends before
    any chunk that is on the node, being fetched or already taken, so no byte crosses
    the network twice."""

    def __init__(self, manifest: Manifest, fetcher: Fetcher, packs: PackIndex, *,
                 policy: StreamPolicy, boot_over: Callable[[], bool],
                 concurrency: int = 16, in_flight_bytes: int = 8 << 20,
                 range_bytes: int = 4 << 20, max_gap: int = 64 << 10,
                 batch: int = 64, whole_library_max: int = 64 << 20,
                 grace: float = 0.1, min_idle_cpus: float | None = None,
                 idle_cpu: IdleCpu | None = None) -> None:
        self.manifest = manifest
        self.fetcher = fetcher
        self.packs = packs
        self.policy = policy
        self.boot_over = boot_over
        self.concurrency = concurrency
        self.range_bytes = range_bytes
        self.max_gap = max_gap
        self.batch = batch
        self.whole_library_max = whole_library_max
        self.grace = grace
        self.in_flight_bytes = in_flight_bytes
        self.min_idle_cpus = policy.idle_cpus if min_idle_cpus is None else min_idle_cpus
        self.idle_cpu = idle_cpu or IdleCpu()
        self.booting = trio.Event()  # set by the boot's first read
        self.status = StreamStatus(mode=policy.mode_for(manifest.meta))
        self.plan: StreamPlan | None = None
        self.fetched: dict[str, int] = {}  # digest -> bytes counted, of what it fetched
        self._used: set[str] = set()
        self._tier_of: dict[str, int] = {}  # every chunk of the mode's tiers: its tier
        self._root_of: dict[str, int] = {}  # and its package
        self._tier = CODE  # the tier being streamed
        self._taken: set[str] = set()  # chunks handed out by _take (in order)
        self._claimed: set[str] = set()  # chunks put in a request, or skipped
        self._early: list[int] = []  # directories read from before the plan was made
        self._roots: list[int] = []  # packages entered, most recent last
        self._moved = False  # the boot entered a package since the stream last looked
        self._loaders: set[int] = set()  # packages whose big libraries were looked at
        self._turn: dict[int, int] = {}  # package -> batches taken (libraries, code in turn)
        self._nursery: trio.Nursery | None = None
        self._slots: trio.Semaphore | None = None  # requests in flight (made by run())
        self._cursor: dict[tuple[int, int], int] = {}  # (tier, root or -2) -> next index
        self._by_root: dict[tuple[int, int], list[int]] = {}  # (tier, root) -> item indices
        # pack -> its chunks of this image as (offset, stored length, digest), by offset
        self._entries: dict[str, list[PackedChunk]] = {}
        self._pos: dict[str, int] = {}  # digest -> index in its pack's entries
        self._lengths: dict[str, int] = {}  # chunks requested on their own: their size
        self._sent = 0  # bytes of the requests started
        self._in_flight = 0  # of those, not yet answered (for the cap)
        self._t0 = 0.0  # time.monotonic() at the first request
        self._paced_from = 0.0  # trio.current_time() then

    @property
    def mode(self) -> str:
        return self.status.mode

    # -- observing the boot ------------------------------------------------------------

    def on_read(self, ino: int, chunks: list[ChunkRef]) -> None:
        """A read of file ino (on the trio thread): count what the stream brought, and
        move the focus to the file's package."""
        if not self.booting.is_set():
            self.booting.set()
        for c in chunks:
            got = self.fetched.get(c.digest)
            if got is not None and c.digest not in self._used:
                self._used.add(c.digest)
                self.status.used_chunks += 1
                self.status.used_bytes += got
        parent = self.manifest.inode(ino).parent
        if self.plan is None:
            if not self._early or self._early[-1] != parent:
                self._early.append(parent)
                del self._early[:-64]
            return
        self._enter(self.plan.root_of_dir.get(parent, -1))

    def _enter(self, root: int) -> None:
        """The boot reads from package `root`: it goes first."""
        if root < 0 or (self._roots and self._roots[-1] == root):
            return
        if root in self._roots:
            self._roots.remove(root)
        self._roots.append(root)
        self._moved = True
        self.status.focus_switches += 1

    # -- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Plan, then stream until done or stopped. Never raises but cancellation
        (CasfsError and OSError end it as `failed`, logged)."""
        st = self.status
        if st.mode == OFF:
            return
        # Planned at once, on the event loop a slice at a time between requests (a
        # thread walking the manifest would hold the GIL against the mount getting
        # ready and the boot's first reads); nothing is fetched before the boot's
        # first read (a mount nobody reads costs no request).
        st.state = "planning"
        t = time.monotonic()
        plan = StreamPlan()
        try:
            for _ in plan_steps(plan, self.manifest, self.packs.locations, st.mode,
                                self.whole_library_max):
                await trio.sleep(0)
            await trio.to_thread.run_sync(self._index, plan)
        except (CasfsError, OSError) as exc:
            self._stop("failed")
            st.state = "stopped"
            log.warning("background fetch: no plan: %s", exc)
            return
        st.plan_seconds = round(time.monotonic() - t, 3)
        self.plan = plan
        for directory in self._early:
            self._enter(plan.root_of_dir.get(directory, -1))
        self._early.clear()
        tiers = 3 if st.mode == ALL else 2
        st.planned_chunks, st.planned_bytes = plan.planned(tiers)
        st.image_stored_bytes = plan.stored_bytes
        st.cap_bytes = self.policy.cap if self.policy.cap is not None else plan.stored_bytes
        st.rate_bytes_per_second = self.policy.rate or 0
        st.state = "waiting"
        await self.booting.wait()
        await trio.sleep(self.grace)  # the first reads' guesses go first
        st.state = "running"
        self._t0 = time.monotonic()
        self._paced_from = trio.current_time()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._slots = trio.Semaphore(self.concurrency)
                await self._stream()
        except (CasfsError, OSError) as exc:
            log.warning("background fetch stopped: %s", exc)
            self._stop("failed")
        finally:
            st.state = "stopped"
            if not st.stopped:
                st.stopped = "unmounted"
            st.seconds = round(time.monotonic() - self._t0, 3)
        log.info("background fetch (%s) %s after %.1fs: %d chunks, %d bytes fetched, %d of "
                 "them read by the boot", st.mode, st.stopped, st.seconds, st.fetched_chunks,
                 st.fetched_bytes, st.used_chunks)

    def _index(self, plan: StreamPlan) -> None:
        """Lookups over the plan (blocking, in a thread with the planning)."""
        tiers = 3 if self.status.mode == ALL else 2
        for tier, items in enumerate(plan.tiers[:tiers]):
            for i, it in enumerate(items):
                self._by_root.setdefault((tier, it.focus), []).append(i)
                self._tier_of[it.digest] = tier
                self._root_of[it.digest] = it.focus
            depth = [it.depth for it in items]
            for (t, _), indices in self._by_root.items():
                if t == tier:  # within a package: shallow directories first
                    indices.sort(key=lambda i: (depth[i], i))
        by_pack: dict[str, list[PackedChunk]] = {}
        for digest, (pack, offset, length) in self.packs.locations.items():
            by_pack.setdefault(pack, []).append(PackedChunk(digest, offset, length))
        for pack, entries in by_pack.items():
            entries.sort(key=lambda e: e.offset)
            self._entries[pack] = entries
            for i, e in enumerate(entries):
                self._pos[e.digest] = i

    def _stop(self, why: str) -> None:
        if not self.status.stopped:
            self.status.stopped = why
            log.info("background fetch stopping: %s", why)

    async def _should_stop(self, size: int, group: PackRange | str | None = None) -> bool:
        """Whether to stop before a request of `size` bytes (waits out the rate cap)."""
        if self.status.stopped:
            return True
        if self.boot_over():
            self._stop("boot over")
            return True
        if self._over_cap(size) and (group is None or await self._still_wanted(group)):
            # Requests in flight may be counted twice here (the fetcher counts their
            # bytes on arrival, before they are stored): let them finish, then look again.
            while self._in_flight:
                await trio.sleep(0.01)
            if self._over_cap(size):
                self._stop("cap")
                return True
        if self.policy.rate:
            await trio.sleep_until(self._paced_from + self._sent / self.policy.rate)
            if self.boot_over():
                self._stop("boot over")
                return True
        while self._in_flight and self._in_flight + size > self.in_flight_bytes:
            await trio.sleep(0.005)  # bytes in flight bound memory and the burst
        if self.min_idle_cpus > 0:
            while (idle := self.idle_cpu.idle_cpus()) is not None and \
                    idle < self.min_idle_cpus:
                self.status.cpu_waits += 1
                await trio.sleep(self.idle_cpu.interval)
                if self.boot_over():
                    self._stop("boot over")
                    return True
        if not await self.fetcher.room_left(ROOM_SHARE):
            self._stop("cache cap")
            return True
        self._sent += size
        self._in_flight += size
        return False

    def _next_batch(self) -> tuple[list[Item], int]:
        """Up to `batch` items not yet taken, and their tier: of the package entered
        most recently that has any left, its libraries (the big ones' loader parts) and
        its code in turn; with `all`, then the image tier by tier."""
        assert self.plan is not None
        tiers = self.plan.tiers
        for root in reversed(self._roots):
            # A package loads its extension modules and their libraries early in its
            # import, and its modules' code all along: a batch of each in turn.
            self._start_loader_parts(root)
            turn = self._turn.get(root, 0)
            self._turn[root] = turn + 1
            for tier in ((LIBRARIES, CODE) if turn % 2 == 0 else (CODE, LIBRARIES)):
                out = self._take(tier, tiers[tier], root)
                if out:
                    return out, tier
        if self.mode == ALL:
            for tier in (CODE, LIBRARIES, REST):
                if tier == LIBRARIES:
                    for root in self.plan.big_libraries:
                        self._start_loader_parts(root)
                out = self._take(tier, tiers[tier], None)
                if out:
                    return out, tier
        return [], -1

    def _take(self, tier: int, items: list[Item], root: int | None) -> list[Item]:
        key = (tier, -2 if root is None else root)
        indices = self._by_root.get((tier, root)) if root is not None else None
        if root is not None and indices is None:
            return []
        pos = self._cursor.get(key, 0)
        n = len(indices) if indices is not None else len(items)
        out: list[Item] = []
        while pos < n and len(out) < self.batch:
            it = items[indices[pos] if indices is not None else pos]
            pos += 1
            if it.digest not in self._taken and it.digest not in self._claimed:
                self._taken.add(it.digest)
                out.append(it)
        self._cursor[key] = pos
        return out

    async def _stream(self) -> None:
        """Stream batches as requests free up, until there is nothing left (`all`) or
        the stream stops (`likely` waits for the boot to enter another package)."""
        assert self._nursery is not None and self._slots is not None
        st, slots = self.status, self._slots
        while True:
            await slots.acquire()  # choose once a request can start (the focus moves)
            self._moved = False
            batch, tier = self._next_batch()
            if not batch:
                slots.release()
                if self.mode == ALL:
                    while self._in_flight:  # the loader parts' requests
                        await trio.sleep(0.05)
                    self._stop("done")
                    return
                st.state = "idle"
                while not self._moved:
                    if self.status.stopped:
                        return
                    if self.boot_over():
                        self._stop("boot over")
                        return
                    await trio.sleep(0.05)
                st.state = "running"
                continue
            self._tier = tier
            st.tier = TIER_NAMES[tier]
            groups = await self._requests(batch)
            if not groups:
                slots.release()
                continue
            for i, (group, size) in enumerate(groups):
                if i:
                    await slots.acquire()
                if await self._should_stop(size, group):
                    slots.release()
                    return
                self._nursery.start_soon(self._fetch, group, size, slots)

    def _start_loader_parts(self, root: int) -> None:
        """Fetch the loader parts of a package's big libraries (once per package)."""
        assert self.plan is not None and self._nursery is not None and self._slots is not None
        if root in self._loaders:
            return
        self._loaders.add(root)
        inos = self.plan.big_libraries.get(root)
        if inos:
            self._nursery.start_soon(self._loader_parts, inos, self._nursery, self._slots)

    def _over_cap(self, size: int) -> bool:
        """Whether a request of `size` more bytes could take the mount past the cap
        (the requests in flight counted at the most they can bring)."""
        m = self.fetcher.metrics
        return m.fetched_bytes + m.prefetch_bytes + self._in_flight + size > \
            self.status.cap_bytes

    async def _still_wanted(self, group: PackRange | str) -> bool:
        """Whether a request chosen a while ago still has anything to fetch (reads may
        have fetched its chunks meanwhile: then it costs nothing)."""
        digests = [group] if isinstance(group, str) else [it.digest for it in group.items]
        present = await self.fetcher.present(digests)
        return not all(have or self.fetcher.in_flight(d)
                       for d, have in zip(digests, present, strict=True))

    def _window(self, loc: PackLocation, digest: str) -> list[PackedChunk]:
        """The image's chunks in this pack from this one on, within range_bytes."""
        entries = self._entries.get(loc.pack)
        i = self._pos.get(digest)
        if entries is None or i is None or entries[i].digest != digest:
            return [PackedChunk(digest, loc.offset, loc.length)]
        out: list[PackedChunk] = []
        for e in entries[i:]:
            if out and e.offset + e.length - loc.offset > self.range_bytes:
                break
            out.append(e)
        return out

    def _planned_now(self, digest: str) -> bool:
        """Whether a chunk is one the stream would take now: of the tier being streamed
        or an earlier one, and (`likely`) of a package the boot entered."""
        if self._tier_of.get(digest, REST + 1) > self._tier:
            return False
        return self.mode == ALL or self._root_of.get(digest, -1) in self._roots

    async def _requests(self, batch: list[Item]) -> list[tuple[PackRange | str, int]]:
        """The requests for a batch of items: (a pack range or a digest, stored bytes).
        Items on the node or in flight are skipped."""
        windows = {it.digest: self._window(it.location, it.digest)
                   for it in batch if it.location is not None}
        asked = list(dict.fromkeys([it.digest for it in batch] +
                                   [e.digest for w in windows.values() for e in w]))
        have = dict(zip(asked, await self.fetcher.present(asked), strict=True))

        def free(digest: str) -> bool:
            return not (have.get(digest) or self.fetcher.in_flight(digest)
                        or digest in self._claimed)

        out: list[tuple[PackRange | str, int]] = []
        for it in batch:
            if not free(it.digest):
                if it.digest not in self._claimed:
                    self._claimed.add(it.digest)
                    self.status.skipped_chunks += 1
                continue
            self._claimed.add(it.digest)
            if it.location is None:
                self._lengths[it.digest] = it.length
                out.append((it.digest, stored_bound(it.length)))
                continue
            window = windows[it.digest]
            run = [window[0]]
            end = window[0].offset + window[0].length
            pending: list[PackedChunk] = []
            gap = 0  # bytes of unplanned chunks and holes since the run's end
            for e in window[1:]:
                hole = e.offset - end
                if hole < 0 or not free(e.digest):
                    break
                if self._planned_now(e.digest):
                    if gap + hole > self.max_gap:
                        break
                    run += pending
                    run.append(e)
                    pending, gap = [], 0
                else:
                    gap += hole + e.length
                    if gap > self.max_gap:
                        break
                    pending.append(e)
                end = e.offset + e.length
            for e in run[1:]:
                self._claimed.add(e.digest)
            pr = PackRange(it.location.pack, run)
            out.append((pr, pr.length))
        return out

    async def _fetch(self, group: PackRange | str, size: int, slots: trio.Semaphore) -> None:
        st = self.status
        try:
            st.requests += 1
            if isinstance(group, str):
                await self.fetcher.prefetch(group)
                got = [(group, self._length(group))]
            else:
                await self.fetcher.get_pack_range(group)
                got = [(it.digest, it.length) for it in group.items]
            for digest, n in got:
                if digest not in self.fetched:
                    self.fetched[digest] = n
                    st.fetched_chunks += 1
                    st.fetched_bytes += n
        except CasfsError as exc:
            log.debug("background fetch request failed: %s", exc)
        finally:
            self._in_flight -= size
            slots.release()

    def _length(self, digest: str) -> int:
        """Bytes counted for a chunk fetched on its own: the most its stored form can
        be (the fetcher alone sees its real size)."""
        return stored_bound(self._lengths.pop(digest, 0))

    async def _loader_parts(self, inos: Iterable[int], nursery: trio.Nursery,
                            slots: trio.Semaphore) -> None:
        """What the dynamic loader reads of each big library (its headers first)."""
        for ino in inos:
            if self.status.stopped:
                return
            try:
                parts = await self._library_parts(ino)
            except (CasfsError, OSError) as exc:
                log.debug("background fetch: no loader parts for inode %d: %s", ino, exc)
                continue
            for c in parts:
                if c.digest in self._claimed or self.fetcher.in_flight(c.digest):
                    continue
                self._claimed.add(c.digest)
                self._lengths[c.digest] = c.length
                await slots.acquire()
                size = stored_bound(c.length)
                if await self._should_stop(size, c.digest):
                    slots.release()
                    return
                self.status.planned_chunks += 1
                self.status.planned_bytes += size
                nursery.start_soon(self._fetch, c.digest, size, slots)

    async def _library_parts(self, ino: int) -> list[ChunkRef]:
        size = self.manifest.inode(ino).size
        layout = parse_headers(await self._file_bytes(ino, 0, 4096), size)
        if layout is None:
            return []
        out: list[ChunkRef] = []
        for offset, length in layout.writable():
            out += self.manifest.chunks_for_range(ino, offset,
                                                  min(length, self.whole_library_max))
        if layout.dynamic is not None:
            tables = layout.tables(await self._file_bytes(ino, *layout.dynamic))
            if tables is not None:
                out += self.manifest.chunks_for_range(
                    ino, tables[0], min(tables[1], self.whole_library_max))
        return out

    async def _file_bytes(self, ino: int, offset: int, length: int) -> bytes:
        end = min(offset + length, self.manifest.inode(ino).size)
        chunks = self.manifest.chunks_for_range(ino, offset, length)
        return bytes(await self.fetcher.read(ranges_of(chunks, offset, end), prefetch=True))
