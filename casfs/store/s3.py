"""The S3-compatible backend (`s3://bucket/prefix`): AWS S3, R2, SeaweedFS, MinIO.

Endpoint, region and credentials come from the standard AWS settings
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, profiles, ...), so no casfs-specific
settings exist: read from the environment when it says everything, else resolved once
through boto3's chain (the only use of boto3, and the only module that imports it).
Every request (GET, ranged GET, HEAD, PUT, DELETE, list) goes through
casfs.store.s3http, signed by casfs.store.sigv4. S3 PUTs are atomic, which gives the
backend contract's no-partial-object rule for free.

Every response is read to a cap, never whole (an endpoint answering gigabytes for the
39-byte store marker must not take the process's memory): a whole-object GET to the
`max_bytes` its caller gives, else to what the store format lets an object under that key
be (`read_limit`: a zstd frame of at most 64 MiB for a blob, a few KiB for the marker or a
tag, ...); a ranged GET to the range asked for; listings, HEAD, PUT and DELETE answers to
small fixed caps (casfs.store.s3http). A longer answer is a StoreError ("response too
large").
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from casfs.errors import (
    ObjectNotFound,
    StoreError,
    StoreUnreachable,
    TransientStoreError,
)
from casfs.store.content import MAX_BLOB_SIZE, MAX_MANIFEST_SIZE, STORE_MARKER

if TYPE_CHECKING:
    from casfs.store.s3http import S3Http
    from casfs.store.sigv4 import S3Settings

SMALL_OBJECT_LIMIT = 64 << 10
"""The store marker (39 bytes), a tag (a digest), a lock (a line of JSON), a trace pointer
(empty)."""
TRACE_BYTES = 64 << 20
"""At least the largest trace prefetch reads (prefetch.trace.MAX_TRACE_BYTES, not
imported: the store does not depend on prefetch; docs/security.md's 64 MiB)."""


def frame_bound(content: int) -> int:
    """The most bytes one zstd frame of `content` bytes of content takes (zstd's own bound
    is content + content/256 + a few hundred bytes; this is generous)."""
    return content + (content >> 7) + 1024


_limits: list[tuple[str, int]] = []


def read_limit(key: str) -> int:
    """The most bytes a whole-object GET of `key` may answer when its caller names no
    bound: what the store format (casfs.store.content) lets an object under that key be,
    compressed. The content layer passes each kind's exact bound as max_bytes; this is
    the floor under every other caller."""
    if not _limits:
        from casfs.packindex import MAX_INDEX_BYTES

        _limits.extend([
            ("blobs/", frame_bound(MAX_BLOB_SIZE)),
            ("manifests/", frame_bound(MAX_MANIFEST_SIZE)),
            ("layers/", frame_bound(MAX_MANIFEST_SIZE)),
            ("packidx/", frame_bound(MAX_INDEX_BYTES)),
            ("traces/m/", frame_bound(TRACE_BYTES)),
            ("traces/l/", SMALL_OBJECT_LIMIT),
            ("tags/", SMALL_OBJECT_LIMIT),
            ("locks/", SMALL_OBJECT_LIMIT),
        ])
    if key == STORE_MARKER:
        return SMALL_OBJECT_LIMIT
    for prefix, limit in _limits:
        if key.startswith(prefix):
            return limit
    # Anything else (a pack, read whole by no one; an object of another tool): the
    # largest object casfs reads whole.
    return frame_bound(MAX_MANIFEST_SIZE)


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_UNREACHABLE = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "403",
    "AllAccessDisabled",
}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "InternalError",
    "ServiceUnavailable",
    "500",
    "502",
    "503",
    "504",
}


def _classify(exc: BaseException, what: str, url: str, endpoint: str = "") -> StoreError:
    """Turn a boto3 exception into the backend contract's error classes."""
    import botocore.exceptions

    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND:
            return ObjectNotFound(f"object {what} not found in {url}")
        if code in _UNREACHABLE:
            return StoreUnreachable(f"store {url} refused access ({code}: {err.get('Message', '')})")
        if code in _TRANSIENT or status >= 500:
            return TransientStoreError(f"store {url} failed on {what}: {code} (HTTP {status})")
        return StoreError(f"store {url} failed on {what}: {code} (HTTP {status})")
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreUnreachable(f"no credentials for {url} (set AWS_ACCESS_KEY_ID / a profile)")
    if isinstance(
        exc,
        botocore.exceptions.EndpointConnectionError
        | botocore.exceptions.ConnectionClosedError
        | botocore.exceptions.ReadTimeoutError
        | botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ResponseStreamingError
        | botocore.exceptions.IncompleteReadError,
    ):
        at = f" at {endpoint}" if endpoint else ""
        return TransientStoreError(f"cannot reach store {url}{at} ({type(exc).__name__}) on {what}")
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StoreError(f"store {url} failed on {what}: {exc}")
    return StoreError(f"store {url} failed on {what}: {exc!r}")


