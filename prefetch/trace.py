"""The trace format (version 1) and the merging of several boots' traces.

A trace is zstd-compressed JSON:

    {"version": 1, "manifest": "<hex>", "created": <unix seconds>,
     "boot_seconds": <float>, "paths": ["/usr/bin/python3", ...],
     "pack": "<hex>" | null,
     "chunks": [[digest, length, t_ms, path_index, pack_offset, pack_length], ...]}

`chunks` is in first-access order; `t_ms` is the first access relative to the
mount; pack_offset is -1 for a chunk the pack does not hold. Traces come from
the store and are untrusted: parse() checks every field and bound and raises
TraceError, and the mount carries on without that trace.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from casfs.digest import is_digest
from casfs.errors import TraceError
from casfs.store.content import MAX_BLOB_SIZE

TRACE_VERSION = 1
MAX_TRACE_BYTES = 32 << 20
MAX_TRACE_CHUNKS = 200_000
MAX_TRACE_PATHS = MAX_TRACE_CHUNKS
MAX_PACK_SIZE = 1 << 40
# A trace's JSON has a fixed shape: an object holding two lists, `paths` (strings) and
# `chunks` (rows of 6 values). Counted on the raw bytes before parsing, these bound what
# json.loads builds: a small zstd frame can expand to MAX_TRACE_BYTES of `1,1,1,...`,
# which would be millions of Python objects (hundreds of MB) once parsed.
MAX_TRACE_SEPARATORS = 7 * MAX_TRACE_CHUNKS + MAX_TRACE_PATHS + 16
MAX_TRACE_BRACKETS = MAX_TRACE_CHUNKS + 8


@dataclass
class TraceChunk:
    digest: str
    length: int
    t_ms: int
    path: str = ""
    pack_offset: int = -1
    pack_length: int = 0


@dataclass
class Trace:
    manifest: str
    created: float
    boot_seconds: float
    chunks: list[TraceChunk]
    pack: str | None = None
    trace_id: str = ""

    def to_json(self) -> bytes:
        paths: dict[str, int] = {}
        rows = []
        for c in self.chunks:
            idx = paths.setdefault(c.path, len(paths))
            rows.append([c.digest, c.length, c.t_ms, idx, c.pack_offset, c.pack_length])
        doc = {"version": TRACE_VERSION, "manifest": self.manifest, "created": self.created,
               "boot_seconds": round(self.boot_seconds, 3), "paths": list(paths),
               "pack": self.pack, "chunks": rows}
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def parse(cls, data: bytes, trace_id: str = "") -> Trace:
        if len(data) > MAX_TRACE_BYTES:
            raise TraceError(f"trace {trace_id} is larger than {MAX_TRACE_BYTES} bytes")
        # Bounds on what parsing builds, checked first (a comma or bracket inside a
        # path string counts too, which only makes the bound stricter).
        if data.count(b",") + data.count(b":") > MAX_TRACE_SEPARATORS or \
                data.count(b"[") + data.count(b"{") > MAX_TRACE_BRACKETS:
            raise TraceError(f"trace {trace_id} holds more values than a trace can")
        try:
            doc = json.loads(data)
        except RecursionError:
            raise TraceError(f"trace {trace_id} is nested too deeply") from None
        except ValueError as exc:
            raise TraceError(f"trace {trace_id} is not JSON: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("version") != TRACE_VERSION:
            raise TraceError(f"trace {trace_id}: not a version {TRACE_VERSION} trace")
        manifest, pack = doc.get("manifest"), doc.get("pack")
        paths, rows = doc.get("paths"), doc.get("chunks")
        if not isinstance(manifest, str) or not is_digest(manifest):
            raise TraceError(f"trace {trace_id}: bad manifest digest")
        if pack is not None and not (isinstance(pack, str) and is_digest(pack)):
            raise TraceError(f"trace {trace_id}: bad pack digest")
        if not isinstance(paths, list) or len(paths) > MAX_TRACE_PATHS or \
                not all(isinstance(p, str) for p in paths):
            raise TraceError(f"trace {trace_id}: bad paths")
        if not isinstance(rows, list) or len(rows) > MAX_TRACE_CHUNKS:
            raise TraceError(f"trace {trace_id}: bad or oversized chunk list")
        chunks = []
        for row in rows:
            chunks.append(_parse_row(row, paths, pack is not None, trace_id))
        created, boot = doc.get("created", 0), doc.get("boot_seconds", 0)
        if not isinstance(created, int | float) or not isinstance(boot, int | float) or \
                not (0 <= created < 1e11 and 0 <= boot < 1e7):
            raise TraceError(f"trace {trace_id}: bad times")
        return cls(manifest, float(created), float(boot), chunks, pack, trace_id)


def _parse_row(row: Any, paths: list[str], has_pack: bool, trace_id: str) -> TraceChunk:
    if not (isinstance(row, list) and len(row) == 6):
        raise TraceError(f"trace {trace_id}: malformed chunk entry")
    digest, length, t_ms, path_idx, off, plen = row
    ints = (length, t_ms, path_idx, off, plen)
    if not isinstance(digest, str) or not is_digest(digest) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in ints
    ):
        raise TraceError(f"trace {trace_id}: malformed chunk entry")
    if not 0 < length <= MAX_BLOB_SIZE or not 0 <= t_ms < 1 << 40 or \
            not 0 <= path_idx < len(paths):
        raise TraceError(f"trace {trace_id}: chunk entry out of range")
    if off != -1 and (not has_pack or off < 0 or not 0 < plen <= MAX_BLOB_SIZE + 1024
                      or off + plen > MAX_PACK_SIZE):
        raise TraceError(f"trace {trace_id}: pack location out of range")
    return TraceChunk(digest, length, t_ms, paths[path_idx], off, plen)


@dataclass
class PlanItem:
    """One chunk to prefetch, with every pack location known for it."""

    digest: str
    length: int
    t_ms: float
    boots: int
    locations: list[tuple[str, int, int]] = field(default_factory=list)  # (pack, offset, length)


def merge(traces: list[Trace], min_share: float = 0.5) -> list[PlanItem]:
    """Chunks that at least min_share of the boots touched, in typical first-access order.

    With one trace every chunk is kept. The order is the median of the chunk's
    first-access times over the boots that touched it; ties (the chunks of one read
    share a time) keep the order of the latest trace holding them (traces come
    oldest first), which is its pack's order, so ties do not split pack ranges.
    """
    if not traces:
        return []
    times: dict[str, list[int]] = {}
    items: dict[str, PlanItem] = {}
    rank: dict[str, tuple[int, int]] = {}
    for ti, trace in enumerate(traces):
        seen: set[str] = set()
        for pos, c in enumerate(trace.chunks):
            if c.digest in seen:
                continue
            seen.add(c.digest)
            rank[c.digest] = (-ti, pos)
            item = items.get(c.digest)
            if item is None:
                item = items[c.digest] = PlanItem(c.digest, c.length, 0.0, 0)
            item.boots += 1
            times.setdefault(c.digest, []).append(c.t_ms)
            if trace.pack is not None and c.pack_offset >= 0:
                item.locations.append((trace.pack, c.pack_offset, c.pack_length))
    need = max(1, math.ceil(min_share * len(traces) - 1e-9))
    plan = []
    for digest, item in items.items():
        if item.boots >= need:
            item.t_ms = statistics.median(times[digest])
            plan.append(item)
    plan.sort(key=lambda it: (it.t_ms, rank[it.digest]))
    return plan
