"""`casfs gc`: delete what nothing live reaches.

Live roots are every tag's manifest and every manifest younger than the grace
period (an index that has not tagged yet). From a live manifest: its chunks'
blobs, its layers' records (and their chunks: a kept record must never name a
swept blob, or a re-index would reuse it) and pack indexes (and their directory
packs), its traces, and the packs those traces locate. Everything else older than
the grace period is swept: blobs, manifests, layer records, pack indexes, traces
and their layer pointers, packs.

Runs under the store's gc lock (casfs.store.locks); listings of index locks are
checked before marking and again before sweeping.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from casfs import packindex
from casfs.errors import BlobCorrupt, CasfsError, StoreBusy
from casfs.manifest import Manifest
from casfs.store.content import MAX_MANIFEST_SIZE, Store, decompress
from casfs.store.locks import fresh_locks, gc_lock

log = logging.getLogger(__name__)


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


def _kind(key: str) -> str:
    return key.split("/", 1)[0] if not key.startswith("traces/l/") else "trace-pointers"


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
        manifests = {k[len("manifests/"):]: m for k, _s, m in store.backend.list_info("manifests/")}
        live = {d for d in manifests if d in roots or young(manifests[d])}
        report.live_manifests = len(live)
        layer_digests: set[str] = set()
        for digest in sorted(live):
            try:
                m = Manifest(store.get_manifest(digest), digest)
            except CasfsError as exc:
                raise CasfsError(f"gc stopped: live manifest {digest} is unreadable ({exc}); "
                                 "nothing was deleted") from exc
            live_blobs |= m.chunk_digests()
            live_keys.add(f"manifests/{digest}")
            for layer in m.meta.get("layers", []):
                if layer.get("digest"):
                    layer_digests.add(layer["digest"])
        progress(f"marking layer records of {len(live)} manifests")
        for key, _s, mtime in store.backend.list_info("layers/"):
            algo, _, hex_ = key[len("layers/"):].partition("/")
            if f"{algo}:{hex_}" in layer_digests or young(mtime):
                live_keys.add(key)
                record = store.get_layer_record(f"{algo}:{hex_}")
                for op in (json.loads(record).get("ops", []) if record else []):
                    for chunk in op.get("chunks") or []:
                        live_blobs.add(chunk[0])
        progress("marking directory packs")
        for key, _s, mtime in store.backend.list_info("packidx/"):
            algo, _, hex_ = key[len("packidx/"):].partition("/")
            if f"{algo}:{hex_}" not in layer_digests and not young(mtime):
                continue
            live_keys.add(key)
            try:
                raw = store.get_pack_index(f"{algo}:{hex_}", packindex.MAX_INDEX_BYTES)
                located = packindex.parse(raw or b"", key)
            except (packindex.PackIndexError, BlobCorrupt) as exc:
                # Damaged: its layer is packed again by the next index of an image
                # holding it (indexer.index checks the pack index it reuses).
                log.warning("gc: pack index %s is unreadable (%s); it will be swept", key, exc)
                live_keys.discard(key)
                continue
            except CasfsError as exc:  # the store failing: never a reason to delete
                raise CasfsError(f"gc stopped: cannot read pack index {key} ({exc}); "
                                 "nothing was deleted") from exc
            live_keys.update(f"packs/{pack}" for pack, _o, _l in located.values())
        progress("marking traces and packs")
        for key, _s, mtime in store.backend.list_info("traces/m/"):
            manifest = key.split("/")[2]
            if manifest in live or young(mtime):
                live_keys.add(key)
                try:
                    doc = json.loads(decompress(store.backend.get(key), MAX_MANIFEST_SIZE, key))
                    if isinstance(doc.get("pack"), str):
                        live_keys.add(f"packs/{doc['pack']}")
                except (CasfsError, ValueError, AttributeError) as exc:
                    log.warning("gc: trace %s is unreadable (%s); it will be swept", key, exc)
                    live_keys.discard(key)
        for key, _s, _m in store.backend.list_info("traces/l/"):
            manifest, _, trace_id = key.rsplit("/", 1)[1].partition(".")
            if f"traces/m/{manifest}/{trace_id}" in live_keys:
                live_keys.add(key)

        # An index that began after our lock check may have skipped uploading a
        # blob it saw in the store: re-check before deleting anything.
        if fresh_locks(store, "index"):
            raise StoreBusy(f"store {store.url}: an index started during gc; nothing was deleted")
        progress("sweeping")
        doomed: list[tuple[str, int]] = []
        for prefix in ("blobs/", "manifests/", "layers/", "packidx/", "traces/m/", "traces/l/",
                       "packs/"):
            for key, size, mtime in store.backend.list_info(prefix):
                kind = _kind(key)
                alive = (key.rsplit("/", 1)[1] in live_blobs) if prefix == "blobs/" else key in live_keys
                if alive:
                    report.count(report.kept, kind)
                elif young(mtime):
                    report.young_kept += 1
                    report.count(report.kept, kind)
                else:
                    report.count(report.swept, kind)
                    report.swept_bytes += size
                    doomed.append((key, size))
        if not dry_run and doomed:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(lambda ks: store.backend.delete(ks[0]), doomed))
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