class S3Backend:
    """Objects in an S3 bucket under a key prefix."""

    def __init__(self, bucket: str, prefix: str = "", *, max_connections: int = 64) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout = float(os.environ.get("CASFS_S3_CONNECT_TIMEOUT", "5"))
        self.read_timeout = float(os.environ.get("CASFS_S3_READ_TIMEOUT", "30"))
        self._fast: S3Http | None = None
        self._fast_lock = threading.Lock()
        self._client_started = False
        self._client_ready = threading.Event()
        self._made: Any = None
        self._error: BaseException | None = None

    def start_client(self) -> None:
        """Begin building the boto3 client (importing boto3 and resolving endpoint,
        region and credentials: ~0.2-0.4 s of CPU) in the background. The first request
        does this itself; calling it early overlaps that cost with other start-up work."""
        with self._fast_lock:
            if self._client_started:
                return
            self._client_started = True
        threading.Thread(target=self._make_client, name="s3-client", daemon=True).start()

    def _make_client(self) -> None:
        try:
            import boto3
            import botocore.config

            config = botocore.config.Config(
                max_pool_connections=self.max_connections,
                connect_timeout=self.connect_timeout,
                read_timeout=self.read_timeout,
                # casfs retries in its own wrapper, with its own time bound.
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            )
            self._made = boto3.session.Session().client("s3", config=config)
        except BaseException as exc:  # reported to the first caller
            self._error = exc
        finally:
            self._client_ready.set()

    @property
    def _client(self) -> Any:
        self.start_client()
        self._client_ready.wait()
        if self._error is not None:
            raise _classify(self._error, "creating the S3 client", self.url, "") from self._error
        return self._made

    @property
    def endpoint(self) -> str:
        if not self._client_started:
            return ""
        self._client_ready.wait()
        return self._made.meta.endpoint_url if self._made is not None else ""

    def _key(self, key: str) -> str:
        return self.prefix + key

    @property
    def _http(self) -> S3Http:
        if self._fast is None:
            from casfs.store.s3http import S3Http

            settings = self._settings()
            with self._fast_lock:
                if self._fast is None:
                    self._fast = S3Http(
                        settings, self.bucket, self.url,
                        max_connections=self.max_connections,
                        connect_timeout=self.connect_timeout,
                        read_timeout=self.read_timeout,
                    )
        return self._fast

    def _settings(self) -> S3Settings:
        """Endpoint, region and credentials: the environment's when complete (no boto3
        needed), else what boto3's chain resolved (raises the client's creation error)."""
        from casfs.store.sigv4 import S3Settings, from_environment

        env = from_environment()
        if env is not None:
            return env
        client = self._client
        return S3Settings(client.meta.endpoint_url, client.meta.region_name or "us-east-1",
                          client._request_signer._credentials)

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The whole object, of at most max_bytes (None: read_limit(key)) bytes; a longer
        answer raises StoreError ("response too large"), having read no more than that."""
        http = self._http
        limit = read_limit(key) if max_bytes is None else max_bytes
        reply = http.request("GET", self._key(key), limit=limit)
        http.check(reply, key)
        return reply.data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length): an answer longer than length is a StoreError
        ("response too large"); one from a server that ignored the Range (the whole object)
        is read only up to offset+length, keeping the range."""
        if length <= 0:
            return b""
        from casfs.errors import RangeNotSatisfiable

        http = self._http
        reply = http.request("GET", self._key(key), limit=length, range_start=offset,
                             headers={"Range": f"bytes={offset}-{offset + length - 1}"})
        try:
            http.check(reply, key)
        except RangeNotSatisfiable:
            return b""
        return reply.data

    def put(self, key: str, data: bytes) -> None:
        # Content-MD5 makes the server check the body it got: without it, SeaweedFS
        # stores an empty object when the connection closes right after the headers (a
        # writer killed mid-upload behind a proxy that forwards headers first).
        http = self._http
        body = bytes(data)
        md5 = base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()
        http.check(http.request("PUT", self._key(key), body=body, cut=True,
                                headers={"Content-MD5": md5}), key)

    def exists(self, key: str) -> bool:
        http = self._http
        resp = http.request("HEAD", self._key(key), cut=True)
        if resp.status == 404:
            # HEAD has no body to tell a missing key from a missing bucket.
            return False
        http.check(resp, key)
        return True

    def size(self, key: str) -> int | None:
        """The object's size from one HEAD, None when it does not exist (-1: present, its
        Content-Length missing or not a number)."""
        http = self._http
        resp = http.request("HEAD", self._key(key), cut=True)
        if resp.status == 404:
            return None
        http.check(resp, key)
        length = resp.headers.get("Content-Length", "").strip()
        return int(length) if length.isascii() and length.isdigit() and len(length) < 20 else -1

    def delete(self, key: str) -> None:
        http = self._http
        resp = http.request("DELETE", self._key(key), cut=True)
        if resp.status != 404:  # deleting what is gone is done (S3 itself answers 204)
            http.check(resp, key)

    def list(self, prefix: str) -> Iterator[str]:
        for key, _size, _mtime in self.list_info(prefix):
            yield key

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        for key, size, mtime in self._http.list(self._key(prefix)):
            yield key[len(self.prefix) :], size, mtime

    def sync(self) -> None:
        """S3 puts are durable when they return."""

    def deferred_syncs(self) -> contextlib.AbstractContextManager[None]:
        """Nothing to defer: S3 puts are durable when they return."""
        return contextlib.nullcontext()
