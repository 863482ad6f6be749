"""Stand-ins for unit tests of the guessing logic (prefetch.heuristics)."""

from __future__ import annotations

from typing import Any


class RecordingFetcher:
    """Takes the place of casfs.fetch.Fetcher: records every chunk and pack range the
    heuristics ask for; `get` returns the blob from `store` when one is given."""

    def __init__(self, store: Any = None) -> None:
        self.store = store
        self.got: list[str] = []  # chunks asked for one by one, in order
        self.ranges: list[list[str]] = []  # chunks asked for as pack ranges
        self.warm: list[str] = []  # of `got`, those asked for with warm=True

    def in_flight(self, digest: str) -> bool:
        return False

    async def prefetch(self, digest: str, *, warm: bool = False) -> None:
        if warm:
            self.warm.append(digest)
        await self.get(digest, prefetch=True)

    async def get(self, digest: str, prefetch: bool = False) -> bytes | None:
        assert prefetch, "heuristics only ever prefetch"
        self.got.append(digest)
        return self.store.get_blob(digest) if self.store is not None else None

    async def read(self, ranges: list, *, prefetch: bool = False) -> bytes:
        out = b""
        for digest, start, length in ranges:
            data = await self.get(digest, prefetch=prefetch) or b""
            out += data[start : start + length]
        return out

    async def get_pack_range(self, run: Any) -> int:
        self.ranges.append([d for d, _, _ in run.items])
        return len(run.items)
