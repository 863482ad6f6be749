"""Failover: a FUSE connection that outlives the process serving it.

A casfs mount is a container's root filesystem; its daemon may die (an OOM kill, a
crash, `kill -9`) or be replaced (an upgrade). The kernel keeps a FUSE connection alive
as long as any descriptor of its `/dev/fuse` file is open, so a long-lived *holder* (the
node agent, casfs.agent) keeps a duplicate of each serving process's descriptor, and
hands it to a new process when the old one exits:

- a serving process (a FUSE-mode mount daemon, or the kernel mode's node view) *links*
  to the holder of its cache directory (`<cache-dir>/agent.sock`) once its connection is
  initialised: one `hold` message with its descriptor (SCM_RIGHTS), the FUSE_INIT
  request its session answered (pyfuse3 failover patch), and what a successor needs to
  serve the same mount (settings, environment, manifest digest, log). The link stays
  open: the holder asks for stats on it (node metrics) and for a graceful handover
  (upgrades); the process says `release` before a clean unmount (nothing to restart).
  When the link breaks (the holder restarted or was killed) the process links again to
  whoever holds the socket next, so a mount started without an agent, or outliving one,
  is adopted by the next agent.
- when the process exits without `release`, the holder starts a new one with a
  `Takeover`: the descriptor and the recorded FUSE_INIT (pyfuse3.init_takeover). The
  successor serves the same inode numbers (manifest positions; the view's are derived
  from object names) and writes a FUSE_NOTIFY_RESEND notification (`notify_resend`):
  Linux 6.9+ puts every request the dead process had read but not answered back in the
  queue, and the successor answers them. Older kernels refuse the notification
  (EINVAL): the requests in flight at the crash are never answered (their callers stay
  blocked, killable), everything after is served.

Messages are JSON lines on a Unix stream socket; a message carrying descriptors says how
many (`"fds": n`) and they travel with its bytes (`Decoder` matches them up in order).
"""

from __future__ import annotations

import array
import base64
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOLD_PROTOCOL = 1
FUSE_NOTIFY_RESEND = 7  # Linux 6.9+: put requests being processed back in the queue
MAX_MESSAGE = 4 << 20
MAX_FDS = 8
RELINK_DELAYS = (0.0, 0.25, 0.5, 1.0, 2.0)  # after the holder's link broke, then every 2 s
HANDOVER_DRAIN_SECONDS = 2.0  # requests still running then are resent to the successor


def notify_resend(fd: int) -> bool:
    """Ask the kernel to queue again every request of this connection a process read
    and did not answer (FUSE_NOTIFY_RESEND: a fuse_out_header with unique 0 and the
    notification code as its error). False when the kernel does not know it (< 6.9)."""
    try:
        os.write(fd, struct.pack("<IiQ", 16, FUSE_NOTIFY_RESEND, 0))
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            return False
        raise
    return True


def connection_alive(fd: int) -> bool:
    """Whether a /dev/fuse descriptor's connection still stands (not unmounted, not
    aborted): the device polls POLLERR once it is gone."""
    import select

    poller = select.poll()
    poller.register(fd, 0)
    try:
        events = poller.poll(0)
    except OSError:
        return False
    return not any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
                   for _, ev in events)


