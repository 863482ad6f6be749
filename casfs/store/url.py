"""Store URLs: `file:///abs/path` or `s3://bucket/prefix`, resolved from --store, then
$CASFS_STORE, then the embedded default local store."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from casfs.errors import BadStoreURL, StoreUnreachable, TransientStoreError, UsageError
from casfs.locations import resolve_store_url
from casfs.store.content import Store
from casfs.store.local import FileBackend
from casfs.store.retry import RetryingBackend

OPEN_RETRY_DEADLINE = 3.0
"""Seconds of retrying the first request to a remote store before calling it unreachable."""
RETRY_DEADLINE = 30.0
"""Seconds of retrying any later request (default; $CASFS_RETRY_DEADLINE overrides it)."""


def default_retry_deadline() -> float:
    raw = os.environ.get("CASFS_RETRY_DEADLINE")
    if not raw:
        return RETRY_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"bad CASFS_RETRY_DEADLINE {raw!r}: use seconds, e.g. 30") from None
    if value < 0:
        raise UsageError(f"bad CASFS_RETRY_DEADLINE {raw!r}: must not be negative")
    return value


def open_store(url: str | None = None, *, create: bool = False,
               retry_deadline: float | None = None, probe: bool = True) -> Store:
    """Open the store a URL names (None: $CASFS_STORE or the default). Remote stores retry
    transient errors for retry_deadline seconds (None: $CASFS_RETRY_DEADLINE, else 30).
    With probe (the default) a remote store is asked for its format marker at once, so
    that an unreachable or foreign store fails here, in seconds."""
    url = resolve_store_url(url)
    if retry_deadline is None:
        retry_deadline = default_retry_deadline()
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise BadStoreURL(f"bad store URL {url!r}: use file:///absolute/path")
        backend = FileBackend(parsed.path, create=create)
        store = Store(backend)
    elif parsed.scheme == "s3":
        if not parsed.netloc:
            raise BadStoreURL(f"bad store URL {url!r}: use s3://bucket/prefix")
        from casfs.store.s3 import S3Backend

        retrying = RetryingBackend(
            S3Backend(parsed.netloc, parsed.path),
            deadline=min(retry_deadline, OPEN_RETRY_DEADLINE),
        )
        store = Store(retrying)
        if not probe:  # the caller's own first request will tell (mount fast path)
            retrying.deadline = retry_deadline
            return store
        try:
            # The first request: a store that cannot be reached at all is a configuration
            # problem (wrong endpoint, server down), reported in seconds, not after the
            # full retry budget that later requests get for passing trouble.
            store.check_format(create=create)
        except TransientStoreError as exc:
            raise StoreUnreachable(str(exc)) from exc
        retrying.deadline = retry_deadline
        return store
    else:
        raise BadStoreURL(f"bad store URL {url!r}: use file:///abs/path or s3://bucket/prefix")
    store.check_format(create=create)
    return store
