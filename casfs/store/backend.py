"""The object backend contract: the few operations every store medium provides.

A backend stores opaque objects under '/'-separated keys (for example
`blobs/ab/ab12...`; the key of every kind is built and parsed in
`casfs.store.keys`). It knows nothing of digests, compression or manifests: the
content-addressed layer (`casfs.store.content`) builds those on top, and
wrappers (`casfs.store.retry`) add retrying. Backends are synchronous and
thread-safe; async code calls them through worker threads.

The contract every implementation keeps:

* `put` is atomic: a reader sees the whole object or no object, never a prefix.
  Objects are written once; a second `put` of a key with the same content is
  harmless (content-addressed keys make that the only kind of overwrite, except
  for tags, where last writer wins).
* `put` is durable when it returns, except inside `deferred_syncs()` (below).
* `get` and `get_range` raise `ObjectNotFound` for a missing key.
* Reads are bounded when the caller says how big an object can be: `get(key,
  max_bytes=n)` raises `ObjectTooLarge` for an object of more than n bytes,
  having read at most n + 1 of them. The store is untrusted (a damaged disk, a
  hostile bucket, a 3 GiB `casfs-store.json`): no reader should have to hold
  more than the format allows. A backend that learns the size first (a file's
  fstat, an HTTP Content-Length) refuses before reading anything.
* Errors are classified by the backend, because only it knows its medium:
  `ObjectNotFound` (the object is not there: retrying will not help),
  `TransientStoreError` (timeouts, 5xx, throttling, resets: retrying may help),
  `StoreUnreachable` (cannot connect, no such bucket, bad credentials: permanent
  for this configuration), `ObjectTooLarge` (permanent: the object will not
  shrink), any other `StoreError` (permanent).
* `list` yields keys under a prefix, in no promised order, each exactly once;
  `list_info` the same with each object's size and last-modified time (which
  garbage collection's grace period and `casfs check` read).
* Batching syncs: `with backend.deferred_syncs():` opens a block inside which
  `put` may return before its object is durable (the indexer writes thousands
  of blobs and makes them durable in one go before anything refers to them).
  `sync()` makes every put completed before it durable, inside the block or
  not; leaving the block syncs (also when it is left by an exception, whose
  report a failing sync does not replace). Blocks may nest and may be open in
  several threads: deferral holds while any is open, for every put on the
  backend. A backend whose puts are durable on return (S3) returns
  `contextlib.nullcontext()` and makes `sync()` a no-op.
* Optionally, `size(key)`: the stored object's size in bytes, None when there is
  none (-1: present, size unknown). The content layer uses it, where a backend has
  it, to tell a stored blob or manifest from an empty object an aborted upload left
  (SeaweedFS keeps a zero-byte object when a PUT's connection closes right after
  its headers); backends without it fall back to `exists`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from casfs.errors import ObjectTooLarge

__all__ = ["ObjectBackend", "ObjectTooLarge"]


class ObjectBackend(Protocol):
    """A place to put and get whole objects by key."""

    url: str
    """The URL this backend was opened from, for messages and logs."""

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The whole object. Raises ObjectNotFound; with max_bytes, ObjectTooLarge for an
        object of more than max_bytes bytes, after reading at most max_bytes + 1."""
        ...

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the object (fewer at its end). Raises ObjectNotFound."""
        ...

    def put(self, key: str, data: bytes) -> None:
        """Store data under key, atomically; durable on return outside deferred_syncs()."""
        ...

    def exists(self, key: str) -> bool:
        """Whether key holds an object."""
        ...

    def delete(self, key: str) -> None:
        """Remove key; removing a missing key is not an error."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every key starting with prefix."""
        ...

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        """(key, size, last-modified unix time) of every key starting with prefix."""
        ...

    def sync(self) -> None:
        """Make every completed put durable (a no-op where puts are durable on return)."""
        ...

    def deferred_syncs(self) -> contextlib.AbstractContextManager[None]:
        """A block inside which puts may return before they are durable; leaving it syncs."""
        ...
