"""Hostile network peers: an S3 endpoint that answers huge or malformed bodies.

The endpoint here is a fake on purpose: it plays a hostile (or broken) S3-compatible
server, which no real one can be made to be. It counts the body bytes it manages to
send before the client hangs up, so a test can tell that casfs read at most the cap
(plus what the kernel's socket buffers absorb), not the gigabytes on offer; the test
process's peak RSS is checked too.
"""

from __future__ import annotations

import datetime
import gzip
import http.server
import re
import resource
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from casfs.errors import ResponseTooLarge, StoreError, TransientStoreError
from casfs.store import Store
from casfs.store.s3 import S3Backend, frame_bound, read_limit
from casfs.store.url import open_store

GIB = 1 << 30
MIB = 1 << 20
HUGE = GIB  # what the endpoint offers
STREAMED = 256 * MIB  # what it streams when it declares no length (old code read it all)
SOCKET_SLACK = 48 * MIB  # what the kernel's socket buffers may take on top of the cap
MARKER = b'{"format": "casfs-store", "version": 1}'
LISTING_HEAD = (b'<?xml version="1.0" encoding="UTF-8"?>\n'
                b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">')


def _listing(entries: list[tuple[str, str, str]], token: str | None = None) -> bytes:
    body = [LISTING_HEAD]
    for key, size, mtime in entries:
        body.append(f"<Contents><Key>{key}</Key><Size>{size}</Size>"
                    f"<LastModified>{mtime}</LastModified></Contents>".encode())
    if token:
        body.append(f"<IsTruncated>true</IsTruncated><NextContinuationToken>{token}"
                    "</NextContinuationToken>".encode())
    else:
        body.append(b"<IsTruncated>false</IsTruncated>")
    body.append(b"</ListBucketResult>")
    return b"".join(body)


Handler = Callable[["_Request"], None]


class _Request(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path, dict(self.headers)))
        self.server.answer(self)

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path, dict(self.headers)))
        self.reply(404, b"")

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.send(body)

    def send(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
        except OSError:
            self.close_connection = True
            return False
        self.server.sent += len(data)
        return True

    def stream(self, status: int, total: int, *, declare: bool, piece: bytes = b"\0" * (256 << 10),
               headers: dict[str, str] | None = None) -> None:
        """`total` bytes of body in pieces until the client hangs up; declared as
        Content-Length, or sent chunked."""
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if declare:
            self.send_header("Content-Length", str(total))
        else:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        left = total
        while left > 0:
            n = min(left, len(piece))
            frame = piece[:n] if declare else b"%x\r\n%s\r\n" % (n, piece[:n])
            if not self.send(frame):
                return
            left -= n
        if not declare:
            self.send(b"0\r\n\r\n")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Request)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.sent = 0
        self.handler: Handler = lambda r: r.reply(404, b"<Error><Code>NoSuchKey</Code></Error>")

    def answer(self, r: _Request) -> None:
        r.connection.settimeout(20)
        if r.path.endswith("/casfs-store.json") and self.handler is not _marker_bomb:
            r.reply(200, MARKER)
            return
        self.handler(r)


def _marker_bomb(r: _Request) -> None:
    r.stream(200, HUGE, declare=True)


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[_Server]:
    server = _Server()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_address[1]}",
        "AWS_ACCESS_KEY_ID": "hostile", "AWS_SECRET_ACCESS_KEY": "hostile-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "CASFS_RETRY_DEADLINE": "1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _store(url: str = "s3://bucket/p") -> Store:
    """The store as casfs opens it (retrying wrapper and all)."""
    return open_store(url, probe=False, retry_deadline=1.0)


def _backend() -> S3Backend:
    """The S3 backend alone: no retries, so one request is one answer."""
    return S3Backend("bucket", "p")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Bounded:
    """Checks that what happens inside reads no more than `cap` bytes (plus socket
    buffers) from the endpoint and grows the process's peak RSS by little."""

    def __init__(self, server: _Server, cap: int) -> None:
        self.server, self.cap = server, cap

    def __enter__(self) -> _Bounded:
        self.server.sent = 0
        self.rss = _peak_rss()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # let the server notice the hang-up
        assert self.server.sent <= self.cap + SOCKET_SLACK, self.server.sent
        assert _peak_rss() - self.rss <= self.cap + 64 * MIB


