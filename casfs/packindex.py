"""Directory packs: where a layer's small files sit inside its packs (the pack index
format), and how a mount turns "these chunks" into a few ranged GETs.

`casfs index` writes each layer's small files (indexer.dirpack) into packs, sorted by
directory then name, so a directory's files lie back to back and one ranged GET brings
a whole directory. The pack index names, for each packed blob, the pack and the byte
range of its stored (zstd) form. Format version 1 (docs/format.md), zstd-compressed
under `packidx/<algo>/<hex>` (the layer's digest):

    header   24 bytes: magic "CASFSPI\\0", u32 version=1, u32 n_packs, u32 n_entries,
                       u32 reserved
    packs    n_packs   x 32 bytes: each pack's BLAKE3 (its key is packs/<hex>)
    entries  n_entries x 48 bytes: 32 bytes blob digest, u32 pack number,
                       u32 stored length, u64 offset in the pack; in pack order

A pack index only ever speeds fetching up: every blob taken from a pack is verified
against its digest like any other, so a wrong or hostile index costs a failed range
(logged; the reads fetch the blobs singly), never wrong bytes.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from casfs.errors import CasfsError, PackIndexError
from casfs.ranges import PackLocation, PackRange, merge_pack_runs
from casfs.store.content import MAX_BLOB_SIZE, Store

log = logging.getLogger(__name__)

MAGIC = b"CASFSPI\0"
VERSION = 1
HEADER = struct.Struct("<8sIIII")
ENTRY = struct.Struct("<32sIIQ")
MAX_ENTRIES = 4_000_000


def index_bytes_limit(entries: int) -> int:
    """The largest pack index of that many entries (each may be in a pack of its own)."""
    return HEADER.size + min(entries, MAX_ENTRIES) * (ENTRY.size + 32)


MAX_INDEX_BYTES = index_bytes_limit(MAX_ENTRIES)
LAYER_SLACK = 4
# A zstd frame of a blob of MAX_BLOB_SIZE bytes is at most a little larger.
MAX_STORED_LENGTH = MAX_BLOB_SIZE + (MAX_BLOB_SIZE >> 7) + 1024

Location = tuple[str, int, int]  # (pack, offset in the pack, stored length)


def encode(packs: list[str], entries: Iterable[tuple[str, int, int, int]]) -> bytes:
    """A pack index: packs by hex digest; entries (blob digest, pack number, offset,
    stored length) in pack order."""
    body = bytearray()
    n = 0
    for digest, pack_no, offset, length in entries:
        body += ENTRY.pack(bytes.fromhex(digest), pack_no, length, offset)
        n += 1
    head = HEADER.pack(MAGIC, VERSION, len(packs), n, 0)
    return head + b"".join(bytes.fromhex(p) for p in packs) + bytes(body)


def parse(data: bytes, what: str) -> dict[str, Location]:
    """blob digest -> (pack, offset, stored length); raises PackIndexError."""
    if len(data) < HEADER.size:
        raise PackIndexError(f"{what}: truncated ({len(data)} bytes)")
    magic, version, n_packs, n_entries, _ = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise PackIndexError(f"{what}: not a casfs pack index")
    if version != VERSION:
        raise PackIndexError(f"{what}: pack index version {version}; this casfs reads "
                             f"version {VERSION}")
    if n_entries > MAX_ENTRIES or n_packs > n_entries + 1:
        raise PackIndexError(f"{what}: absurd counts ({n_packs} packs, {n_entries} entries)")
    want = HEADER.size + 32 * n_packs + ENTRY.size * n_entries
    if len(data) != want:
        raise PackIndexError(f"{what}: {len(data)} bytes where its header says {want}")
    start = HEADER.size + 32 * n_packs
    packs = [data[HEADER.size + 32 * i : HEADER.size + 32 * (i + 1)].hex()
             for i in range(n_packs)]
    out: dict[str, Location] = {}
    for digest, pack_no, length, offset in ENTRY.iter_unpack(memoryview(data)[start:]):
        if pack_no >= n_packs or not 0 < length <= MAX_STORED_LENGTH or offset >= 1 << 48:
            raise PackIndexError(f"{what}: entry {digest.hex()} points outside its packs")
        out[digest.hex()] = (packs[pack_no], offset, length)
    return out


class PackIndex:
    """Every packed blob of a mounted image: digest -> location, from its layers'
    pack indexes (a later layer's location wins; any location of a digest holds the
    same bytes)."""

    def __init__(self) -> None:
        self.locations: dict[str, Location] = {}
        self.layers = 0  # pack indexes loaded
        self.missing = 0  # layers without one (indexed before directory packs)
        self.rejected = 0  # pack indexes that failed to parse

    def add(self, locations: dict[str, Location]) -> None:
        self.locations.update(locations)
        self.layers += 1

    def as_dict(self) -> dict[str, int]:
        return {"layers": self.layers, "blobs": len(self.locations),
                "layers_without": self.missing, "rejected": self.rejected}

    def load(self, store: Store, layers: list[str], keep: frozenset[str],
             workers: int = 8) -> None:
        """Fetch and parse the layers' pack indexes (in parallel; blocking), keeping the
        locations of the digests in `keep` (the image's chunks). A layer without one is
        counted; a damaged one is logged and skipped. A layer may pack files a later
        layer deletes, so an index may name more blobs than the image has: up to
        LAYER_SLACK times as many are read."""
        limit = index_bytes_limit(max(LAYER_SLACK * len(keep), 100_000))

        def one(layer: str) -> dict[str, Location] | None | CasfsError:
            try:
                raw = store.get_pack_index(layer, limit)
                return None if raw is None else parse(raw, f"pack index of layer {layer}")
            except CasfsError as exc:
                return exc

        if not layers:
            return
        with ThreadPoolExecutor(min(workers, len(layers)),
                                thread_name_prefix="packidx") as pool:
            found = list(pool.map(one, layers))
        for layer, got in zip(layers, found, strict=True):  # later layers win
            if got is None:
                self.missing += 1
            elif isinstance(got, CasfsError):
                self.rejected += 1
                log.warning("ignoring the directory packs of layer %s: %s", layer, got)
            else:
                self.add({d: loc for d, loc in got.items() if d in keep})

    def ranges(self, digests: Iterable[str], *, max_gap: int = 256 << 10,
               range_bytes: int = 4 << 20) -> tuple[list[PackRange], list[str]]:
        """The digests as ranged GETs (a run in one pack, gaps of at most `max_gap`
        bytes bridged, at most about `range_bytes` each) and those no pack holds."""
        located: list[tuple[PackLocation, str]] = []
        loose: list[str] = []
        seen: set[str] = set()
        for d in digests:
            if d in seen:
                continue
            seen.add(d)
            loc = self.locations.get(d)
            if loc is None:
                loose.append(d)
            else:
                located.append((PackLocation(*loc), d))
        located.sort()
        runs = merge_pack_runs(((d, loc) for loc, d in located), max_gap=max_gap,
                               range_bytes=range_bytes)
        return [r for r in runs if isinstance(r, PackRange)], loose