@functools.cache
def code_fingerprint() -> str:
    """What code this process runs: casfs's version and the (path, size, mtime) of every
    source file of casfs, prefetch and indexer, and of the pyfuse3 build, as they were
    when first asked: the agent asks as it starts (the processes it forks inherit its
    answer), a process started otherwise when it first links, moments after it imported
    them. A holder replaces the processes whose fingerprint is not its own (an upgrade
    installed under them)."""
    from casfs import __version__

    h = hashlib.sha256(f"casfs {__version__}\n".encode())
    root = Path(__file__).resolve().parent.parent
    for package in ("casfs", "prefetch", "indexer"):
        for path in sorted((root / package).rglob("*.py")):
            with contextlib.suppress(OSError):
                st = path.stat()
                h.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    with contextlib.suppress(Exception):
        import importlib.util

        spec = importlib.util.find_spec("pyfuse3")
        if spec is not None and spec.origin:
            st = os.stat(spec.origin)
            h.update(f"pyfuse3\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class Takeover:
    """What a process needs to serve a connection another process served: its
    descriptor (this process's copy) and the FUSE_INIT its first session answered."""

    fd: int
    init: bytes
    reason: str = "crash"  # "crash": the last one exited unasked; "handover": asked to


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


# -- the wire -------------------------------------------------------------------------------


def encode(message: dict[str, Any], nfds: int = 0) -> bytes:
    if nfds:
        message = {**message, "fds": nfds}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def send_message(sock: socket.socket, message: dict[str, Any],
                 fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message (blocking), its descriptors with its bytes."""
    data = encode(message, len(fds))
    if fds:
        sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                      array.array("i", fds))])
        data = data[sent:]
    if data:
        sock.sendall(data)


class Decoder:
    """Bytes and descriptors as a stream socket delivers them, cut into messages, each
    with the descriptors it announced (descriptors arrive no later than the bytes of
    their message, in order)."""

    def __init__(self) -> None:
        self.buf = b""
        self.fds: list[int] = []

    def feed(self, data: bytes, fds: list[int]) -> None:
        self.buf += data
        self.fds.extend(fds)
        if len(self.buf) > MAX_MESSAGE and b"\n" not in self.buf:
            raise ValueError("message too large")

    def messages(self) -> list[tuple[dict[str, Any], list[int]]]:
        out: list[tuple[dict[str, Any], list[int]]] = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if not line.strip():
                out.append(({}, []))
                continue
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("a message must be an object")
            n = message.get("fds", 0)
            if not isinstance(n, int) or not 0 <= n <= MAX_FDS or n > len(self.fds):
                raise ValueError(f"bad descriptor count {n!r}")
            fds, self.fds = self.fds[:n], self.fds[n:]
            out.append((message, fds))
        return out

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


# -- the serving side: the link to the holder (in trio) --------------------------------------


async def _send_all(sock: Any, data: bytes) -> None:
    """All of data on a trio socket (one send() writes what the socket buffer takes:
    a large stats reply would otherwise be cut and break the framing)."""
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


class HoldLink:
    """A serving process's link to its holder. `describe()` gives the `hold` message
    (without descriptors), `fuse_fd()` the descriptor to hand, `stats()` what the holder
    asks for its node metrics; `handover(reason)` starts a graceful handover (stop
    reading requests, finish those running, hand the connection back: the caller says
    `release("handover")` once its session is closed)."""

    def __init__(self, cache_dir: str, describe: Callable[[], dict[str, Any]],
                 fuse_fd: Callable[[], int], stats: Callable[[], dict[str, Any]],
                 handover: Callable[[str], None],
                 preconnected: socket.socket | None = None) -> None:
        self.path = Path(cache_dir) / "agent.sock"
        self.describe = describe
        self.fuse_fd = fuse_fd
        self.stats = stats
        self.handover = handover
        self.preconnected = preconnected
        self.sock: Any = None  # the trio socket of the current link
        self.held = False  # a holder has this process's descriptor now
        self.released = False
        self._sending: Any = None  # a trio.Lock, made on the loop

    async def run(self) -> None:
        """Link, answer the holder, link again when it goes; until cancelled."""
        import trio

        failures = 0
        lost_at: float | None = None  # when the last link broke (None: never linked yet)
        warned = False
        while not self.released:
            raw = self.preconnected
            self.preconnected = None
            if raw is None:
                raw = await trio.to_thread.run_sync(self._connect)
            if raw is not None:
                try:
                    await self._serve(trio.socket.from_stdlib_socket(raw))
                except (OSError, ValueError) as exc:
                    log.debug("link to the holder lost: %s", exc)
                finally:
                    was_held, self.held, self.sock = self.held, False, None
                    with contextlib.suppress(OSError):
                        raw.close()
                    if was_held:
                        failures, lost_at, warned = 0, time.monotonic(), False
                        if not self.released:
                            log.info("the link to the holder closed; linking again")
            if self.released:
                return
            if lost_at is not None and not warned and time.monotonic() - lost_at > 5.0:
                warned = True
                log.warning("no holder: no failover until an agent serves %s again",
                            self.path.parent)
            await trio.sleep(RELINK_DELAYS[min(failures, len(RELINK_DELAYS) - 1)])
            failures += 1

    def _connect(self) -> socket.socket | None:
        from casfs.errors import ServiceUnavailable
        from casfs.process import connect_private

        code_fingerprint()  # the first time: a few ms of stat(), here rather than on the loop
        if not self.path.exists():
            return None
        try:
            return connect_private(self.path, timeout=5.0)
        except ServiceUnavailable:
            return None

    async def _serve(self, sock: Any) -> None:
        message = {"op": "hold", "protocol": HOLD_PROTOCOL, **self.describe()}
        data = encode(message, 1)
        sent = await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [self.fuse_fd()]))])
        await _send_all(sock, data[sent:])
        self.sock = sock
        self.held = True
        log.info("linked to the holder on %s (failover on)", self.path)
        decoder = Decoder()
        while True:
            data = await sock.recv(65536)
            if not data:
                return
            decoder.feed(data, [])
            for msg, _fds in decoder.messages():
                op = msg.get("op")
                if op == "stats":
                    reply = {"op": "stats", "id": msg.get("id"), "stats": self.stats()}
                    await self._send(reply)
                elif op == "handover":
                    reason = str(msg.get("reason", "restart"))
                    log.info("the holder asks for a handover (%s)", reason)
                    self.handover(reason)
                elif op == "ping":
                    await self._send({"op": "pong"})

    async def _send(self, message: dict[str, Any]) -> bool:
        import trio

        sock = self.sock
        if sock is None:
            return False
        if self._sending is None:
            self._sending = trio.Lock()
        try:
            async with self._sending:  # one message at a time: a send may be partial
                await _send_all(sock, encode(message))
            return True
        except OSError:
            return False

    async def send(self, message: dict[str, Any]) -> bool:
        """One message to the holder, if linked (an update of what it holds)."""
        return await self._send(message)

    async def release(self, reason: str) -> None:
        """Tell the holder to forget this connection (a clean unmount, or a handover
        done: do not restart anything on exit); bounded, best effort."""
        import trio

        self.released = True
        with trio.move_on_after(1.0):
            await self._send({"op": "release", "reason": reason})
