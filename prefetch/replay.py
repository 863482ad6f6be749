"""Replaying earlier boots: fetch what they touched, in their order, before the
process asks for it.

At mount the prefetcher loads this manifest's most recent traces (or, when it has
none, traces of other images that share its layers: chunk digests are the same
across images, so what another image's boot read is what this one will read
where they share files), merges them (prefetch.trace.merge), keeps the chunks
this manifest holds, and fetches them in order with a few large requests in
flight: ranged GETs of up to `range_bytes` over the packs that hold them, and
single blob GETs for the rest. It stops when the cache is nearly at its cap, so
it never evicts what the boot is using. Reads always go first: prefetch runs
under its own limiter and a read joins a prefetch already fetching its chunk.

Knobs (docs/operations.md): `--no-prefetch`; traces merged (`max_traces`, 8);
the share of boots a chunk needs to be kept (`min_share`, 0.5); requests in
flight (`concurrency`, 8); ranged GET size (`range_bytes`, 4 MiB); gap bridged
inside a range (`max_gap`, 1 MiB).
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field

import trio

from casfs.errors import CasfsError
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.packindex import PackIndex
from casfs.ranges import PackLocation, PackRange, merge_pack_runs
from casfs.store import Store
from prefetch.trace import MAX_TRACE_BYTES, PlanItem, Trace, TraceError, merge

log = logging.getLogger(__name__)
ROOM_SHARE = 0.85  # prefetch stops once the cache holds this share of its cap


@dataclass
class PrefetchStatus:
    state: str = "idle"  # idle, loading, running, done, failed, off
    traces: int = 0
    source: str = ""  # "manifest", "shared layers" or ""
    planned_chunks: int = 0
    planned_bytes: int = 0
    done_chunks: int = 0
    groups: int = 0
    rejected_traces: int = 0
    stopped_at_cap: bool = False
    local_chunks: int = 0  # planned chunks already in the node's cache
    warmed_chunks: int = 0  # of those, verified and brought into the page cache ahead
    # digest -> (pack, offset, stored length), from the newest trace packing it
    packed_digests: dict[str, tuple[str, int, int]] = field(default_factory=dict, repr=False)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("packed_digests")
        return d


def load_traces(store: Store, manifest: Manifest, status: PrefetchStatus,
                max_traces: int = 8) -> list[Trace]:
    """This manifest's newest traces, else those of images sharing its layers. Blocking."""
    refs = [(manifest.digest, t) for t in store.list_traces(manifest.digest)][-max_traces:]
    status.source = "manifest" if refs else ""
    if not refs:
        found: dict[tuple[str, str], int] = {}
        for layer in manifest.meta.get("layers", []):
            digest = layer.get("digest", "")
            if digest:
                for ref in store.list_layer_traces(digest):
                    found[ref] = found.get(ref, 0) + 1
        # Prefer traces of the images sharing the most layers, then the newest.
        refs = sorted(found, key=lambda r: (found[r], r[1]))[-max_traces:]
        status.source = "shared layers" if refs else ""
    traces = []
    ours: frozenset[str] | None = None
    for m, t in refs:
        try:
            try:
                data = store.get_trace(m, t, MAX_TRACE_BYTES)
            except MemoryError:
                # A zstd frame header declaring an absurd size: zstandard allocates
                # what the header declares before it looks at the limit.
                raise TraceError(f"trace {t} declares an absurd decompressed size") from None
            trace = Trace.parse(data, t)
            if trace.manifest != m:
                raise TraceError(f"trace {t} names manifest {trace.manifest}, stored under {m}")
            if m == manifest.digest:
                # Recorded from this manifest: every chunk must be one of its chunks.
                if ours is None:
                    ours = manifest.chunk_digests()
                unknown = sum(1 for c in trace.chunks if c.digest not in ours)
                if unknown:
                    raise TraceError(f"trace {t}: {unknown} chunks are not in the manifest")
                bad = sorted(p for p in {c.path for c in trace.chunks}
                             if not _names_a_file(manifest, p))
                if bad:
                    raise TraceError(f"trace {t}: {len(bad)} paths are not files of the "
                                     f"manifest (first {bad[0][:200]!r})")
            traces.append(trace)
        except (TraceError, CasfsError) as exc:
            status.rejected_traces += 1
            log.warning("ignoring trace %s of %s: %s", t, m, exc)
    return traces


def _names_a_file(manifest: Manifest, path: str) -> bool:
    """Whether a trace's path is a regular file of the manifest (or the recorder's
    "<inode N>" stand-in for a file it could not name)."""
    if path.startswith("<inode ") and path.endswith(">"):
        return True
    try:
        ino = manifest.resolve(path)
    except (UnicodeError, ValueError):
        return False
    return bool(ino) and stat.S_ISREG(manifest.inode(ino).mode)


def packed_locations(traces: list[Trace]) -> dict[str, tuple[str, int, int]]:
    """digest -> (pack, offset, stored length) of every packed chunk, the newest
    trace's location winning (traces come oldest first)."""
    out: dict[str, tuple[str, int, int]] = {}
    for t in traces:
        if t.pack:
            out.update((c.digest, (t.pack, c.pack_offset, c.pack_length))
                       for c in t.chunks if c.pack_offset >= 0)
    return out


