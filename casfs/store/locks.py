"""Store locks: how `casfs gc` and `casfs index` (on any machines) stay out of each other's way.

The protocol (docs/operations.md, "Garbage collection"):

* An indexer writes `locks/index-<id>` before it uploads anything, then lists
  `locks/gc-*`; if a fresh gc lock exists it removes its own lock and fails
  (retry later). It refreshes its lock while it runs and removes it when done.
* gc writes `locks/gc-<id>`, then lists `locks/index-*`; if a fresh index lock
  exists it removes its own lock and fails. It lists index locks again after
  marking, just before sweeping, and stops if one appeared.

Each side writes its own lock before it looks for the other's, so with a store
whose listings are strongly consistent (S3 since 2020, R2, SeaweedFS, a local
directory) at least one of two racing processes sees the other. A lock whose
last write is older than STALE_SECONDS is ignored: its process died. On top of
this, gc never deletes anything younger than its grace period.

There are only these two exclusive kinds; `casfs check` takes none (it writes
nothing), and only looks for gc locks to say that a gc ran alongside it.
Lock keys are built by casfs.store.keys (`locks/<kind>-<unix s>-<12 hex>`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from casfs.errors import StoreBusy, StoreError
from casfs.store.content import MAX_SMALL_OBJECT, Store
from casfs.store.keys import lock_key, locks_prefix

STALE_SECONDS = 15 * 60
REFRESH_SECONDS = 60


@dataclass
class Lock:
    store: Store
    key: str
    last_write: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _write(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self.store.backend.put(self.key, json.dumps(info).encode())
        self.last_write = time.monotonic()

    def refresh(self, force: bool = False) -> None:
        if force or time.monotonic() - self.last_write >= REFRESH_SECONDS:
            self._write()

    def release(self) -> None:
        self._stop.set()
        self.store.backend.delete(self.key)

    def keep_fresh(self) -> None:
        """Rewrite the lock every REFRESH_SECONDS from a background thread until released."""
        def loop() -> None:
            while not self._stop.wait(REFRESH_SECONDS):
                # A missed refresh is retried; the lock stays fresh for 15 minutes.
                with contextlib.suppress(StoreError):
                    self._write()

        threading.Thread(target=loop, name="lock-refresh", daemon=True).start()

    def __enter__(self) -> Lock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def fresh_locks(store: Store, kind: str, now: float | None = None) -> list[tuple[str, str]]:
    """(key, holder description) of locks of a kind written in the last STALE_SECONDS."""
    now = time.time() if now is None else now
    out = []
    for key, _size, mtime in store.backend.list_info(locks_prefix(kind)):
        if now - mtime < STALE_SECONDS:
            try:
                info = json.loads(store.backend.get(key, max_bytes=MAX_SMALL_OBJECT))
                holder = f"{info.get('host')} pid {info.get('pid')}"
            except (ValueError, AttributeError, StoreError):
                holder = "unknown holder"
            out.append((key, holder))
    return out


def acquire(store: Store, kind: str, conflicts_with: str) -> Lock:
    """Write a lock of `kind`, then fail with StoreBusy if a fresh `conflicts_with` lock exists."""
    lock = Lock(store, lock_key(kind, int(time.time()), secrets.token_hex(6)))
    lock._write()
    others = fresh_locks(store, conflicts_with)
    if others:
        lock.release()
        key, holder = others[0]
        raise StoreBusy(f"store {store.url} is busy: {conflicts_with} running ({holder}, {key}); "
                        "try again later")
    return lock


def index_lock(store: Store) -> Lock:
    return acquire(store, "index", "gc")


def gc_lock(store: Store) -> Lock:
    return acquire(store, "gc", "index")
