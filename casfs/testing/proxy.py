"""Owns ``LatencyProxy``: an HTTP/1.1-aware TCP proxy in front of an S3 server.

It delays every request by ``latency_ms`` (a simulated round trip to a remote store), counts
requests and bytes per method, and injects faults (error responses, connection resets, extra
delay) with seeded probabilities. One thread per client connection; each client connection
gets its own keep-alive upstream connection. Understands Content-Length and chunked bodies,
HEAD/204/304 responses without body, and ``Expect: 100-continue`` (boto3 uploads).

CLI: ``python -m casfs.testing.proxy --listen 127.0.0.1:0 --upstream 127.0.0.1:8333
--latency-ms 20`` prints the listening port and serves until interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

__all__ = ["LatencyProxy", "main"]

_BUF = 64 * 1024
_MAX_HEAD = 64 * 1024


class _ConnectionClosed(Exception):
    """The peer closed the connection (cleanly, between messages)."""


@dataclass
class _Head:
    start_line: str
    headers: list[tuple[str, str]]
    raw: bytes

    def get(self, name: str) -> str | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    def has_token(self, name: str, token: str) -> bool:
        value = self.get(name)
        return value is not None and token in [t.strip().lower() for t in value.split(",")]


@dataclass
class _MethodStats:
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    body_bytes_up: int = 0
    body_bytes_down: int = 0


@dataclass
class _Stats:
    by_method: dict[str, _MethodStats] = field(default_factory=lambda: defaultdict(_MethodStats))
    by_status: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    connections: int = 0
    injected_errors: int = 0
    injected_resets: int = 0
    injected_delays: int = 0
    continues: int = 0


def _read_head(reader: io.BufferedReader) -> _Head:
    """Read a request/response head; raise _ConnectionClosed on EOF before any byte."""
    lines: list[bytes] = []
    size = 0
    while True:
        line = reader.readline(_MAX_HEAD + 1)
        if not line:
            if not lines:
                raise _ConnectionClosed
            raise ConnectionError("connection closed inside an HTTP head")
        if not lines and line in (b"\r\n", b"\n"):
            continue  # tolerate stray CRLF between messages (RFC 9112 2.2)
        size += len(line)
        if size > _MAX_HEAD:
            raise ConnectionError("HTTP head too large")
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            break
    text = [ln.decode("latin-1").rstrip("\r\n") for ln in lines[:-1]]
    headers = []
    for h in text[1:]:
        k, _, v = h.partition(":")
        headers.append((k.strip(), v.strip()))
    return _Head(text[0], headers, b"".join(lines))


class _Sink:
    """Counts bytes into the proxy's stats *before* sending them, so that a client which has
    seen a whole response always finds it in ``stats()``. ``sock=None`` discards."""

    def __init__(
        self, proxy: LatencyProxy, method: str, sock: socket.socket | None, direction: str
    ) -> None:
        self.proxy, self.method, self.sock = proxy, method, sock
        self.wire_key, self.body_key = f"bytes_{direction}", f"body_bytes_{direction}"

    def __call__(self, data: bytes, payload: int = 0) -> None:
        self.proxy._count(self.method, **{self.wire_key: len(data), self.body_key: payload})
        if self.sock is not None:
            self.sock.sendall(data)


def _relay_exact(reader: io.BufferedReader, sink: _Sink, n: int, payload: bool = True) -> None:
    left = n
    while left:
        data = reader.read(min(_BUF, left))
        if not data:
            raise ConnectionError("connection closed inside a body")
        sink(data, len(data) if payload else 0)
        left -= len(data)


def _relay_chunked(reader: io.BufferedReader, sink: _Sink) -> None:
    """Relay a chunked body including trailers."""
    while True:
        line = reader.readline(_MAX_HEAD)
        if not line:
            raise ConnectionError("connection closed inside a chunked body")
        sink(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers up to the empty line
                t = reader.readline(_MAX_HEAD)
                if not t:
                    raise ConnectionError("connection closed inside chunked trailers")
                sink(t)
                if t in (b"\r\n", b"\n"):
                    return
        _relay_exact(reader, sink, size)
        _relay_exact(reader, sink, 2, payload=False)  # CRLF after the data


def _relay_until_close(reader: io.BufferedReader, sink: _Sink) -> None:
    while data := reader.read1(_BUF):
        sink(data, len(data))


def _relay_body(reader: io.BufferedReader, sink: _Sink, head: _Head) -> None:
    """Relay a message body framed by ``head`` (chunked or Content-Length)."""
    if head.has_token("transfer-encoding", "chunked"):
        _relay_chunked(reader, sink)
    else:
        _relay_exact(reader, sink, int(head.get("content-length") or 0))


def _closed_by_peer(sock: socket.socket, reader: io.BufferedReader) -> bool:
    """Whether an idle keep-alive connection was closed by the server."""
    return bool(select.select([sock], [], [], 0)[0]) and not reader.peek(1)


def _reset(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class LatencyProxy:
    """Delay, count and optionally break HTTP/1.1 requests to ``upstream_host:upstream_port``.

    Fault knobs (attributes, may be changed while running; decided per request with a
    ``random.Random(seed)``): ``error_rate`` answers ``error_status`` (503 SlowDown by default)
    without forwarding; ``reset_rate`` resets the client connection instead of answering;
    ``delay_rate`` adds ``extra_delay_ms`` on top of ``latency_ms``.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        latency_ms: float = 0.0,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        error_rate: float = 0.0,
        error_status: int = 503,
        reset_rate: float = 0.0,
        delay_rate: float = 0.0,
        extra_delay_ms: float = 0.0,
        seed: int | None = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency_ms = latency_ms
        self.error_rate = error_rate
        self.error_status = error_status
        self.reset_rate = reset_rate
        self.delay_rate = delay_rate
        self.extra_delay_ms = extra_delay_ms
        self._rng = random.Random(seed)
        self._listen = (listen_host, listen_port)
        self._lock = threading.Lock()
        self._stats = _Stats()
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self.port = 0

    @property
    def host(self) -> str:
        return self._listen[0]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- stats ----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since start/reset.

        ``requests``/``bytes_*`` are totals over ``by_method``; ``bytes_*`` count heads and
        bodies on the wire, ``body_bytes_*`` only payload (chunked framing removed); ``*_up`` is
        client to server, ``*_down`` is responses (including relayed 100 Continue heads).
        ``continues`` counts ``100 Continue`` handshakes; ``injected_*`` count faults.
        """
        with self._lock:
            s = self._stats
            by_method = {m: vars(ms).copy() for m, ms in s.by_method.items()}
            total = {
                k: sum(ms[k] for ms in by_method.values())
                for k in ("requests", "bytes_up", "bytes_down", "body_bytes_up", "body_bytes_down")
            }
            return {
                **total,
                "by_method": by_method,
                "by_status": dict(s.by_status),
                "connections": s.connections,
                "injected_errors": s.injected_errors,
                "injected_resets": s.injected_resets,
                "injected_delays": s.injected_delays,
                "continues": s.continues,
            }

    def reset(self) -> None:
        with self._lock:
            self._stats = _Stats()

    def _count(self, method: str, **deltas: int) -> None:
        with self._lock:
            ms = self._stats.by_method[method]
            for k, v in deltas.items():
                setattr(ms, k, getattr(ms, k) + v)

    def _roll(self, rate: float) -> bool:
        if rate <= 0:
            return False
        with self._lock:
            return self._rng.random() < rate

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LatencyProxy:
        if self._sock is not None:
            return self
        self._stopping.clear()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self._listen)
        sock.listen(128)
        sock.settimeout(0.2)
        self._sock = sock
        self.port = sock.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"proxy-accept-{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every live connection and join the threads."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Block until ``stop()`` is called (from a signal handler or another thread)."""
        self.start()
        while not self._stopping.wait(0.5):
            pass

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._serve_client, args=(client,), daemon=True)
            with self._lock:
                self._stats.connections += 1
                self._conns.add(client)
                self._threads.add(t)
            t.start()

    # -- per connection -------------------------------------------------------------------

    def _connect_upstream(self) -> tuple[socket.socket, io.BufferedReader]:
        up = socket.create_connection(self.upstream, timeout=60)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns.add(up)
        return up, up.makefile("rb", buffering=_BUF)  # type: ignore[return-value]

    def _drop(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._conns.discard(sock)
        with contextlib.suppress(OSError):
            sock.close()

    def _serve_client(self, client: socket.socket) -> None:
        creader: io.BufferedReader = client.makefile("rb", buffering=_BUF)  # type: ignore[assignment]
        up: socket.socket | None = None
        ureader: io.BufferedReader | None = None
        try:
            while not self._stopping.is_set():
                try:
                    req = _read_head(creader)
                except _ConnectionClosed:
                    return
                method = req.start_line.split(" ", 1)[0].upper()
                self._count(method, requests=1)
                # Latency and faults are decided before anything reaches upstream.
                delay = self.latency_ms
                if self._roll(self.delay_rate):
                    delay += self.extra_delay_ms
                    with self._lock:
                        self._stats.injected_delays += 1
                if delay > 0:
                    time.sleep(delay / 1000)
                if self._roll(self.reset_rate):
                    self._count(method, bytes_up=len(req.raw))
                    with self._lock:
                        self._stats.injected_resets += 1
                    _reset(client)
                    return
                if self._roll(self.error_rate):
                    if not self._inject_error(client, creader, req, method):
                        return
                    continue
                # Reconnect if upstream closed our idle keep-alive connection.
                if up is not None and ureader is not None and _closed_by_peer(up, ureader):
                    self._drop(up)
                    up = None
                if up is None:
                    up, ureader = self._connect_upstream()
                assert ureader is not None
                keep = self._forward(client, creader, up, ureader, req, method)
                if not keep:
                    return
        except (OSError, ConnectionError, ValueError):
            return
        finally:
            self._drop(up)
            with contextlib.suppress(OSError):
                creader.close()
            self._drop(client)
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _inject_error(
        self, client: socket.socket, creader: io.BufferedReader, req: _Head, method: str
    ) -> bool:
        """Answer ``error_status`` without forwarding; return whether to keep the connection."""
        self._count(method, bytes_up=len(req.raw))
        expect = req.has_token("expect", "100-continue")
        if not expect:  # the body is on its way: swallow it to keep the connection usable
            _relay_body(creader, _Sink(self, method, None, "up"), req)
        code = "SlowDown" if self.error_status == 503 else "InternalError"
        reason = "Slow Down" if self.error_status == 503 else "Internal Server Error"
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>Injected by LatencyProxy</Message>"
            "<RequestId>casfs-proxy</RequestId></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {self.error_status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Connection: {'close' if expect else 'keep-alive'}\r\n\r\n"
        ).encode()
        with self._lock:
            self._stats.injected_errors += 1
            self._stats.by_status[self.error_status] += 1
        down = _Sink(self, method, client, "down")
        if method == "HEAD":
            down(head)
        else:
            down(head + body, len(body))
        return not expect

    def _forward(
        self,
        client: socket.socket,
        creader: io.BufferedReader,
        up: socket.socket,
        ureader: io.BufferedReader,
        req: _Head,
        method: str,
    ) -> bool:
        """Forward one exchange; return whether both connections stay usable."""
        up_sink = _Sink(self, method, up, "up")
        down = _Sink(self, method, client, "down")
        up_sink(req.raw)
        expect = req.has_token("expect", "100-continue")
        resp: _Head | None = None
        if expect:
            while True:  # wait for 100 Continue (relay it) or an early final answer
                resp = _read_head(ureader)
                status = int(resp.start_line.split()[1])
                if status >= 200:
                    break
                if status == 100:
                    with self._lock:
                        self._stats.continues += 1
                down(resp.raw)
                if status == 100:
                    resp = None
                    break
        body_sent = resp is None
        if body_sent:
            _relay_body(creader, up_sink, req)
        while resp is None:
            resp = _read_head(ureader)
            status = int(resp.start_line.split()[1])
            if 100 <= status < 200 and status != 101:
                down(resp.raw)  # informational: relay and read the next head
                resp = None
        assert resp is not None
        status = int(resp.start_line.split()[1])
        with self._lock:
            self._stats.by_status[status] += 1
        down(resp.raw)
        keep = body_sent and not (
            resp.has_token("connection", "close")
            or req.has_token("connection", "close")
            or resp.start_line.startswith("HTTP/1.0")
        )
        if method == "HEAD" or status in (204, 304, 101):
            pass
        elif resp.has_token("transfer-encoding", "chunked") or resp.get("content-length"):
            _relay_body(ureader, down, resp)
        else:
            _relay_until_close(ureader, down)
            keep = False
        return keep and status != 101


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m casfs.testing.proxy", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on")
    p.add_argument("--upstream", required=True, help="host:port of the S3 server")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--error-rate", type=float, default=0.0)
    p.add_argument("--error-status", type=int, default=503)
    p.add_argument("--reset-rate", type=float, default=0.0)
    p.add_argument("--delay-rate", type=float, default=0.0)
    p.add_argument("--extra-delay-ms", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    lhost, lport = _hostport(a.listen)
    uhost, uport = _hostport(a.upstream)
    proxy = LatencyProxy(
        uhost,
        uport,
        a.latency_ms,
        listen_host=lhost,
        listen_port=lport,
        error_rate=a.error_rate,
        error_status=a.error_status,
        reset_rate=a.reset_rate,
        delay_rate=a.delay_rate,
        extra_delay_ms=a.extra_delay_ms,
        seed=a.seed,
    )
    proxy.start()
    print(proxy.port, flush=True)

    def _on_signal(signum: int, frame: object) -> None:
        proxy._stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    proxy.serve_forever()
    proxy.stop()
    print(proxy.stats(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