def plan_groups(plan: list[PlanItem], range_bytes: int, max_gap: int,
                packed: Mapping[str, tuple[str, int, int]] | None = None) -> list[PackRange | str]:
    """The plan as requests, in its order: runs of chunks in one pack become ranged
    GETs (PackRange), the others single blob GETs (their digest). A chunk no trace
    packed is taken from its directory pack (`packed`) if any."""

    def located(item: PlanItem) -> PackLocation | None:
        if item.locations:
            return PackLocation(*item.locations[-1])  # the newest boot's pack
        if packed and item.digest in packed:
            return PackLocation(*packed[item.digest])
        return None

    return merge_pack_runs(((it.digest, located(it)) for it in plan), max_gap=max_gap,
                           range_bytes=range_bytes)


class Prefetcher:
    def __init__(self, store: Store, manifest: Manifest, fetcher: Fetcher, *,
                 packs: PackIndex | None = None,
                 concurrency: int = 8, range_bytes: int = 4 << 20, max_gap: int = 1 << 20,
                 min_share: float = 0.5, max_traces: int = 8, warm_batch: int = 8,
                 warm_concurrency: int = 3) -> None:
        self.store = store
        self.manifest = manifest
        self.fetcher = fetcher
        self.packs = packs  # loaded here, shared with the heuristics
        self.concurrency = concurrency
        self.range_bytes = range_bytes
        self.max_gap = max_gap
        self.min_share = min_share
        self.max_traces = max_traces
        self.warm_batch = warm_batch
        self.warm_concurrency = warm_concurrency
        self.status = PrefetchStatus()
        self.planned: set[str] = set()  # every chunk of the plan (read by the heuristics)

    async def run(self) -> None:
        self.status.state = "loading"
        try:
            traces: list[Trace] = []
            failed: list[CasfsError | OSError] = []

            # Each task keeps its own errors: a nursery would wrap them in an
            # ExceptionGroup (trio >= 0.25), which no `except` below catches.
            async def get_traces() -> None:
                nonlocal traces
                try:
                    traces = await trio.to_thread.run_sync(
                        load_traces, self.store, self.manifest, self.status, self.max_traces
                    )
                except (CasfsError, OSError) as exc:
                    failed.append(exc)

            async with trio.open_nursery() as nursery:  # both before the first reads
                nursery.start_soon(get_traces)
                if self.packs is not None:
                    nursery.start_soon(self._load_packs)
            if failed:
                raise failed[0]
            self.status.traces = len(traces)
            self.status.packed_digests = packed_locations(traces)
            plan = merge(traces, self.min_share)
            if self.status.source != "manifest" and plan:
                ours = await trio.to_thread.run_sync(self.manifest.chunk_digests)
                plan = [it for it in plan if it.digest in ours]
            self.planned = {it.digest for it in plan}
            self.status.planned_chunks = len(plan)
            self.status.planned_bytes = sum(it.length for it in plan)
            if not plan:
                self.status.state = "done"
                return
            self.status.state = "running"
            present = await self.fetcher.present([it.digest for it in plan])
            local = [it.digest for it, have in zip(plan, present, strict=True) if have]
            remote = [it for it, have in zip(plan, present, strict=True) if not have]
            self.status.local_chunks = len(local)
            async with trio.open_nursery() as nursery:
                if local:
                    nursery.start_soon(self._warm, local)
                packed = self.packs.locations if self.packs is not None else None
                await self._fetch_all(plan_groups(remote, self.range_bytes, self.max_gap,
                                                  packed))
            self.status.state = "done"
        except (CasfsError, OSError) as exc:
            self.status.state = "failed"
            log.warning("prefetch stopped: %s", exc)

    async def _load_packs(self) -> None:
        assert self.packs is not None
        layers = [layer["digest"] for layer in self.manifest.meta.get("layers", [])
                  if isinstance(layer, dict) and isinstance(layer.get("digest"), str)]
        try:
            ours = await trio.to_thread.run_sync(self.manifest.chunk_digests)
            await trio.to_thread.run_sync(self.packs.load, self.store, layers, ours)
        except (CasfsError, OSError) as exc:  # guesses then fetch blob by blob
            log.warning("directory packs not loaded: %s", exc)

    async def _warm(self, digests: list[str]) -> None:
        """Chunks of the plan already on local disk: verify them (a read and a hash,
        once per process) in first-access order, ahead of the process, which then finds
        them checked and in the page cache instead of waiting on the disk."""
        batches = [digests[i : i + self.warm_batch]
                   for i in range(0, len(digests), self.warm_batch)]
        slots = trio.Semaphore(self.warm_concurrency)  # a few disk reads in flight

        async def one(batch: list[str]) -> None:
            try:
                n = await self.fetcher.warm(batch)
                self.status.warmed_chunks += n
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for batch in batches:  # started in first-access order
                await slots.acquire()
                nursery.start_soon(one, batch)

    async def _fetch_all(self, groups: list[PackRange | str]) -> None:
        self.status.groups = len(groups)
        slots = trio.Semaphore(self.concurrency)

        async def one(group: PackRange | str) -> None:
            try:
                if isinstance(group, str):
                    await self.fetcher.prefetch(group)
                    self.status.done_chunks += 1
                else:
                    # Await first: `x += await ...` would read x before the await and
                    # lose the other groups' updates made meanwhile.
                    inserted = await self.fetcher.get_pack_range(group)
                    self.status.done_chunks += inserted
            except CasfsError as exc:
                log.warning("prefetch request failed: %s", exc)
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            for i, group in enumerate(groups):
                await slots.acquire()
                if i % 16 == 0 and not await self.fetcher.room_left(ROOM_SHARE):
                    self.status.stopped_at_cap = True
                    slots.release()
                    log.info("prefetch stopped: the cache is near its size cap")
                    break
                nursery.start_soon(one, group)