def _too_large_in_chain(exc: BaseException) -> ResponseTooLarge:
    """The ResponseTooLarge behind a store error (the content layer may wrap it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ResponseTooLarge):
            assert "response too large" in str(seen)
            return seen
        seen = seen.__cause__ or seen.__context__
    raise AssertionError(f"no ResponseTooLarge behind {exc!r}")


# --- whole-object GETs ---------------------------------------------------------------


def test_huge_store_marker_is_refused_without_reading_it(hostile: _Server) -> None:
    """`casfs tag ls` against an endpoint answering 1 GiB for the 39-byte marker: a clear
    error at once (the length is declared: nothing of the body needs reading)."""
    hostile.handler = _marker_bomb
    with _Bounded(hostile, 64 << 10), pytest.raises(StoreError) as info:
        open_store("s3://bucket/p", retry_deadline=1.0).list_tags()
    assert "declares 1073741824 bytes" in str(_too_large_in_chain(info.value))


@pytest.mark.parametrize("key_kind", ["tag", "blob", "trace", "manifest"])
def test_undeclared_huge_bodies_are_cut_at_the_cap(hostile: _Server, key_kind: str) -> None:
    """A chunked body of no declared length is read to the object's cap and no further."""
    hostile.handler = lambda r: r.stream(200, STREAMED, declare=False)
    store = _store()
    digest = "ab" * 32
    call, key = {
        "tag": (lambda: store.get_tag("latest"), "tags/latest"),
        "blob": (lambda: store.get_blob(digest), f"blobs/ab/{digest}"),
        "trace": (lambda: store.get_trace(digest, "t1", 64 << 20), f"traces/m/{digest}/t1"),
        "manifest": (lambda: store.get_manifest(digest), f"manifests/{digest}"),
    }[key_kind]
    cap = read_limit(key)
    if cap >= STREAMED:  # a manifest may be 1 GiB: what is streamed fits; shrink the cap
        cap = 8 * MIB
        backend = _backend()
        with _Bounded(hostile, cap), pytest.raises(ResponseTooLarge, match="response too large"):
            backend.get(key, max_bytes=cap)
        return
    with _Bounded(hostile, cap), pytest.raises(StoreError) as info:
        call()
    _too_large_in_chain(info.value)


def test_declared_huge_blob_is_refused(hostile: _Server) -> None:
    hostile.handler = lambda r: r.stream(200, HUGE, declare=True)
    store = _store()
    with _Bounded(hostile, 0), pytest.raises(StoreError) as info:
        store.get_blob("cd" * 32)
    _too_large_in_chain(info.value)


def test_read_limits_follow_the_store_format() -> None:
    from casfs.packindex import MAX_STORED_LENGTH
    from casfs.store.content import MAX_BLOB_SIZE, MAX_MANIFEST_SIZE
    from prefetch.trace import MAX_TRACE_BYTES

    d = "ab" * 32
    assert read_limit("casfs-store.json") <= 64 << 10
    assert read_limit(f"tags/{'x' * 200}") <= 64 << 10
    assert read_limit(f"blobs/ab/{d}") == frame_bound(MAX_BLOB_SIZE) <= MAX_STORED_LENGTH
    # Never below what prefetch accepts (the content layer passes its exact bound).
    assert read_limit(f"traces/m/{d}/t") >= frame_bound(MAX_TRACE_BYTES)
    assert read_limit(f"manifests/{d}") == frame_bound(MAX_MANIFEST_SIZE)
    # A stored blob's largest legitimate frame fits its cap.
    import os

    from casfs.store.content import compress

    assert len(compress(os.urandom(MAX_BLOB_SIZE))) <= read_limit(f"blobs/ab/{d}")


def test_gzip_encoded_answer_is_not_inflated(hostile: _Server) -> None:
    """A Content-Encoding: gzip answer of a few KiB that would inflate to 256 MiB is
    taken as sent (the stored bytes), not decoded: a bad blob, not a memory bomb."""
    bomb = gzip.compress(b"\0" * STREAMED, 9)
    hostile.handler = lambda r: r.reply(200, bomb, {"Content-Encoding": "gzip"})
    backend = _store().backend
    with _Bounded(hostile, len(bomb)):
        assert backend.get("blobs/ab/" + "ab" * 32) == bomb


def test_huge_error_body_is_cut(hostile: _Server) -> None:
    """A 503 with a 1 GiB body: the code is looked for in its first 64 KiB, the rest is
    dropped with the connection."""
    head = b"<Error><Code>SlowDown</Code></Error>"
    hostile.handler = lambda r: r.stream(503, HUGE, declare=True, piece=head.ljust(256 << 10))
    backend = _backend()
    with _Bounded(hostile, 0), pytest.raises(TransientStoreError, match="SlowDown"):
        backend.get("tags/x")


