"""The node agent's event loop (casfs.agent says what the agent does; this is how):
one epoll loop, no threads, nothing blocking, because the agent forks warm children
and a forked threaded process is unsafe.

What it watches:

- its listening socket `<cache-dir>/agent.sock`: requests, one JSON line each, from
  `casfs mount` (a mount: fork a daemon), `casfs mount --mode kernel` (`view`: fork the
  node view), `casfs agent status|restart` (`status`, `handover`), and links of serving
  processes (`hold`: a descriptor to keep, see casfs.failover);
- each held connection: the serving process's pidfd (readable once it exited), its
  link (messages: stats, release, update), the /dev/fuse descriptor itself (POLLERR once
  the mount is gone), and while a successor starts, its ready pipe;
- the metrics endpoint (HTTP/1.0, GET /metrics), a signal wakeup pipe, timers.

Held connections (`Held`) go through states: "serving" (its process answers), "starting"
(a successor forked, not yet ready), "waiting" (a restart back-off), "adopted" (taken
from a previous agent; its process has not linked to this one yet).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import heapq
import itertools
import json
import logging
import os
import select
import signal
import socket
import stat
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casfs.failover import Decoder, Takeover, code_fingerprint, connection_alive, encode, unb64
from casfs.failover import send_message as send_blocking
from casfs.locations import mount_log_path
from casfs.mountconfig import MountConfig
from casfs.process import (
    connect_private,
    daemon_environment,
    detach,
    journal_stderr,
    log_check_seconds,
    open_log,
    peer_uid,
    rotate_log,
    sd_notify,
    sighup,
)

log = logging.getLogger("casfs.agent")
PROTOCOL = 2  # of mount requests (casfs.agent.mount_via_agent)
MAX_REQUEST = 1 << 20
START_FAILURES_MAX = 5  # successive successors that failed to serve: the connection is let go
START_SECONDS = 60.0  # a successor not serving by then is killed (and retried)
RELINK_WAIT_SECONDS = 10.0  # a successor agent waits this long for processes to link
SCRAPE_SECONDS = 1.5  # the longest a scrape waits for the processes' stats
EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP
REAPED_KEEP = 256
CLOSE_FLUSH_SECONDS = 2.0  # a connection closed after its answer gets this long to read it


class Conn:
    """A connection the agent reads JSON lines from (with descriptors) and writes to
    without blocking."""

    def __init__(self, agent: Agent, sock: socket.socket, kind: str) -> None:
        self.agent = agent
        self.sock = sock
        self.kind = kind  # "request", "link", "http", "waiter"
        self.decoder = Decoder()
        self.out = bytearray()
        self.closed = False
        self.closing = False  # closed once `out` is sent (close(after_flush=True))
        self.on_close: Callable[[Conn], None] | None = None
        self.held: Held | None = None  # the connection this link belongs to
        self.http = b""
        self.opened = time.monotonic()
        sock.setblocking(False)
        agent.register(sock.fileno(), EPOLLIN, self.ready)

    def write(self, data: bytes) -> None:
        if self.closed or self.closing:
            return
        self.out += data
        self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError:
                self.close()
                return
            del self.out[:sent]
        if self.closed:
            return
        if self.closing and not self.out:
            self.close()
            return
        # A closing connection is not read any more (epoll is level-triggered).
        self.agent.modify(self.sock.fileno(), (0 if self.closing else EPOLLIN)
                          | (EPOLLOUT if self.out else 0))

    def ready(self, events: int) -> None:
        if events & EPOLLOUT:
            self.flush()
        if self.closing and not self.closed and events & EPOLLERR:
            self.close()
        if self.closed or self.closing or not events & (EPOLLIN | EPOLLERR):
            return
        try:
            if self.kind.startswith("http"):
                data = self.sock.recv(8192)
                fds: list[int] = []
            else:
                data, fdl, _flags, _addr = socket.recv_fds(self.sock, 65536, 8)
                fds = list(fdl)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        if not data:
            for fd in fds:
                os.close(fd)
            self.close()
            return
        if self.kind.startswith("http"):
            if self.kind == "http":
                self.agent.on_http(self, data)
            return
        try:
            self.decoder.feed(data, fds)
            # A client's request is small; a linked process's stats reply may be larger
            # (the Decoder bounds every message at MAX_MESSAGE).
            if self.kind == "request" and len(self.decoder.buf) > MAX_REQUEST:
                raise ValueError("request too large")
            for message, mfds in self.decoder.messages():
                self.agent.on_message(self, message, mfds)
                if self.closed or self.closing:
                    break
        except (ValueError, TypeError, KeyError) as exc:
            self.write(f"refused: bad request ({exc})\n".encode())
            self.close(after_flush=True)

    def close(self, after_flush: bool = False) -> None:
        if self.closed:
            return
        if after_flush and self.out:
            # Sent from the loop as the peer reads (never a blocking send: a peer that
            # does not read would stall the agent); closed when sent, or after 2 s.
            if not self.closing:
                self.closing = True
                self.agent.later(CLOSE_FLUSH_SECONDS, self.close)
                self.flush()
            return
        self.closed = True
        self.agent.unregister(self.sock.fileno())
        self.decoder.close()
        with contextlib.suppress(OSError):
            self.sock.close()
        self.agent.conns.discard(self)
        if self.on_close is not None:
            self.on_close(self)


class Held:
    """A FUSE connection the agent holds: its descriptor, the process serving it, what a
    successor needs (`meta`: the process's last `hold` message)."""

    def __init__(self, key: str, kind: str, fuse_fd: int, meta: dict[str, Any]) -> None:
        self.key = key
        self.kind = kind  # "fuse" (a FUSE-mode mount) or "view" (the kernel mode's view)
        self.fuse_fd = fuse_fd
        self.meta = meta
        self.pid = 0
        self.prev_pid = 0  # the process before the current one
        self.linked_pid = 0  # the process whose `hold` message `meta` is
        self.pidfd: int | None = None
        self.link: Conn | None = None
        self.state = "serving"
        self.since = 0.0  # when the current failover began
        self.reason = ""  # of the current failover: "crash" or "handover"
        self.restarts: Counter[str] = Counter()
        self.stalls: list[float] = []
        self.failures = 0  # successors in a row that did not serve
        self.ready_fd: int | None = None  # a starting successor's ready pipe
        self.ready_buf = b""
        self.replace = ""  # a handover asked for this reason, not yet done
        self.waiters: list[Conn] = []  # `view` requests waiting for it to serve
        self.stats: dict[str, Any] | None = None


class Scrape:
    def __init__(self, conn: Conn, ident: int, pending: set[str]) -> None:
        self.conn = conn
        self.ident = ident
        self.pending = pending
        self.results: dict[str, dict[str, Any]] = {}
        self.done = False


class Agent:
    def __init__(self, cache_dir: str, sock_path: Path, pid_path: Path,
                 listener: socket.socket | None, metrics_sock: socket.socket | None,
                 metrics: str | None, verbose: bool) -> None:
        self.cache_dir = cache_dir
        self.sock_path = sock_path
        self.pid_path = pid_path
        self.listener = listener
        self.metrics_sock = metrics_sock
        self.metrics = metrics
        self.verbose = verbose
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.conns: set[Conn] = set()
        self.held: dict[str, Held] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.timer_ids = itertools.count()
        self.scrapes: dict[int, Scrape] = {}
        self.scrape_ids = itertools.count(1)
        self.stopping = False
        self.handed_over = False  # a successor has our socket: leave it be
        self.journal = journal_stderr()
        self.code = code_fingerprint()
        self.view_start: dict[str, Any] | None = None  # a fresh view being started
        self.reaped: dict[int, int] = {}  # pid -> wait status of children
        self.report_fd: int | None = None  # a restart's progress, to `casfs agent restart`
        self.to_replace: set[str] = set()  # keys a restart replaces
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.started = time.monotonic()

    # -- epoll and timers ---------------------------------------------------------------------

    def register(self, fd: int, events: int, handler: Callable[[int], None]) -> None:
        self.ep.register(fd, events)
        self.handlers[fd] = handler

    def modify(self, fd: int, events: int) -> None:
        with contextlib.suppress(OSError, KeyError):
            self.ep.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError, KeyError, ValueError):
            self.ep.unregister(fd)

    def close_fd(self, fd: int | None) -> None:
        """Stop watching a descriptor of ours and close it."""
        if fd is None or fd < 0:
            return
        self.unregister(fd)
        with contextlib.suppress(OSError):
            os.close(fd)

    def _pause_accepting(self, fd: int, exc: OSError) -> None:
        """Out of descriptors: stop watching a listener for a while (epoll is level-
        triggered: a pending connection it cannot accept would wake the loop at once,
        forever), then watch it again."""
        log.warning("accept failed: %s; not accepting for 1 s", exc)
        self.modify(fd, 0)
        self.later(1.0, functools.partial(self.modify, fd, EPOLLIN))

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.timer_ids), fn))

    # -- running --------------------------------------------------------------------------------

    def run(self, ready_fd: int | None, successor: bool = False) -> int:
        sock_path = self.sock_path
        if successor:
            try:
                self._take_over_from_predecessor(sock_path)
            except Exception as exc:  # noqa: BLE001 - reported to `casfs agent restart`
                log.exception("taking over from the running agent failed")
                if ready_fd is not None:
                    os.write(ready_fd, f"error {exc}\n".encode())
                    os.close(ready_fd)
                return 1
        assert self.listener is not None
        self.listener.setblocking(False)
        bound = os.stat(sock_path).st_ino  # the socket file we serve (a successor: the same)
        self.register(self.listener.fileno(), EPOLLIN, self._accept)
        if self.metrics_sock is not None:
            self.metrics_sock.setblocking(False)
            self.register(self.metrics_sock.fileno(), EPOLLIN, self._accept_http)
        self.register(self.wake_r, EPOLLIN, self._on_wake)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, _no_op)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        pid_path = self.pid_path
        tmp = pid_path.with_name(f"{pid_path.name}.{os.getpid()}")
        tmp.write_text(f"{os.getpid()}\n")
        os.rename(tmp, pid_path)
        where = f", metrics on {self.metrics}" if self.metrics_sock is not None else ""
        log.info("agent %d serving mounts of %s on %s%s (code %s)", os.getpid(),
                 self.cache_dir, sock_path, where, self.code)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving mounts of {self.cache_dir}")
        watchdog = _watchdog_interval()
        if watchdog:
            self._watchdog(watchdog)
        self.later(log_check_seconds(), self._maintain_log)
        if ready_fd is not None:
            os.write(ready_fd, f"ok {os.getpid()}\n".encode())
            if successor:
                self.report_fd = ready_fd
                self.later(RELINK_WAIT_SECONDS, self._relink_deadline)
                self._report_progress()
            else:
                os.close(ready_fd)
        try:
            self._loop()
        finally:
            self._shutdown(sock_path, bound, pid_path)
        return 0

    def _loop(self) -> None:
        while not self.stopping:
            timeout = -1.0
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                events = self.ep.poll(timeout)
            except InterruptedError:
                continue
            for fd, ev in events:
                handler = self.handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception:  # noqa: BLE001 - one event never takes the agent down
                        log.exception("agent: handling an event failed")
                if self.stopping:
                    break
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now and not self.stopping:
                _, _, fn = heapq.heappop(self.timers)
                try:
                    fn()
                except Exception:  # noqa: BLE001
                    log.exception("agent: a timer failed")

    def _shutdown(self, sock_path: Path, bound: int, pid_path: Path) -> None:
        signal.set_wakeup_fd(-1)
        if not self.handed_over:
            sd_notify("STOPPING=1")
            with contextlib.suppress(OSError):
                if os.stat(sock_path).st_ino == bound:  # not a newer agent's socket
                    sock_path.unlink()
            with contextlib.suppress(OSError):
                if pid_path.read_text().strip() == str(os.getpid()):
                    pid_path.unlink()
        for conn in list(self.conns):
            conn.close()
        for held in list(self.held.values()):
            self._forget(held, close_link=True)
        for sock in (self.listener, self.metrics_sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        if self.report_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.report_fd)
        log.info("agent %d %s", os.getpid(),
                 "handed over to its successor" if self.handed_over else
                 "stopped; mounts keep serving, without failover until an agent runs")

    # -- signals, children ----------------------------------------------------------------------

    def _on_wake(self, events: int) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        for signum in set(data):
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("signal %d: stopping", signum)
                self.stopping = True
            elif signum == signal.SIGHUP:
                log.info("%s", sighup())
            elif signum == signal.SIGCHLD:
                self._reap()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.reaped[pid] = status
            if len(self.reaped) > REAPED_KEEP:
                self.reaped.pop(next(iter(self.reaped)))

    def _exit_text(self, pid: int) -> str:
        self._reap()
        status = self.reaped.get(pid)
        if status is None:
            return "exited"
        if os.WIFSIGNALED(status):
            return f"killed by signal {os.WTERMSIG(status)}"
        return f"exited with status {os.WEXITSTATUS(status)}"

    def _maintain_log(self) -> None:
        if rotate_log():
            log.info("log rotated")
        self.later(log_check_seconds(), self._maintain_log)

    def _watchdog(self, interval: float) -> None:
        sd_notify("WATCHDOG=1")
        self.later(interval, lambda: self._watchdog(interval))

    def fork(self, child: Callable[[], int], keep: list[Any], drop: list[Any]) -> int:
        """Fork a child that runs child() and exits with its status; in it, everything
        of the agent but `keep` (sockets and descriptors it needs) is closed first, and
        `drop` (the parent's ends of what was made for this child) too."""
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            for item in drop:
                with contextlib.suppress(OSError):
                    if isinstance(item, int):
                        os.close(item)
                    else:
                        item.close()
            self._become_child(keep)
            code = child()
        except BaseException:  # noqa: BLE001 - the child's end, logged
            log.exception("agent child failed")
        finally:
            logging.shutdown()
            os._exit(code)
        return 0  # not reached

    def _become_child(self, keep: list[Any]) -> None:
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        kept_fds = {k if isinstance(k, int) else k.fileno() for k in keep}
        for conn in list(self.conns):
            if conn.sock.fileno() not in kept_fds:
                with contextlib.suppress(OSError):
                    conn.sock.close()
        for sock in (self.listener, self.metrics_sock):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        raw = [self.wake_r, self.wake_w, self.report_fd]
        for held in self.held.values():
            raw += [held.fuse_fd, held.pidfd, held.ready_fd]
        for fd in raw:
            if fd is not None and fd not in kept_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        with contextlib.suppress(OSError):
            self.ep.close()
        self.conns = set()
        self.held = {}

    def _child_logging(self, log_file: Path, verbose: bool) -> None:
        """In a child: stdio onto its log file (or the journal when supervised)."""
        if self.journal:
            detach(None, verbose)
        else:
            detach(open_log(log_file), verbose, log_file)

    # -- connections ----------------------------------------------------------------------------

    def _accept(self, events: int) -> None:
        assert self.listener is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._pause_accepting(self.listener.fileno(), exc)
                    return
                if exc.errno == errno.ECONNABORTED:
                    log.warning("accept failed: %s", exc)
                    return
                raise
            if peer_uid(sock) != os.geteuid():
                with contextlib.suppress(OSError):
                    sock.sendall(b"refused: the agent serves its own uid only\n")
                sock.close()
                continue
            conn = Conn(self, sock, "request")
            self.conns.add(conn)
            self.later(10.0, functools.partial(self._request_deadline, conn))

    def _request_deadline(self, conn: Conn) -> None:
        if conn.kind == "request" and not conn.closed:
            conn.close()  # nothing complete in 10 s: a probe that never closed, or junk

    def on_message(self, conn: Conn, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if conn.kind == "link":
            self._on_link_message(conn, message, fds)
            return
        if op == "hold":
            self._on_hold(conn, message, fds)
            return
        for fd in fds:
            os.close(fd)
        if not message:
            conn.close()  # a probe (agent status, another agent starting)
            return
        if op is None or op == "mount":
            self._on_mount(conn, message)
        elif op == "view":
            self._on_view_request(conn, message)
        elif op == "status":
            conn.write(json.dumps(self.status()).encode() + b"\n")
            conn.close(after_flush=True)
        elif op == "handover":
            self._hand_over(conn)
        else:
            raise ValueError(f"unknown request {op!r}")

    # -- mounts (`casfs mount` asking for a daemon) -----------------------------------------------

    def _on_mount(self, conn: Conn, message: dict[str, Any]) -> None:
        cfg, env, verbose = _parse_request(message, self.cache_dir)
        log_file = mount_log_path(self.cache_dir, cfg.mountpoint)
        link_agent, link_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        caller = conn.sock

        def child() -> int:
            from casfs.daemon import serve_reporting

            os.environ.clear()
            os.environ.update(env)
            self._child_logging(log_file, verbose)
            fd = os.dup(caller.fileno())
            caller.close()
            os.set_blocking(fd, True)
            link_child.setblocking(True)
            os.write(fd, f"pid {os.getpid()}\n".encode())
            return serve_reporting(cfg, fd, link=link_child)

        self.fork(child, [caller, link_child], [link_agent])
        link_child.close()
        self._new_link(link_agent)
        conn.close()

    def _new_link(self, sock: socket.socket, held: Held | None = None) -> Conn:
        link = Conn(self, sock, "link")
        link.held = held
        link.on_close = self._link_closed
        self.conns.add(link)
        return link

    # -- links: processes handing their connection over ---------------------------------------------

    def _on_hold(self, conn: Conn, message: dict[str, Any], fds: list[int]) -> None:
        conn.kind = "link"
        conn.on_close = self._link_closed
        self._on_link_message(conn, message, fds)

    def _on_link_message(self, conn: Conn, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "hold":
            self._hold(conn, message, fds)
            return
        for fd in fds:
            os.close(fd)
        held = conn.held
        if op == "stats":
            scrape = self.scrapes.get(int(message.get("id") or 0))
            stats = message.get("stats")
            if held is not None and isinstance(stats, dict):
                held.stats = stats
                if scrape is not None and not scrape.done:
                    scrape.results[held.key] = stats
                    scrape.pending.discard(held.key)
                    if not scrape.pending:
                        self._finish_scrape(scrape)
        elif op == "release" and held is not None:
            reason = message.get("reason")
            if reason == "handover":
                log.info("%s: pid %d handed its connection back", held.key, held.pid)
                self._start_successor(held, "handover")
            else:
                log.info("%s: released by pid %d (%s)", held.key, held.pid, reason)
                self._forget(held, close_link=False)
        elif op == "update" and held is not None and isinstance(message.get("mounts"), dict):
            held.meta["mounts"] = message["mounts"]

    def _hold(self, conn: Conn, message: dict[str, Any], fds: list[int]) -> None:
        if len(fds) != 1 or message.get("protocol") != 1:
            for fd in fds:
                os.close(fd)
            raise ValueError("a hold message carries one descriptor (protocol 1)")
        fuse_fd = fds[0]
        key, kind, pid = str(message["key"]), str(message["kind"]), int(message["pid"])
        if kind not in ("fuse", "view") or pid <= 0:
            os.close(fuse_fd)
            raise ValueError("bad hold message")
        try:
            _check_hold(message, kind, key, self.cache_dir)
            st = os.fstat(fuse_fd)
            if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(10, 229):
                raise ValueError("the descriptor is not a /dev/fuse connection")
        except (ValueError, TypeError, KeyError):
            os.close(fuse_fd)
            raise
        held = self.held.get(key)
        if held is not None and held.pid == pid:
            os.close(fuse_fd)  # the same file we hold already
            held.meta = message
            if held.link is not None and held.link is not conn:
                held.link.held = None
                held.link.close()
        else:
            if held is not None:
                log.info("%s: a new process (pid %d) serves it; forgetting pid %d",
                         key, pid, held.pid)
                self._forget(held, close_link=True)
            held = Held(key, kind, fuse_fd, message)
            held.pid = pid
            self.held[key] = held
            self.register(fuse_fd, 0, functools.partial(self._fuse_event, held))
            self._watch_pid(held, pid)
        held.link = conn
        held.linked_pid = pid
        conn.held = held
        if held.state == "adopted":
            held.state = "serving"
        log.info("%s: holding the connection of pid %d (%s%s)", key, pid, kind,
                 ", other code" if message.get("code") != self.code else "")
        if held.state == "serving":
            if key in self.to_replace and not held.replace:
                self._ask_handover(held, "restart")
            elif message.get("code") != self.code and not held.replace:
                self._ask_handover(held, "upgrade")
            if held.kind == "view":
                self._answer_view_waiters(held, "ready")

    def _watch_pid(self, held: Held, pid: int) -> None:
        self.close_fd(held.pidfd)
        held.pidfd = None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.later(0, lambda: self._exited(held, pid))
            return
        held.pidfd = pidfd
        self.register(pidfd, EPOLLIN, lambda ev: self._exited(held, pid))

    def _link_closed(self, conn: Conn) -> None:
        held = conn.held
        if held is not None and held.link is conn:
            held.link = None
            for scrape in list(self.scrapes.values()):
                if held.key in scrape.pending:
                    scrape.pending.discard(held.key)
                    if not scrape.pending:
                        self._finish_scrape(scrape)

    def _fuse_event(self, held: Held, events: int) -> None:
        if events & EPOLLERR and self.held.get(held.key) is held:
            log.info("%s: its connection is gone (unmounted)", held.key)
            self._forget(held, close_link=False)

    def _forget(self, held: Held, close_link: bool) -> None:
        """Stop holding: close our descriptor (the connection lives on while its serving
        process holds its own), stop watching."""
        if self.held.get(held.key) is held:
            del self.held[held.key]
        for fd in (held.fuse_fd, held.pidfd, held.ready_fd):
            self.close_fd(fd)
        held.fuse_fd, held.pidfd, held.ready_fd = -1, None, None
        if held.link is not None:
            link, held.link = held.link, None
            link.held = None
            if close_link:
                link.close()
        self._answer_view_waiters(held, "error: the node view's connection is gone")
        if held.key in self.to_replace:
            self.to_replace.discard(held.key)
            self._report(f"failed {held.key} unmounted")

    # -- failover ------------------------------------------------------------------------------

    def _exited(self, held: Held, pid: int) -> None:
        if self.held.get(held.key) is not held or held.pid != pid:
            return  # an old process of a connection already handed to a successor
        self.close_fd(held.pidfd)
        held.pidfd = None
        how = self._exit_text(pid)
        if not connection_alive(held.fuse_fd):
            log.info("%s: pid %d %s; its connection is gone", held.key, pid, how)
            self._forget(held, close_link=True)
            return
        if held.state in ("starting", "failing"):
            self._start_failed(held, f"pid {pid} {how} before serving")
            return
        log.warning("%s: pid %d %s: failing over", held.key, pid, how)
        self._start_successor(held, "handover" if held.replace else "crash")

    def _start_failed(self, held: Held, why: str) -> None:
        held.failures += 1
        self.close_fd(held.ready_fd)
        held.ready_fd = None
        if held.failures >= START_FAILURES_MAX:
            log.error("%s: %s; %d successors failed in a row: letting the connection go "
                      "(its requests fail from now on)", held.key, why, held.failures)
            self._forget(held, close_link=True)
            return
        delay = min(0.2 * 2 ** (held.failures - 1), 5.0)
        log.warning("%s: %s; trying again in %.1fs", held.key, why, delay)
        held.state = "waiting"
        self.later(delay, lambda: self._retry(held))

    def _retry(self, held: Held) -> None:
        if self.held.get(held.key) is held and held.state == "waiting":
            self._start_successor(held, held.reason or "crash")

    def _start_successor(self, held: Held, reason: str) -> None:
        """Fork a process that serves held's connection from where the last one left."""
        if held.state == "starting":
            return
        if not held.since:
            held.since = time.monotonic()
        held.reason = reason
        old_link = held.link
        held.link = None
        if old_link is not None:
            old_link.held = None  # the old process's link: it may finish saying goodbye
        self.close_fd(held.pidfd)
        held.pidfd = None
        meta = held.meta
        # What the successor is told comes from the hold message (or an older agent's
        # handover): parsed before any descriptor is made, as it may not parse.
        try:
            init = unb64(str(meta["init"]))
            env = daemon_environment({str(k): str(v)
                                      for k, v in dict(meta.get("env") or {}).items()})
            cfg = MountConfig(**meta["config"]) if held.kind == "fuse" else None
            cache_size = int(meta.get("cache_size") or 0)
            mounts = dict(meta.get("mounts") or {})
        except (KeyError, TypeError, ValueError) as exc:
            log.error("%s: cannot start a successor (%r): letting the connection go",
                      held.key, exc)
            self._forget(held, close_link=True)
            return
        verbose = bool(meta.get("verbose"))
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        link_agent, link_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fuse_copy = os.dup(held.fuse_fd)
        takeover = Takeover(fuse_copy, init, reason)
        if cfg is not None:
            log_file = mount_log_path(self.cache_dir, held.key)  # never a path it was told

            def child() -> int:
                from casfs.daemon import serve_reporting

                os.environ.clear()
                os.environ.update(env)
                self._child_logging(log_file, verbose)
                link_child.setblocking(True)
                return serve_reporting(cfg, write_fd, takeover=takeover, link=link_child)
        else:
            log_file = self._view_log()

            def child() -> int:
                os.environ.clear()
                os.environ.update(env)
                self._child_logging(log_file, verbose)
                link_child.setblocking(True)
                return _view_child(self.cache_dir, cache_size, write_fd, link_child,
                                   takeover, mounts)

        pid = self.fork(child, [write_fd, link_child, fuse_copy], [read_fd, link_agent])
        os.close(write_fd)
        os.close(fuse_copy)
        link_child.close()
        held.prev_pid = held.pid
        held.pid = pid
        held.state = "starting"
        held.replace = ""
        held.ready_fd = read_fd
        held.ready_buf = b""
        self.register(read_fd, EPOLLIN, lambda ev: self._successor_ready(held, read_fd))
        self._watch_pid(held, pid)
        held.link = self._new_link(link_agent, held)
        log.info("%s: successor pid %d started (%s)", held.key, pid, reason)
        self.later(START_SECONDS, lambda: self._start_deadline(held, pid))

    def _start_deadline(self, held: Held, pid: int) -> None:
        if self.held.get(held.key) is held and held.pid == pid and \
                held.state in ("starting", "failing"):
            log.warning("%s: successor pid %d not serving after %.0fs: killing it", held.key,
                        pid, START_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _successor_ready(self, held: Held, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        held.ready_buf += data
        if data and b"\n" not in held.ready_buf:
            return
        self.close_fd(fd)
        if held.ready_fd == fd:
            held.ready_fd = None
        line = held.ready_buf.split(b"\n", 1)[0].decode(errors="replace")
        if line != "ready":
            if held.state == "starting" and self.held.get(held.key) is held:
                why = line or "no word"
                held.state = "failing"
                log.warning("%s: successor pid %d failed: %s", held.key, held.pid, why)
            return
        stall = time.monotonic() - held.since if held.since else 0.0
        held.stalls.append(stall)
        held.restarts[held.reason] += 1
        held.failures = 0
        held.state = "serving"
        held.since = 0.0
        log.info("%s: pid %d serves it (%s; %.3fs after the last one stopped)", held.key,
                 held.pid, held.reason, stall)
        if held.key in self.to_replace:
            self.to_replace.discard(held.key)
            self._report(f"replaced {held.key} {held.prev_pid} {held.pid} {stall:.3f}")
        if held.kind == "view":
            self._answer_view_waiters(held, "ready")

    def _ask_handover(self, held: Held, reason: str) -> None:
        held.replace = reason
        if held.link is not None:
            held.link.write(encode({"op": "handover", "reason": reason}))
            log.info("%s: asked pid %d for a handover (%s)", held.key, held.pid, reason)

    # -- the node view (kernel mode) ---------------------------------------------------------------

    def _view_log(self) -> Path:
        from casfs.kernel.paths import log_path as view_log_path

        return view_log_path(self.cache_dir)

    def _on_view_request(self, conn: Conn, message: dict[str, Any]) -> None:
        conn.kind = "waiter"
        held = self.held.get("view")
        if held is not None:
            if held.state == "serving":
                conn.write(b"ready\n")
                conn.close(after_flush=True)
            else:
                held.waiters.append(conn)
            return
        if self.view_start is not None:
            self.view_start["waiters"].append(conn)
            return
        if not message.get("start", True):
            conn.write(b"none\n")
            conn.close(after_flush=True)
            return
        cache_size = int(message.get("cache_size") or 0)
        verbose = bool(message.get("verbose"))
        raw_env = message.get("env") or {}
        if not isinstance(raw_env, dict):
            raise ValueError("env must be an object")
        env = daemon_environment({str(k): str(v) for k, v in raw_env.items()})
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        link_agent, link_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_file = self._view_log()

        def child() -> int:
            os.environ.clear()
            os.environ.update(env)
            self._child_logging(log_file, verbose)
            link_child.setblocking(True)
            return _view_child(self.cache_dir, cache_size, write_fd, link_child, None, {})

        pid = self.fork(child, [write_fd, link_child], [read_fd, link_agent])
        os.close(write_fd)
        link_child.close()
        self._new_link(link_agent)
        self.view_start = {"pid": pid, "waiters": [conn], "buf": b""}
        self.register(read_fd, EPOLLIN, lambda ev: self._view_started(read_fd))
        log.info("node view pid %d started", pid)

    def _view_started(self, fd: int) -> None:
        start = self.view_start
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if start is None:
            return
        start["buf"] += data
        if data and b"\n" not in start["buf"]:
            return
        self.close_fd(fd)
        self.view_start = None
        line = start["buf"].split(b"\n", 1)[0].decode(errors="replace")
        answer = "ready" if line == "ready" else (
            line if line.startswith("error: ") else "error: the node view did not start; "
            f"see {self._view_log()}")
        for conn in start["waiters"]:
            conn.write(answer.encode() + b"\n")
            conn.close(after_flush=True)

    def _answer_view_waiters(self, held: Held, answer: str) -> None:
        waiters, held.waiters = held.waiters, []
        for conn in waiters:
            conn.write(answer.encode() + b"\n")
            conn.close(after_flush=True)

    # -- status, metrics ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        from casfs import __version__

        return {
            "pid": os.getpid(), "cache_dir": self.cache_dir, "version": __version__,
            "code": self.code, "metrics": self.metrics if self.metrics_sock else None,
            "journal": self.journal, "uptime_seconds": round(time.monotonic() - self.started, 3),
            "held": [{"key": h.key, "kind": h.kind, "pid": h.pid, "state": h.state,
                      "linked": h.link is not None and h.linked_pid == h.pid,
                      "image": h.meta.get("image", ""),
                      "digest": h.meta.get("digest", ""),
                      "mounts": sorted(dict(h.meta.get("mounts") or {})),
                      "restarts": dict(h.restarts),
                      "stalls": [round(s, 4) for s in h.stalls[-20:]],
                      "code": h.meta.get("code", "")}
                     for h in self.held.values()],
        }

    def _accept_http(self, events: int) -> None:
        assert self.metrics_sock is not None
        while True:
            try:
                sock, _ = self.metrics_sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._pause_accepting(self.metrics_sock.fileno(), exc)
                else:
                    log.warning("metrics accept failed: %s", exc)
                return
            conn = Conn(self, sock, "http")
            self.conns.add(conn)
            self.later(10.0, functools.partial(self._http_deadline, conn))

    @staticmethod
    def _http_deadline(conn: Conn) -> None:
        if conn.kind == "http":
            conn.close()

    def on_http(self, conn: Conn, data: bytes) -> None:
        conn.http += data
        if b"\r\n\r\n" not in conn.http and b"\n\n" not in conn.http:
            if len(conn.http) > 16384:
                conn.close()
            return
        conn.kind = "http-done"
        request_line = conn.http.split(b"\n", 1)[0].decode(errors="replace").split()
        path = request_line[1] if len(request_line) > 1 else ""
        if len(request_line) < 2 or request_line[0] != "GET" or \
                path.split("?", 1)[0] not in ("/metrics", "/"):
            body = b"casfs agent: GET /metrics\n"
            conn.write(b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
                       b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            conn.close(after_flush=True)
            return
        ident = next(self.scrape_ids)
        pending = {h.key for h in self.held.values() if h.link is not None
                   and h.state == "serving"}
        scrape = Scrape(conn, ident, pending)
        self.scrapes[ident] = scrape
        for key in pending:
            link = self.held[key].link
            assert link is not None
            link.write(encode({"op": "stats", "id": ident}))
        if not pending:
            self._finish_scrape(scrape)
        else:
            self.later(SCRAPE_SECONDS, lambda: self._finish_scrape(scrape))

    def _finish_scrape(self, scrape: Scrape) -> None:
        if scrape.done:
            return
        scrape.done = True
        self.scrapes.pop(scrape.ident, None)
        from casfs import __version__
        from casfs.nodemetrics import VIEW_IMAGE, MountSample, NodeSample, render

        mounts: list[MountSample] = []
        cache: dict[str, int] | None = None
        for held in self.held.values():
            stats = scrape.results.get(held.key)
            up = held.state == "serving"
            if held.kind == "fuse":
                labels = {"image": str(held.meta.get("image", "")),
                          "digest": str(held.meta.get("digest", "")), "mode": "fuse",
                          "mountpoint": held.key}
                mounts.append(MountSample(labels, stats, up, dict(held.restarts),
                                          list(held.stalls)))
                if stats and isinstance(stats.get("cache"), dict):
                    cache = stats["cache"]
                continue
            view = (stats or {}).get("view") or {}
            labels = {"image": VIEW_IMAGE, "digest": "", "mode": "kernel",
                      "mountpoint": str(Path(self.cache_dir) / "view")}
            view_stats = {"mount": {"pid": held.pid}, "fuse_ops": view.get("fuse_ops") or {},
                          "metrics": {k: v for k, v in view.items()
                                      if k in ("lookups", "reads", "misses", "io_errors")},
                          "failover": {"resent_requests": int(view.get("resent_requests")
                                                              or 0)}} \
                if stats else None
            mounts.append(MountSample(labels, view_stats, up, dict(held.restarts),
                                      list(held.stalls)))
            for mountpoint, km in sorted(((stats or {}).get("mounts") or {}).items()):
                km_mount = km.get("mount") or {}
                labels = {"image": str(km_mount.get("image") or ""),
                          "digest": str(km_mount.get("digest") or ""), "mode": "kernel",
                          "mountpoint": mountpoint}
                mounts.append(MountSample(labels, km, up))
                if isinstance(km.get("cache"), dict):
                    cache = km["cache"]
            if not stats:
                for mountpoint in sorted(dict(held.meta.get("mounts") or {})):
                    mounts.append(MountSample({"image": "", "digest": "", "mode": "kernel",
                                               "mountpoint": mountpoint}, None, False))
        body = render(NodeSample(mounts, __version__, self.code, len(self.held), cache))
        head = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"
                b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        scrape.conn.write(head + body)
        scrape.conn.close(after_flush=True)

    # -- restarts: handing everything to a successor agent -------------------------------------------

    def _hand_over(self, conn: Conn) -> None:
        """A successor agent asks for everything: each held connection (descriptor,
        pidfd, what we know), then our listening sockets; once it acknowledges, we
        stop (its processes link to it) without removing the socket it now serves."""
        sock = conn.sock
        self.unregister(sock.fileno())
        self.conns.discard(conn)
        conn.closed = True
        sock.setblocking(True)
        sock.settimeout(30.0)
        try:
            for held in list(self.held.values()):
                fds = [held.fuse_fd] + ([held.pidfd] if held.pidfd is not None else [])
                state = "adopted" if held.state == "serving" else held.state
                send_blocking(sock, {"op": "entry", "key": held.key, "kind": held.kind,
                                     "meta": held.meta, "pid": held.pid, "state": state,
                                     "restarts": dict(held.restarts), "stalls": held.stalls,
                                     "pidfd": held.pidfd is not None}, fds)
            listeners = [s.fileno() for s in (self.listener, self.metrics_sock) if s is not None]
            send_blocking(sock, {"op": "listeners", "metrics": self.metrics
                                 if self.metrics_sock is not None else None,
                                 "verbose": self.verbose}, listeners)
            decoder = Decoder()
            while True:
                data = sock.recv(4096)
                if not data:
                    raise OSError("the successor went away before acknowledging")
                decoder.feed(data, [])
                if any(m.get("op") == "ack" for m, _ in decoder.messages()):
                    break
        except OSError as exc:
            log.error("handing over to a successor failed (%s): serving on", exc)
            with contextlib.suppress(OSError):
                sock.close()
            return
        sock.close()
        log.info("handed everything to the successor agent")
        self.handed_over = True
        self.stopping = True

    def _take_over_from_predecessor(self, sock_path: Path) -> None:
        sock = connect_private(sock_path, timeout=30.0)
        try:
            sock.sendall(encode({"op": "handover", "pid": os.getpid()}))
            decoder = Decoder()
            listeners: list[int] = []
            settings: dict[str, Any] = {}
            while not listeners:
                data, fds, _f, _a = socket.recv_fds(sock, 65536, 8)
                if not data:
                    raise OSError("the running agent did not hand over (an older casfs?)")
                decoder.feed(data, list(fds))
                for message, mfds in decoder.messages():
                    if message.get("op") == "entry":
                        self._adopt(message, mfds)
                    elif message.get("op") == "listeners":
                        listeners, settings = mfds, message
                    else:
                        for fd in mfds:
                            os.close(fd)
                        raise OSError(f"unexpected answer from the running agent: {message}")
            self.listener = socket.socket(fileno=listeners[0])
            if len(listeners) > 1:
                old_metrics = socket.socket(fileno=listeners[1])
                if self.metrics_sock is None and (self.metrics is None
                                                  or self.metrics == settings.get("metrics")):
                    self.metrics_sock, self.metrics = old_metrics, settings.get("metrics")
                else:
                    old_metrics.close()
            if self.metrics and self.metrics_sock is None:
                self.metrics_sock = listen_metrics(self.metrics)
            # systemd: this process is the service's main process from now on
            sd_notify(f"MAINPID={os.getpid()}\nREADY=1")
            sock.sendall(encode({"op": "ack"}))
        finally:
            sock.close()
        self.to_replace = set(self.held)
        log.info("took over from the running agent: %d connections held",
                 len(self.held))

    def _adopt(self, message: dict[str, Any], fds: list[int]) -> None:
        key, kind = str(message["key"]), str(message["kind"])
        fuse_fd = fds[0]
        held = Held(key, kind, fuse_fd, dict(message.get("meta") or {}))
        held.pid = int(message.get("pid") or 0)
        held.state = "adopted"
        held.restarts.update(dict(message.get("restarts") or {}))
        held.stalls = [float(s) for s in message.get("stalls") or []]
        self.held[key] = held
        self.register(fuse_fd, 0, functools.partial(self._fuse_event, held))
        if len(fds) > 1:
            held.pidfd = fds[1]
            pid = held.pid
            self.register(fds[1], EPOLLIN, lambda ev: self._exited(held, pid))
        elif held.pid:
            self._watch_pid(held, held.pid)

    def _report(self, line: str) -> None:
        if self.report_fd is None:
            return
        try:
            os.write(self.report_fd, line.encode() + b"\n")
        except OSError:
            self.report_fd = None
            return
        self._report_progress()

    def _report_progress(self) -> None:
        if self.report_fd is not None and not self.to_replace:
            with contextlib.suppress(OSError):
                os.write(self.report_fd, b"done\n")
                os.close(self.report_fd)
            self.report_fd = None

    def _relink_deadline(self) -> None:
        for key in sorted(self.to_replace):
            held = self.held.get(key)
            if held is not None and held.state == "adopted":
                self.to_replace.discard(key)
                self._report(f"failed {key} its process (pid {held.pid}) did not link to "
                             "this agent; it is held, and replaced if it ends")


def _no_op(signum: int, frame: object) -> None:
    """Signals wake the loop through the wakeup pipe; the handler itself does nothing."""


def _watchdog_interval() -> float:
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return 0.0
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return 0.0
    return usec / 2e6 if usec > 0 else 0.0


def _parse_request(request: dict[str, Any], cache_dir: str) -> tuple[MountConfig, dict[str, str],
                                                                     bool]:
    """A mount request, checked: the agent's own cache directory, an absolute mountpoint
    without control characters, string settings; the environment filtered again."""
    if request.get("protocol") != PROTOCOL:
        raise ValueError(f"protocol {request.get('protocol')!r}, agent speaks {PROTOCOL}")
    cfg = _checked_mount(request["config"], cache_dir)
    raw_env = request["env"]
    if not isinstance(raw_env, dict):
        raise ValueError("env must be an object")
    env = daemon_environment({str(k): str(v) for k, v in raw_env.items()})
    return cfg, env, bool(request.get("verbose"))


def _check_hold(message: dict[str, Any], kind: str, key: str, cache_dir: str) -> None:
    """What a successor would be started from, checked as a mount request is: this
    agent's cache directory, the mount it names, a FUSE_INIT request (ValueError)."""
    init = unb64(str(message.get("init", "")))
    if len(init) < 48 or int.from_bytes(init[4:8], "little") != 26:
        raise ValueError("no FUSE_INIT request")
    if kind == "view":
        if os.path.realpath(str(message.get("cache_dir", ""))) != os.path.realpath(cache_dir):
            raise ValueError("not a view of this agent's cache directory")
        return
    if _checked_mount(message["config"], cache_dir).mountpoint != key:
        raise ValueError("the mountpoint must be the key")


def _checked_mount(raw: dict[str, Any], cache_dir: str) -> MountConfig:
    """A mount's settings as a request gives them, checked: the agent's own cache
    directory, an absolute mountpoint without control characters, a plain reference."""
    cfg = MountConfig(**raw)
    if os.path.realpath(cfg.cache_dir) != os.path.realpath(cache_dir):
        raise ValueError(f"cache directory {cfg.cache_dir!r} is not this agent's")
    mountpoint = cfg.mountpoint
    if not isinstance(mountpoint, str) or not os.path.isabs(mountpoint) or \
            any(ord(ch) < 32 or ord(ch) == 127 for ch in mountpoint):
        raise ValueError("the mountpoint must be an absolute path without control characters")
    if not isinstance(cfg.ref, str) or any(ord(ch) < 32 for ch in cfg.ref):
        raise ValueError("bad image reference")
    return cfg


def _view_child(cache_dir: str, cache_size: int, ready_fd: int, link: socket.socket,
                takeover: Takeover | None, mounts: dict[str, Any]) -> int:
    """In a forked child: become the node view (fresh, or taking a dead one's over)."""
    from casfs.kernel.service import serve_view

    return serve_view(cache_dir, cache_size, ready_fd, link=link, takeover=takeover,
                      mounts=mounts)



def parse_address(text: str) -> tuple[str, int]:
    """"[HOST:]PORT" -> (host, port); the host defaults to 127.0.0.1."""
    from casfs.errors import AgentError

    host, _, port = text.rpartition(":")
    try:
        number = int(port)
        if not 0 <= number < 65536:
            raise ValueError
    except ValueError:
        raise AgentError(f"bad metrics address {text!r}: use [HOST:]PORT") from None
    return (host.strip("[]") or "127.0.0.1"), number


def listen_metrics(address: str) -> socket.socket:
    """The node metrics endpoint's listening socket."""
    from casfs.errors import AgentError

    host, port = parse_address(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise AgentError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    return sock
