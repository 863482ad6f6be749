"""`casfs gc`: delete what nothing live reaches.

Live roots are every tag's manifest and every manifest younger than the grace
period (an index that has not tagged yet). From a live manifest: its chunks'
blobs, its layers' records (and their chunks: a kept record must never name a
swept blob, or a re-index would reuse it) and pack indexes (and their directory
packs), its traces, and the packs those traces locate. Everything else older than
the grace period is swept: blobs, manifests, layer records, pack indexes, traces
and their layer pointers, packs.

gc reads keys through casfs.store.keys and each object through the module that
owns its format: manifests (casfs.manifest), layer records (indexer.layerrecord),
pack indexes (casfs.packindex), traces (prefetch.trace). A key that does not parse
is never deleted (gc does not delete what it does not understand; `casfs check`
reports it). An object whose format is damaged is swept with its referents'
protection dropped (a damaged record, pack index or trace is ignored by its
readers anyway); a store that fails to answer stops gc before anything is deleted.

Runs under the store's gc lock (casfs.store.locks); listings of index locks are
checked before marking and again before sweeping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from casfs import packindex
from casfs.errors import BlobCorrupt, CasfsError, ObjectNotFound, StoreBusy
from casfs.manifest import Manifest
from casfs.store.content import Store
from casfs.store.keys import PREFIXES, Kind, ParsedKey, pack_key, try_parse_key
from casfs.store.locks import fresh_locks, gc_lock
from indexer.layerrecord import LayerRecordError
from indexer.layerrecord import parse as parse_record
from prefetch.trace import MAX_TRACE_BYTES, Trace, TraceError

log = logging.getLogger(__name__)

SWEPT_KINDS = (Kind.BLOB, Kind.MANIFEST, Kind.LAYER_RECORD, Kind.PACK_INDEX, Kind.TRACE,
               Kind.TRACE_POINTER, Kind.PACK)
UNKNOWN = "unknown"  # report name of keys that do not parse (kept)

Listed = tuple[ParsedKey, int, float]  # (key, size, last-modified)


@dataclass
class GcReport:
    live_manifests: int = 0
    kept: dict[str, int] = field(default_factory=dict)
    swept: dict[str, int] = field(default_factory=dict)
    swept_bytes: int = 0
    young_kept: int = 0
    dry_run: bool = False

    def count(self, table: dict[str, int], kind: str) -> None:
        table[kind] = table.get(kind, 0) + 1


def _list(store: Store, report: GcReport) -> dict[Kind, list[Listed]]:
    """Every object gc may sweep, by kind; keys that do not parse are counted, kept."""
    out: dict[Kind, list[Listed]] = {kind: [] for kind in SWEPT_KINDS}
    for kind in SWEPT_KINDS:
        for key, size, mtime in store.backend.list_info(PREFIXES[kind]):
            parsed = try_parse_key(key)
            if isinstance(parsed, ParsedKey) and parsed.kind == kind:
                out[kind].append((parsed, size, mtime))
            else:
                log.warning("gc: keeping %s, which is no key of the store format", key)
                report.count(report.kept, UNKNOWN)
    return out


def collect(store: Store, *, grace: float = 6 * 3600, dry_run: bool = False,
            progress: Callable[[str], None] = lambda s: None, now: float | None = None) -> GcReport:
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run)
    lock = gc_lock(store)
    try:
        live_blobs: set[str] = set()
        live_keys: set[str] = set()  # manifests, layer records, traces, packs to keep

        def young(mtime: float) -> bool:
            return now - mtime < grace

        progress("marking from tags")
        roots = {store.get_tag(t) for t in store.list_tags()}
        listed = _list(store, report)
        live = {k.digest for k, _s, mtime in listed[Kind.MANIFEST]
                if k.digest in roots or young(mtime)}
        report.live_manifests = len(live)
        layer_digests: set[str] = set()
        for digest in sorted(live):
            try:
                m = Manifest(store.get_manifest(digest), digest)
            except CasfsError as exc:
                raise CasfsError(f"gc stopped: live manifest {digest} is unreadable ({exc}); "
                                 "nothing was deleted") from exc
            live_blobs |= m.chunk_digests()
            for layer in m.meta.get("layers", []):
                if isinstance(layer, dict) and isinstance(layer.get("digest"), str):
                    layer_digests.add(layer["digest"])
        live_keys.update(k.key for k, _s, _m in listed[Kind.MANIFEST] if k.digest in live)

        progress(f"marking layer records of {len(live)} manifests")
        for k, _s, mtime in listed[Kind.LAYER_RECORD]:
            if k.layer not in layer_digests and not young(mtime):
                continue
            raw = store.get_layer_record(k.layer)  # None: gone, or damaged (logged)
            try:
                record = parse_record(raw, k.key) if raw is not None else None
            except LayerRecordError as exc:
                # Never reused: indexer.index indexes the layer again and rewrites it.
                log.warning("gc: %s; it will be swept", exc)
                record = None
            if record is not None:
                live_keys.add(k.key)
                live_blobs |= record.chunk_digests()

        progress("marking directory packs")
        for k, _s, mtime in listed[Kind.PACK_INDEX]:
            if k.layer not in layer_digests and not young(mtime):
                continue
            try:
                raw = store.get_pack_index(k.layer, packindex.MAX_INDEX_BYTES)
                located = packindex.parse(raw, k.key) if raw is not None else {}
            except (packindex.PackIndexError, BlobCorrupt) as exc:
                # Damaged: its layer is packed again by the next index of an image
                # holding it (indexer.index checks the pack index it reuses).
                log.warning("gc: pack index %s is unreadable (%s); it will be swept", k.key, exc)
                continue
            except CasfsError as exc:  # the store failing: never a reason to delete
                raise CasfsError(f"gc stopped: cannot read pack index {k.key} ({exc}); "
                                 "nothing was deleted") from exc
            live_keys.add(k.key)
            live_keys.update(pack_key(pack) for pack, _o, _l in located.values())

        progress("marking traces and packs")
        for k, _s, mtime in listed[Kind.TRACE]:
            if k.manifest not in live and not young(mtime):
                continue
            try:
                trace = Trace.parse(store.get_trace(k.manifest, k.trace_id, MAX_TRACE_BYTES),
                                    k.trace_id)
            except ObjectNotFound:
                continue
            except (TraceError, BlobCorrupt) as exc:
                log.warning("gc: trace %s is unreadable (%s); it will be swept", k.key, exc)
                continue
            except CasfsError as exc:
                raise CasfsError(f"gc stopped: cannot read trace {k.key} ({exc}); "
                                 "nothing was deleted") from exc
            live_keys.add(k.key)
            if trace.pack is not None:
                live_keys.add(pack_key(trace.pack))
        for k, _s, _m in listed[Kind.TRACE_POINTER]:
            if k.trace in live_keys:
                live_keys.add(k.key)

        # An index that began after our lock check may have skipped uploading a
        # blob it saw in the store: re-check before deleting anything.
        if fresh_locks(store, "index"):
            raise StoreBusy(f"store {store.url}: an index started during gc; nothing was deleted")
        progress("sweeping")
        doomed: list[str] = []
        for kind in SWEPT_KINDS:
            for k, size, mtime in listed[kind]:
                alive = k.digest in live_blobs if kind == Kind.BLOB else k.key in live_keys
                if alive:
                    report.count(report.kept, kind.value)
                elif young(mtime):
                    report.young_kept += 1
                    report.count(report.kept, kind.value)
                else:
                    report.count(report.swept, kind.value)
                    report.swept_bytes += size
                    doomed.append(k.key)
        if not dry_run and doomed:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(store.backend.delete, doomed))
            store.forget_known()
    finally:
        lock.release()
    return report


def parse_duration(text: str) -> float:
    """'30s', '15m', '6h', '7d', or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise CasfsError(f"bad duration {text!r}: use e.g. 30m, 6h, 7d") from None
