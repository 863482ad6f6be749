"""Named types for pieces of content, and the one function that turns chunks located in
packs into ranged GETs.

A read asks for ChunkRanges (bytes of chunks); a pack holds chunks' stored forms at
PackLocations; prefetch fetches PackRanges (runs of chunks in one pack, one GET each).
Base floor: depends on nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple


class ChunkRange(NamedTuple):
    """Bytes [start, start + length) of the chunk named digest."""

    digest: str
    start: int
    length: int


class PackLocation(NamedTuple):
    """Where a chunk's stored (zstd) form sits: in pack `pack`, `length` bytes at `offset`."""

    pack: str
    offset: int
    length: int


class PackedChunk(NamedTuple):
    """A chunk inside a pack range: its digest, offset in the pack and stored length."""

    digest: str
    offset: int
    length: int


@dataclass
class PackRange:
    """Chunks lying (nearly) back to back in one pack: one ranged GET."""

    pack: str
    items: list[PackedChunk]

    @property
    def start(self) -> int:
        return self.items[0].offset

    @property
    def end(self) -> int:
        return self.items[-1].offset + self.items[-1].length

    @property
    def length(self) -> int:
        return self.end - self.start


def ranges_of(chunks: Iterable[tuple[str, int, int]], offset: int, end: int) -> list[ChunkRange]:
    """The part of each chunk (digest, offset in the file, length) of a file that the
    file's bytes [offset, end) cover."""
    out = []
    for digest, c_off, c_len in chunks:
        lo = max(offset, c_off) - c_off
        out.append(ChunkRange(digest, lo, min(end, c_off + c_len) - c_off - lo))
    return out


def merge_pack_runs(chunks: Iterable[tuple[str, PackLocation | None]], *, max_gap: int,
                    range_bytes: int) -> list[PackRange | str]:
    """Chunks, in the order given, as requests in that order: a chunk that follows the
    previous one in the same pack, after a gap of at most `max_gap` bytes and within
    `range_bytes` of the run's start, joins its run (one PackRange, one GET); a chunk
    with no location stays a digest of its own (one GET of its blob) and does not end
    the run before it."""
    out: list[PackRange | str] = []
    current: PackRange | None = None
    for digest, loc in chunks:
        if loc is None:
            out.append(digest)
            continue
        if current is not None and current.pack == loc.pack:
            gap = loc.offset - current.end
            if 0 <= gap <= max_gap and loc.offset + loc.length - current.start <= range_bytes:
                current.items.append(PackedChunk(digest, loc.offset, loc.length))
                continue
        current = PackRange(loc.pack, [PackedChunk(digest, loc.offset, loc.length)])
        out.append(current)
    return out