def test_boto3_resolved_credentials_path_is_bounded(hostile: _Server, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With credentials only boto3's chain resolves (a shared credentials file), requests
    still go through the same bounded path."""
    creds = tmp_path / "credentials"
    creds.write_text("[default]\naws_access_key_id = k\naws_secret_access_key = s\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    hostile.handler = _marker_bomb
    backend = S3Backend("bucket", "p")
    with _Bounded(hostile, 64 << 10), pytest.raises(StoreError, match="response too large"):
        backend.get("casfs-store.json")
    assert backend._client_started  # boto3 resolved the settings


# --- ranged GETs -----------------------------------------------------------------------


def _range(r: _Request) -> tuple[int, int]:
    m = re.fullmatch(r"bytes=(\d+)-(\d+)", r.headers.get("Range", ""))
    assert m
    return int(m.group(1)), int(m.group(2))


def test_ranged_answer_longer_than_the_range_is_refused(hostile: _Server) -> None:
    def answer(r: _Request) -> None:
        start, _end = _range(r)
        r.stream(206, STREAMED, declare=False,
                 headers={"Content-Range": f"bytes {start}-{start + STREAMED - 1}/*"})

    hostile.handler = answer
    backend = _store().backend
    with _Bounded(hostile, 4096), pytest.raises(StoreError, match="response too large"):
        backend.get_range("packs/" + "ab" * 32, 1000, 4096)


def test_ranged_answer_from_the_wrong_offset_is_refused(hostile: _Server) -> None:
    hostile.handler = lambda r: r.reply(206, b"x" * 10, {"Content-Range": "bytes 0-9/100"})
    with pytest.raises(StoreError, match="Content-Range"):
        _store().backend.get_range("packs/" + "ab" * 32, 50, 10)


def test_server_ignoring_range_is_read_only_to_the_range(hostile: _Server) -> None:
    """A 200 with the whole (huge) object: the range is cut out of the stream, and the
    rest is not read."""
    pattern = bytes(range(256)) * 1024  # 256 KiB, so offsets are recognisable

    hostile.handler = lambda r: r.stream(200, HUGE, declare=True, piece=pattern)
    backend = _store().backend
    with _Bounded(hostile, 3 * MIB):
        got = backend.get_range("packs/" + "ab" * 32, 2 * MIB + 5, 1000)
    assert got == (pattern * 2)[5:1005]


# --- listings ------------------------------------------------------------------------


NOW = "2026-12-01T10:00:00.000Z"


@pytest.mark.parametrize(("entries", "token", "match"), [
    ([("p/tags/a", "12abc", NOW)], None, "size"),
    ([("p/tags/a", "-1", NOW)], None, "size"),
    ([("p/tags/a", "1", "yesterday")], None, "LastModified"),
    ([("p/tags/a", "1", "")], None, "LastModified"),
    ([("other/tags/a", "1", NOW)], None, "not under it"),
    ([("p/tags/a", "1", NOW)], "same-token", "repeats"),
])
def test_malformed_listing_is_a_store_error(hostile: _Server, entries: list[tuple[str, str, str]],
                                            token: str | None, match: str) -> None:
    body = _listing(entries, token)
    hostile.handler = lambda r: r.reply(200, body, {"Content-Type": "application/xml"})
    store = _store()
    with pytest.raises(StoreError, match=match):
        store.list_tags()
    with pytest.raises(StoreError, match=match):
        list(store.backend.list_info("tags/"))


def test_listing_with_a_dtd_is_refused(hostile: _Server) -> None:
    body = (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
            + _listing([("p/tags/&b;", "1", NOW)]).split(b"\n", 1)[1])
    hostile.handler = lambda r: r.reply(200, body)
    with pytest.raises(StoreError, match="DTD"):
        _store().list_tags()


def test_unparseable_listing_is_a_store_error(hostile: _Server) -> None:
    hostile.handler = lambda r: r.reply(200, b"<ListBucketResult><Contents>")
    with pytest.raises(StoreError, match="unreadable"):
        _store().list_tags()


def test_huge_listing_page_is_cut(hostile: _Server) -> None:
    hostile.handler = lambda r: r.stream(200, STREAMED, declare=False, piece=b" " * (256 << 10))
    with _Bounded(hostile, 16 * MIB), pytest.raises(StoreError, match="response too large"):
        _store().list_tags()


def test_valid_listing_still_reads(hostile: _Server) -> None:
    body = _listing([("p/tags/a", "65", NOW), ("p/tags/b", "65", "2026-12-01T10:00:00Z")])
    hostile.handler = lambda r: r.reply(200, body)
    info = list(_store().backend.list_info("tags/"))
    assert [(k, s) for k, s, _ in info] == [("tags/a", 65), ("tags/b", 65)]
    want = datetime.datetime(2026, 12, 1, 10, tzinfo=datetime.UTC).timestamp()
    assert all(m == want for _, _, m in info)


def test_connections_are_not_reused_after_a_cut(hostile: _Server) -> None:
    """After a cut answer the next request gets a fresh connection and a clean answer
    (nothing of the cut body is taken for the next response)."""
    calls: list[int] = []

    def answer(r: _Request) -> None:
        calls.append(1)
        if len(calls) == 1:
            r.stream(200, STREAMED, declare=True)
        else:
            r.reply(200, b"blake3:" + b"ab" * 32)

    hostile.handler = answer
    backend = _store().backend
    with pytest.raises(StoreError, match="response too large"):
        backend.get("tags/a")
    assert backend.get("tags/b") == b"blake3:" + b"ab" * 32

