"""`casfs check [--read-data]`: is the store whole? (restic's and borg's `check`.)

From the roots down: the store marker; every tag names a manifest that exists,
matches its digest, parses and validates (`Manifest.validate`); every chunk of
those live manifests is a blob in the store; each of their layers' record and
pack index parses (indexer.layerrecord, casfs.packindex), the blobs a record names
exist (a re-index would reuse the record), and every pack a pack index names exists
and is long enough for its entries; each of their traces parses (prefetch.trace),
belongs to its manifest, and the pack it names exists and is long enough; trace
pointers point at traces; every key in the store is a key of the format
(casfs.store.keys). Sizes come from one listing of the store, never a request per
object. With `--read-data` every blob in the store is downloaded, decompressed and
hashed (as a mount verifies it), and every pack entry the live pack indexes and
traces locate is read by ranged GETs and verified the same way, by worker threads
with a bounded number of requests (and bytes) in flight.

Each problem is one line: kind, key, what is wrong. check changes nothing in the
store and takes no lock (read-only credentials are enough), so it never blocks
`casfs index` or `casfs gc`. It reads the tags and their manifests before it lists
the store, and an index writes every object a manifest needs before the manifest
and its tag: an index running alongside causes no false report (what it writes
after the listing is not checked). A gc running alongside can: it deletes what no
tag reaches, so a tag removed during the check can leave its manifest's objects
reported missing. check looks for gc locks before and after and says so.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from casfs import packindex
from casfs.errors import (
    BlobCorrupt,
    CasfsError,
    CheckFailed,
    ObjectNotFound,
    StoreError,
    StoreUnreachable,
    TagNotFound,
)
from casfs.manifest import Manifest
from casfs.progress import Progress, ProgressBar, human_bytes
from casfs.store.content import (
    MAX_SMALL_OBJECT,
    MAX_STORED_BLOB_SIZE,
    MIN_FRAME_SIZE,
    STORE_FORMAT_VERSION,
    Store,
    verify_blob,
)
from casfs.store.keys import (
    STORE_MARKER,
    Kind,
    ParsedKey,
    blob_key,
    layer_record_key,
    manifest_key,
    pack_index_key,
    pack_key,
    tag_key,
    try_parse_key,
)
from casfs.store.locks import fresh_locks
from indexer.layerrecord import LayerRecordError
from indexer.layerrecord import parse as parse_record
from prefetch.trace import MAX_TRACE_BYTES, Trace, TraceError

CHECK_FAILED_EXIT = CheckFailed.exit_code
"""Exit status when problems were found (the store failing to answer is a StoreError,
3, as anywhere)."""
READ_WORKERS = 8
RANGE_BYTES = 8 << 20  # the most bytes one ranged GET of pack entries asks for
T = TypeVar("T")
R = TypeVar("R")

# Entries to verify in one pack: (offset, stored length, blob digest, who locates it).
PackEntries = dict[str, set[tuple[int, int, str, str]]]


@dataclass(frozen=True)
class Problem:
    kind: str  # a casfs.store.keys.Kind value, or "unknown" for a key of no kind
    key: str
    what: str

    def __str__(self) -> str:
        return f"{self.kind} {self.key}: {self.what}"


@dataclass
class CheckReport:
    problems: list[Problem] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)  # objects looked at, by kind
    read_data: bool = False
    read_blobs: int = 0
    read_pack_entries: int = 0
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, kind: str, key: str, what: str) -> None:
        with self._lock:
            self.problems.append(Problem(kind, key, what))

    def count(self, kind: str, n: int = 1) -> None:
        self.checked[kind] = self.checked.get(kind, 0) + n

    def summary(self) -> list[str]:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.checked.items())) or "nothing"
        lines = [f"checked: {kinds}"]
        if self.read_data:
            lines.append(f"read and verified: {self.read_blobs} blobs, {self.read_pack_entries} "
                         f"pack entries ({human_bytes(self.bytes_read)})")
        lines += self.notes
        lines.append(f"{len(self.problems)} problems" if self.problems else "no problems found")
        return lines


@dataclass
class _Listing:
    """One listing of the whole store, by kind (sizes from the listing)."""

    blobs: dict[str, int] = field(default_factory=dict)
    packs: dict[str, int] = field(default_factory=dict)
    manifests: set[str] = field(default_factory=set)
    records: set[str] = field(default_factory=set)  # layer digests
    pack_indexes: set[str] = field(default_factory=set)
    traces: list[ParsedKey] = field(default_factory=list)
    pointers: list[ParsedKey] = field(default_factory=list)


@dataclass
class _Live:
    """What the tags reach: valid manifests, their chunks and layers."""

    manifests: dict[str, frozenset[str]] = field(default_factory=dict)  # -> its chunks
    chunks: dict[str, str] = field(default_factory=dict)  # chunk -> a manifest naming it
    layers: set[str] = field(default_factory=set)


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """fn over items in worker threads, at most 2 x workers submitted at once (so the
    bytes in flight stay bounded however many items there are); results in order."""
    with ThreadPoolExecutor(workers, thread_name_prefix="check") as pool:
        window: deque[Future[R]] = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= 2 * workers:
                yield window.popleft().result()
        for fut in window:
            yield fut.result()


def _failure(exc: CasfsError) -> str:
    """What a failed read says about the object. StoreUnreachable is re-raised: a store
    that cannot be reached says nothing about its content, and stops the check."""
    if isinstance(exc, StoreUnreachable):
        raise exc
    if isinstance(exc, ObjectNotFound):
        return "missing"
    return f"unreadable: {exc}" if isinstance(exc, StoreError) and not isinstance(
        exc, BlobCorrupt) else f"damaged: {exc}"


def run_check(store: Store, *, read_data: bool = False, progress: Progress | None = None,
              workers: int = READ_WORKERS) -> CheckReport:
    """Check the store (reading only); blocking. Raises StoreError when the store cannot
    be listed or reached at all."""
    progress = progress or Progress(enabled=False)
    report = CheckReport(read_data=read_data)
    gc_before = fresh_locks(store, "gc")
    progress.update("checking the store marker", force=True)
    _check_marker(store, report)
    progress.update("reading tags and their manifests", force=True)
    live = _check_tags(store, report, workers)
    progress.update("listing the store", force=True)
    listing = _list(store, report)
    _check_chunks(report, live, listing)
    progress.update(f"checking the layers of {len(live.manifests)} manifests", force=True)
    entries: PackEntries = {}
    _check_layers(store, report, live, listing, entries, workers)
    progress.update("checking traces", force=True)
    _check_traces(store, report, live, listing, entries, workers)
    if read_data:
        _read_data(store, report, listing, entries, workers, progress)
    progress.done()
    if gc_before or fresh_locks(store, "gc"):
        report.notes.append("note: a gc ran during the check; objects it deleted (of tags "
                            "removed meanwhile) may be reported missing")
    return report


def _check_marker(store: Store, report: CheckReport) -> None:
    report.count("marker")
    try:
        info = json.loads(store.backend.get(STORE_MARKER, max_bytes=MAX_SMALL_OBJECT))
    except CasfsError as exc:
        report.add(Kind.MARKER, STORE_MARKER, _failure(exc))
        return
    except ValueError:
        report.add(Kind.MARKER, STORE_MARKER, "not JSON")
        return
    if not isinstance(info, dict) or info.get("format") != "casfs-store" \
            or info.get("version") != STORE_FORMAT_VERSION:
        report.add(Kind.MARKER, STORE_MARKER,
                   f"not a version {STORE_FORMAT_VERSION} casfs store marker: {info!r:.200}")


def _check_tags(store: Store, report: CheckReport, workers: int) -> _Live:
    """Read every tag, then every manifest a tag names; a manifest enters live only
    when it is whole and valid."""
    names = store.list_tags()
    report.count(Kind.TAG, len(names))
    tagged: dict[str, list[str]] = {}  # manifest digest -> tags naming it

    def read_tag(name: str) -> tuple[str, str | None]:
        try:
            return name, store.get_tag(name)
        except TagNotFound:
            return name, None  # removed since the listing: nothing to check
        except CasfsError as exc:
            report.add(Kind.TAG, tag_key(name), _failure(exc))
            return name, None

    for name, digest in _bounded_map(read_tag, names, workers):
        if digest is not None:
            tagged.setdefault(digest, []).append(name)

    def read_manifest(digest: str) -> tuple[str, Manifest | None]:
        try:
            m = Manifest(store.get_manifest(digest), digest)
            m.validate()
            return digest, m
        except ObjectNotFound:
            for name in tagged[digest]:
                report.add(Kind.TAG, tag_key(name), f"names manifest {digest}, which is missing")
        except CasfsError as exc:
            report.add(Kind.MANIFEST, manifest_key(digest),
                       f"does not validate: {exc}" if not isinstance(exc, StoreError)
                       else _failure(exc))
        return digest, None

    live = _Live()
    report.count(Kind.MANIFEST, len(tagged))
    for digest, m in _bounded_map(read_manifest, sorted(tagged), workers):
        if m is None:
            continue
        live.manifests[digest] = m.chunk_digests()  # not the manifest: its bytes can be big
        for chunk in live.manifests[digest]:
            live.chunks.setdefault(chunk, digest)
        for layer in m.meta.get("layers", []):
            layer_digest = layer.get("digest") if isinstance(layer, dict) else None
            if not isinstance(layer_digest, str) or \
                    not isinstance(try_parse_key(layer_record_key(layer_digest)), ParsedKey):
                report.add(Kind.MANIFEST, manifest_key(digest),
                           f"names a malformed layer digest {layer_digest!r:.100}")
                continue
            live.layers.add(layer_digest)
    return live


def _list(store: Store, report: CheckReport) -> _Listing:
    listing = _Listing()
    for key, size, _mtime in store.backend.list_info(""):
        parsed = try_parse_key(key)
        if not isinstance(parsed, ParsedKey):
            report.add("unknown", key, str(parsed))
            continue
        kind = parsed.kind
        if kind == Kind.BLOB:
            listing.blobs[parsed.digest] = size
            if size > MAX_STORED_BLOB_SIZE:  # an index would take it as present
                report.add(kind, key, f"{size} bytes, more than any stored blob can be")
        elif kind == Kind.PACK:
            listing.packs[parsed.digest] = size
        elif kind == Kind.MANIFEST:
            listing.manifests.add(parsed.digest)
        elif kind == Kind.LAYER_RECORD:
            listing.records.add(parsed.layer)
        elif kind == Kind.PACK_INDEX:
            listing.pack_indexes.add(parsed.layer)
        elif kind == Kind.TRACE:
            listing.traces.append(parsed)
        elif kind == Kind.TRACE_POINTER:
            listing.pointers.append(parsed)
    report.count(Kind.BLOB, len(listing.blobs))
    report.count(Kind.PACK, len(listing.packs))
    return listing


def _missing_blob(listing: _Listing, digest: str) -> str | None:
    """What is wrong with a blob something live names (None: it is there)."""
    size = listing.blobs.get(digest)
    if size is None:
        return "missing"
    if size < MIN_FRAME_SIZE:
        return f"a {size}-byte object (an aborted upload?), not a blob"
    return None


def _check_chunks(report: CheckReport, live: _Live, listing: _Listing) -> None:
    for chunk, manifest in sorted(live.chunks.items()):
        wrong = _missing_blob(listing, chunk)
        if wrong is not None:
            report.add(Kind.BLOB, blob_key(chunk), f"{wrong} (a chunk of manifest {manifest})")
    untagged = len(listing.manifests - set(live.manifests))
    if untagged:
        report.notes.append(f"note: {untagged} manifests no tag reaches (gc sweeps them once "
                            "older than its grace period)")


def _pack_reach(store: Store, report: CheckReport, listing: _Listing, entries: PackEntries,
                pack: str, located: Iterable[tuple[int, int, str]], who: str) -> None:
    """The pack `who` names must exist and hold every entry it locates there."""
    size = listing.packs.get(pack)
    if size is None:
        # A boot recording a trace meanwhile writes its pack, then the trace: the listing
        # (packs/ before traces/) can hold the trace and not the pack. Ask once.
        size_of = getattr(store.backend, "size", None)
        size = size_of(pack_key(pack)) if size_of is not None else None
        if size is None or size < 0:
            report.add(Kind.PACK, pack_key(pack), f"missing (named by {who})")
            return
        listing.packs[pack] = size
    items = {(offset, length, digest, who) for offset, length, digest in located}
    end = max((offset + length for offset, length, _d, _w in items), default=0)
    if end > size:
        report.add(Kind.PACK, pack_key(pack),
                   f"truncated: {size} bytes, but {who} locates entries up to byte {end}")
        return
    entries.setdefault(pack, set()).update(items)


def _check_layers(store: Store, report: CheckReport, live: _Live, listing: _Listing,
                  entries: PackEntries, workers: int) -> None:
    layers = sorted(live.layers)
    without_record = sum(1 for layer in layers if layer not in listing.records)
    report.count(Kind.LAYER_RECORD, len(layers) - without_record)
    if without_record:
        report.notes.append(f"note: {without_record} layers of live manifests have no layer "
                            "record (the next index of an image holding one reads it again)")

    def one(layer: str) -> dict[str, list[tuple[int, int, str]]]:
        if layer in listing.records:
            key = layer_record_key(layer)
            try:
                record = parse_record(store.read_layer_record(layer), key)
                # Chunks of live manifests are reported as such; these are the rest
                # (files a later layer deletes).
                gone = sorted(d for d in record.chunk_digests() if d not in live.chunks
                              and _missing_blob(listing, d) is not None)
                if gone:
                    report.add(Kind.LAYER_RECORD, key, f"names {len(gone)} blobs the store "
                               f"lacks (first {blob_key(gone[0])}); a re-index would reuse it")
            except LayerRecordError as exc:
                report.add(Kind.LAYER_RECORD, key, f"does not parse: {exc}")
            except CasfsError as exc:
                report.add(Kind.LAYER_RECORD, key, _failure(exc))
        if layer not in listing.pack_indexes:
            return {}
        key = pack_index_key(layer)
        try:
            raw = store.get_pack_index(layer, packindex.MAX_INDEX_BYTES)
            located = packindex.parse(raw, key) if raw is not None else {}
        except packindex.PackIndexError as exc:
            report.add(Kind.PACK_INDEX, key, f"does not parse: {exc}")
            return {}
        except CasfsError as exc:
            report.add(Kind.PACK_INDEX, key, _failure(exc))
            return {}
        by_pack: dict[str, list[tuple[int, int, str]]] = {}
        for digest, (pack, offset, length) in located.items():
            by_pack.setdefault(pack, []).append((offset, length, digest))
        return by_pack

    report.count(Kind.PACK_INDEX, sum(1 for layer in layers if layer in listing.pack_indexes))
    for layer, by_pack in zip(layers, _bounded_map(one, layers, workers), strict=True):
        for pack, located in sorted(by_pack.items()):
            _pack_reach(store, report, listing, entries, pack, located, pack_index_key(layer))


def _check_traces(store: Store, report: CheckReport, live: _Live, listing: _Listing,
                  entries: PackEntries, workers: int) -> None:
    ours = [k for k in listing.traces if k.manifest in live.manifests]
    report.count(Kind.TRACE, len(ours))

    def one(k: ParsedKey) -> Trace | None:
        try:
            trace = Trace.parse(store.get_trace(k.manifest, k.trace_id, MAX_TRACE_BYTES),
                                k.trace_id)
        except TraceError as exc:
            report.add(Kind.TRACE, k.key, f"does not parse: {exc}")
            return None
        except CasfsError as exc:
            report.add(Kind.TRACE, k.key, _failure(exc))
            return None
        if trace.manifest != k.manifest:
            report.add(Kind.TRACE, k.key, f"names manifest {trace.manifest}, not the one it "
                       "is stored under")
            return None
        chunks = live.manifests[k.manifest]
        foreign = sum(1 for c in trace.chunks if c.digest not in chunks)
        if foreign:
            report.add(Kind.TRACE, k.key, f"{foreign} of its chunks are not its manifest's")
            return None
        return trace

    for k, trace in zip(ours, _bounded_map(one, ours, workers), strict=True):
        if trace is not None and trace.pack is not None:
            located = [(c.pack_offset, c.pack_length, c.digest) for c in trace.chunks
                       if c.pack_offset >= 0]
            _pack_reach(store, report, listing, entries, trace.pack, located, k.key)
    traces = {k.key for k in listing.traces}
    report.count(Kind.TRACE_POINTER, len(listing.pointers))
    for pointer in listing.pointers:
        if pointer.trace not in traces:
            report.add(Kind.TRACE_POINTER, pointer.key, f"points at {pointer.trace}, which "
                       "is missing")


# -- --read-data ------------------------------------------------------------------------


def _read_data(store: Store, report: CheckReport, listing: _Listing, entries: PackEntries,
               workers: int, progress: Progress) -> None:
    # Objects the listing pass found too small or too large to be blobs are judged.
    blobs = sorted((d, size) for d, size in listing.blobs.items()
                   if MIN_FRAME_SIZE <= size <= MAX_STORED_BLOB_SIZE)
    ranges = [(pack, run) for pack, items in sorted(entries.items())
              for run in _runs(sorted(items))]
    total = sum(size for _d, size in blobs) + sum(_span(run)[1] - _span(run)[0]
                                                  for _p, run in ranges)
    bar = progress.bar("reading", total)

    def blob(item: tuple[str, int]) -> None:
        digest, size = item
        try:
            verify_blob(digest, store.get_blob_compressed(digest))
        except ObjectNotFound:
            pass  # deleted since the listing (a gc): the listing pass judged it
        except CasfsError as exc:
            report.add(Kind.BLOB, blob_key(digest), _failure(exc))
        _advance(report, bar, size, blobs=1)

    for _ in _bounded_map(blob, blobs, workers):
        pass
    for _ in _bounded_map(lambda pr: _read_run(store, report, bar, *pr), ranges, workers):
        pass
    bar.finish(f"{human_bytes(report.bytes_read)} verified")


def _advance(report: CheckReport, bar: ProgressBar, n: int, *, blobs: int = 0,
             entries: int = 0) -> None:
    with report._lock:
        report.bytes_read += n
        report.read_blobs += blobs
        report.read_pack_entries += entries
    bar.advance(n)


def _span(run: list[tuple[int, int, str, str]]) -> tuple[int, int]:
    """The byte range [start, end) a run of pack entries covers."""
    return run[0][0], max(offset + length for offset, length, _d, _w in run)


def _runs(items: list[tuple[int, int, str, str]]) -> Iterator[list[tuple[int, int, str, str]]]:
    """Entries of one pack (sorted by offset) as runs of at most RANGE_BYTES, one GET each
    (a single entry may exceed it); gaps between entries are read too."""
    run: list[tuple[int, int, str, str]] = []
    for item in items:
        if run and item[0] + item[1] - run[0][0] > RANGE_BYTES:
            yield run
            run = []
        run.append(item)
    if run:
        yield run


def _read_run(store: Store, report: CheckReport, bar: ProgressBar, pack: str,
              run: list[tuple[int, int, str, str]]) -> None:
    start, end = _span(run)
    key = pack_key(pack)
    try:
        data = store.get_pack_range(pack, start, end - start)
    except CasfsError as exc:
        report.add(Kind.PACK, key, _failure(exc))
        return
    if len(data) < end - start:
        report.add(Kind.PACK, key, f"short read: bytes {start + len(data)}-{end} are missing")
    seen: set[tuple[int, int, str]] = set()
    for offset, length, digest, who in run:
        if (offset, length, digest) in seen:  # located by more than one index or trace
            continue
        seen.add((offset, length, digest))
        piece = data[offset - start: offset - start + length]
        if len(piece) < length:
            continue  # reported as a short read above
        try:
            verify_blob(digest, piece)
        except CasfsError as exc:
            report.add(Kind.PACK, key, f"entry at {offset} (+{length}) that {who} locates "
                       f"for blob {digest} does not verify: {exc}")
    _advance(report, bar, end - start, entries=len(seen))


# -- command line -------------------------------------------------------------------------


def add_arguments(sp: argparse.ArgumentParser) -> None:
    """`casfs check`'s own options (the CLI adds --store)."""
    sp.add_argument("--read-data", action="store_true",
                    help="also download and verify every blob and every live pack entry")
    sp.add_argument("--jobs", type=int, default=READ_WORKERS, metavar="N",
                    help=f"requests in flight (default {READ_WORKERS})")


def cmd_check(args: argparse.Namespace) -> int:
    from casfs.store import open_store

    store = open_store(args.store)  # never create=True: check writes nothing
    progress = Progress()
    report = run_check(store, read_data=args.read_data, progress=progress,
                       workers=max(1, args.jobs))
    for problem in report.problems:
        print(problem)
    for line in report.summary():
        print(line)
    return 0 if report.ok else CHECK_FAILED_EXIT


__all__ = ["CHECK_FAILED_EXIT", "CheckReport", "Problem", "add_arguments", "cmd_check",
           "run_check"]
