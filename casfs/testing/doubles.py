"""The store doubles every test and benchmark shares: an object backend in memory, and a
wrapper that counts calls and injects faults into any backend.

Owns: `MemoryBackend` (the one stand-in for `casfs.store.backend.ObjectBackend`) and
`FaultyBackend` (a wrapper around any backend: per-operation and per-key call counts,
seeded or scheduled errors, delays). Nothing here stands in for `casfs.store.Store`:
code that needs a store gets the real one over a double, `Store(MemoryBackend())`, so
its methods can never drift from what the indexer and the daemon call.

Both classes keep the backend contract as `casfs.store.backend` writes it; the test
`tests/test_doubles.py` fails when one drifts from it (a method missing, a parameter
renamed or of another kind) or behaves unlike the file store where it implements an
operation.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

from casfs.errors import ObjectNotFound, TransientStoreError
from casfs.store.backend import ObjectBackend, ObjectTooLarge

__all__ = ["Fault", "FaultyBackend", "MemoryBackend", "fail_first", "fail_first_per_key"]


class MemoryBackend:
    """Objects in a dict. Thread-safe; `put` is atomic (a reader sees the old object or the
    new one). Last-modified times come from `clock` (time.time by default), so a test of
    gc's grace period can set them. Durability is modelled: a put inside
    `deferred_syncs()` stays in `unsynced` until `sync()` (or the block's end)."""

    def __init__(self, url: str = "memory://test", clock: Callable[[], float] = time.time) -> None:
        self.url = url
        self.clock = clock
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._lock = threading.Lock()
        self._deferring = 0
        self.unsynced: set[str] = set()  # keys put inside deferred_syncs(), not yet synced
        self.syncs = 0

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        with self._lock:
            found = self._objects.get(key)
        if found is None:
            raise ObjectNotFound(f"object {key} not found in {self.url}")
        if max_bytes is not None and len(found[0]) > max_bytes:
            raise ObjectTooLarge(f"object {key} in {self.url} is {len(found[0])} bytes, over "
                                 f"the {max_bytes}-byte bound")
        return found[0]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key)[offset:offset + length]

    def put(self, key: str, data: bytes) -> None:
        value = bytes(data)  # a caller's bytearray or memoryview must not change it later
        with self._lock:
            self._objects[key] = (value, self.clock())
            if self._deferring:
                self.unsynced.add(key)

    def exists(self, key: str) -> bool:
        with self._lock:
            return key in self._objects

    def size(self, key: str) -> int | None:
        with self._lock:
            found = self._objects.get(key)
        return None if found is None else len(found[0])

    def delete(self, key: str) -> None:
        with self._lock:
            self._objects.pop(key, None)

    def list(self, prefix: str) -> Iterator[str]:
        for key, _size, _mtime in self.list_info(prefix):
            yield key

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        with self._lock:  # a snapshot: puts and deletes while listing are not seen
            found = [(k, len(v), t) for k, (v, t) in self._objects.items() if k.startswith(prefix)]
        yield from found

    def sync(self) -> None:
        with self._lock:
            self.syncs += 1
            self.unsynced.clear()

    @contextlib.contextmanager
    def deferred_syncs(self) -> Iterator[None]:
        with self._lock:
            self._deferring += 1
        try:
            yield
        finally:
            with self._lock:
                self._deferring -= 1
            self.sync()

    # -- for tests, not part of the contract ----------------------------------------------

    def clear(self) -> None:
        """Forget every object (a fuzz harness empties the store between inputs)."""
        with self._lock:
            self._objects.clear()

    def set_mtime(self, key: str, mtime: float) -> None:
        with self._lock:
            self._objects[key] = (self._objects[key][0], mtime)


Fault = Callable[[str, str, int], BaseException | None]
"""Told (operation, key, how many times this operation was called on this key, this call
included); returns the error to raise instead of making the call, or None."""


def fail_first(n: int, error: type[BaseException] = TransientStoreError) -> Fault:
    """The first n calls of any operation fail (as test_store's flaky backends did)."""
    count = [0]
    lock = threading.Lock()

    def fault(op: str, key: str, nth: int) -> BaseException | None:
        with lock:
            count[0] += 1
            seen = count[0]
        return error(f"injected failure {seen} ({op} {key})") if seen <= n else None

    return fault


def fail_first_per_key(n: int, error: type[BaseException] = TransientStoreError, *,
                       ops: tuple[str, ...] = ("get",), prefix: str = "") -> Fault:
    """The first n calls of `ops` on each key under `prefix` fail; later ones go through."""

    def fault(op: str, key: str, nth: int) -> BaseException | None:
        if op in ops and key.startswith(prefix) and nth <= n:
            return error(f"injected failure of {op} {key} ({nth} of {n})")
        return None

    return fault


class FaultyBackend:
    """Wraps any backend: counts every call (`calls[op]`, `per_key[(op, key)]`, whole gets
    per key in `gets[key]`, the keys put, in order, in `puts`), sleeps `delay` seconds
    before each (to widen races), and raises what `fault` returns instead of calling the
    inner backend."""

    def __init__(self, inner: ObjectBackend, fault: Fault | None = None, *,
                 delay: float = 0.0) -> None:
        self.inner = inner
        self.url = inner.url
        self.fault = fault
        self.delay = delay
        self.calls: Counter[str] = Counter()
        self.per_key: Counter[tuple[str, str]] = Counter()
        self.gets: Counter[str] = Counter()
        self.puts: list[str] = []
        self.injected = 0
        self._lock = threading.Lock()

    def _enter(self, op: str, key: str) -> None:
        with self._lock:
            self.calls[op] += 1
            self.per_key[(op, key)] += 1
            nth = self.per_key[(op, key)]
            if op == "put":
                self.puts.append(key)
            elif op == "get":
                self.gets[key] += 1
        if self.delay:
            time.sleep(self.delay)
        error = self.fault(op, key, nth) if self.fault is not None else None
        if error is not None:
            with self._lock:
                self.injected += 1
            raise error

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        self._enter("get", key)
        return self.inner.get(key, max_bytes=max_bytes)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self._enter("get_range", key)
        return self.inner.get_range(key, offset, length)

    def put(self, key: str, data: bytes) -> None:
        self._enter("put", key)
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        self._enter("exists", key)
        return self.inner.exists(key)

    def size(self, key: str) -> int | None:
        self._enter("size", key)
        size = getattr(self.inner, "size", None)
        if size is None:  # the contract's fallback: present, size unknown
            return -1 if self.inner.exists(key) else None
        return size(key)

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        self.inner.delete(key)

    def list(self, prefix: str) -> Iterator[str]:
        self._enter("list", prefix)
        return self.inner.list(prefix)

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        self._enter("list_info", prefix)
        return self.inner.list_info(prefix)

    def sync(self) -> None:
        self._enter("sync", "")
        self.inner.sync()

    def deferred_syncs(self) -> contextlib.AbstractContextManager[None]:
        self._enter("deferred_syncs", "")
        return self.inner.deferred_syncs()
