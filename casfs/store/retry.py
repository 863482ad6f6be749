"""Retrying as a wrapper around any backend: transient failures are retried with
exponential backoff and full jitter, within a bounded total time.

Only `TransientStoreError` is retried; not-found and permanent errors (an
`ObjectTooLarge` among them) pass straight through. When the time bound runs out
the last transient error is raised, with the attempt count added to its message.
Syncing and deferring syncs are the inner backend's: passed through, not retried
(a failed sync is no transient request: what it owed is the inner backend's to keep).

With a `stop` event, every request through the wrapper shares one fate (an index's,
indexer.upload): the first to give up sets it, and once it is set no request retries
(each fails at its next error) and a retry's wait ends at once.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from casfs.errors import TransientStoreError
from casfs.store.backend import ObjectBackend

log = logging.getLogger(__name__)
T = TypeVar("T")


class RetryingBackend:
    """Wraps a backend; retries transient errors for up to `deadline` seconds (per
    request), all requests sharing the fate of `stop` when one is given."""

    def __init__(
        self,
        inner: ObjectBackend,
        *,
        deadline: float = 30.0,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        self.stop = stop
        self.deadline = deadline
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.retries = 0

    def _call(self, fn: Callable[[], T]) -> T:
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except TransientStoreError as exc:
                attempt += 1
                elapsed = time.monotonic() - start
                delay = random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))
                if self.stop is not None and self.stop.is_set():
                    raise
                if elapsed + delay > self.deadline:
                    if self.stop is not None:
                        self.stop.set()
                    raise TransientStoreError(
                        f"{exc} (gave up after {attempt} attempts in {elapsed:.1f}s)"
                    ) from exc
                self.retries += 1
                log.debug("retrying after transient error: %s", exc)
                if self.stop is None:
                    time.sleep(delay)
                elif self.stop.wait(delay):
                    raise

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        return self._call(lambda: self.inner.get(key, max_bytes=max_bytes))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call(lambda: self.inner.get_range(key, offset, length))

    def put(self, key: str, data: bytes) -> None:
        self._call(lambda: self.inner.put(key, data))

    def exists(self, key: str) -> bool:
        return self._call(lambda: self.inner.exists(key))

    def size(self, key: str) -> int | None:
        size = getattr(self.inner, "size", None)
        if size is None:
            return -1 if self._call(lambda: self.inner.exists(key)) else None
        return self._call(lambda: size(key))

    def delete(self, key: str) -> None:
        self._call(lambda: self.inner.delete(key))

    def list(self, prefix: str) -> Iterator[str]:
        return iter(self._call(lambda: list(self.inner.list(prefix))))

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        return iter(self._call(lambda: list(self.inner.list_info(prefix))))

    def sync(self) -> None:
        self.inner.sync()

    def deferred_syncs(self) -> contextlib.AbstractContextManager[None]:
        return self.inner.deferred_syncs()
