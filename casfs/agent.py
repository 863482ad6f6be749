"""The node agent: a resident process, one per cache directory, that starts mount
daemons already warm.

Starting a mount daemon from nothing costs a Python start-up and the import of trio,
pyfuse3 and casfs: about 200 ms on a small machine, most of the time `casfs mount`
takes to serve a 100k-entry image whose manifest is already on the node. The agent
pays that once: it imports everything a daemon needs, then waits on a Unix socket
(`<cache-dir>/agent.sock`, mode 0600, connections from its own uid only). For each
`casfs mount` that connects, it forks; the child becomes the mount's daemon (its own
session, its log file, the caller's environment) and reports through the connection:
a line `pid N`, then `ready` or `error: <message>`. The agent itself holds no mount
state and runs no threads (forking a threaded process is unsafe): killing it, or
stopping it, leaves every mount serving. Without an agent, `casfs mount` forks its
daemon itself, as before.

    casfs agent start [--cache-dir DIR] [--foreground]
    casfs agent stop|status [--cache-dir DIR]

The agent trusts nobody's settings: a request names a mount, never a file to write
(the agent picks the log path), a daemon gets only the caller's AWS_*, CASFS_* and HOME
variables (PATH is the system's), and the mount's cache directory must be the agent's
own. `casfs mount` checks that the socket and the process answering on it belong to its
own user before it sends anything.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from casfs.errors import AgentError, AgentUnavailable, MountError
from casfs.locations import mount_log_path
from casfs.mountconfig import MountConfig
from casfs.process import (
    connect_private,
    daemon_environment,
    detach,
    listen_private,
    open_log,
    peer_uid,
    read_until,
)

SOCKET_NAME = "agent.sock"
PID_NAME = "agent.pid"
PROTOCOL = 2
MAX_REQUEST = 1 << 20

__all__ = ["AgentError", "AgentUnavailable", "agent_status", "mount_via_agent", "start_agent",
           "stop_agent"]


def socket_path(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir) / SOCKET_NAME


# -- the client side (`casfs mount`): no heavy imports ----------------------------------------


def mount_via_agent(cfg: MountConfig, verbose: bool = False, timeout: float = 60.0) -> int:
    """Ask the cache directory's agent for a daemon serving cfg; its pid once it serves.

    AgentUnavailable when no agent of ours listens there (no socket, a stale one, one
    that belongs to another user); MountError with the daemon's own one-line message
    when the mount fails. Nothing is sent before the answering process is known to run
    as this user: the request carries the caller's store credentials.
    """
    path = socket_path(cfg.cache_dir)
    log_path = mount_log_path(cfg.cache_dir, cfg.mountpoint)
    sock = connect_private(path)
    try:
        request = {"protocol": PROTOCOL, "config": cfg.as_dict(),
                   "env": daemon_environment(dict(os.environ)), "verbose": verbose}
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return _await_ready(sock, log_path, time.monotonic() + timeout)
    finally:
        sock.close()


def _await_ready(sock: socket.socket, log_path: Path, deadline: float) -> int:
    buf = b""
    pid = None
    while True:
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(4096)
        except TimeoutError:
            raise MountError(f"the mount daemon did not become ready; see {log_path}") from None
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            text = line.decode(errors="replace")
            if text.startswith("pid "):
                pid = int(text[4:])
            elif text == "ready" and pid is not None:
                return pid
            elif text.startswith("error: "):
                raise MountError(text[len("error: "):].strip()
                                 or f"the mount daemon failed; see {log_path}")
            elif text.startswith("refused: "):  # the agent's own answer: not for us
                raise AgentUnavailable(text[len("refused: "):])
    if pid is None:
        raise AgentUnavailable("the agent closed the connection without starting a daemon")
    raise MountError(f"the mount daemon exited before serving; see {log_path}")


def agent_status(cache_dir: str) -> int | None:
    """The pid of the agent serving cache_dir, or None."""
    from casfs.mounts import process_running

    try:
        pid = int((Path(cache_dir) / PID_NAME).read_text().strip())
    except (OSError, ValueError):
        return None
    if not process_running(pid) or not _answers(socket_path(cache_dir)):
        return None
    return pid


def stop_agent(cache_dir: str, timeout: float = 10.0) -> int | None:
    """Stop the agent of cache_dir (mounts keep serving); its pid, or None if none ran."""
    from casfs.mounts import process_running

    pid = agent_status(cache_dir)
    if pid is None:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            raise AgentError(f"the agent (pid {pid}) did not stop within {timeout:.0f}s")
        time.sleep(0.01)
    return pid


def _answers(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


# -- the agent ---------------------------------------------------------------------------------


def start_agent(cache_dir: str, foreground: bool = False, verbose: bool = False,
                timeout: float = 30.0) -> int:
    """Start the agent of cache_dir: serve in this process (foreground), or fork it off
    and return its pid once it listens."""
    from casfs.cache import ChunkCache

    ChunkCache(cache_dir).close()  # a usable, private cache directory, or its one-line error
    if _answers(socket_path(cache_dir)):
        running = agent_status(cache_dir)
        raise AgentError(f"an agent already serves {cache_dir}"
                         + (f" (pid {running})" if running else ""))
    listener = _listen(socket_path(cache_dir))
    if foreground:
        _serve(listener, cache_dir)
        return os.getpid()
    log_path = Path(cache_dir) / "logs" / "agent.log"
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = open_log(log_path)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            detach(log_fd, verbose)
            code = _serve(listener, cache_dir, ready_fd=write_fd)
        finally:
            os._exit(code)
    os.close(log_fd)
    listener.close()
    os.close(write_fd)
    try:
        reply = read_until(read_fd, time.monotonic() + timeout, lambda got: b"\n" in got)
        ok = reply.split(b"\n", 1)[0] == b"ok"
    finally:
        os.close(read_fd)
    if not ok:
        raise AgentError(f"the agent did not start; see {log_path}")
    return pid


def _listen(path: Path) -> socket.socket:
    if len(os.fsencode(path)) >= 108:
        raise AgentError(f"{path}: too long for a Unix socket; use a shorter --cache-dir")
    try:
        return listen_private(path)  # a stale one: agent_status() found nobody on it
    except OSError as exc:
        raise AgentError(f"cannot listen on {path}: {exc.strerror}") from exc


def _serve(listener: socket.socket, cache_dir: str, ready_fd: int | None = None) -> int:
    """Accept mount requests until SIGTERM/SIGINT; fork a daemon for each. Once the
    imports are done and the pid file is written, "ok" goes to ready_fd."""
    # Everything a daemon imports, imported once here: the forked child starts warm.
    import casfs.daemon  # noqa: F401
    import casfs.fuse_ops  # noqa: F401
    import casfs.store.s3  # noqa: F401
    import prefetch.heuristics  # noqa: F401
    import prefetch.recorder  # noqa: F401
    import prefetch.replay  # noqa: F401

    log = logging.getLogger("casfs.agent")
    pid_path = Path(cache_dir) / PID_NAME
    sock_path = socket_path(cache_dir)
    bound = os.stat(sock_path).st_ino
    tmp = pid_path.with_name(f"{PID_NAME}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.rename(tmp, pid_path)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # daemons are reaped by the kernel
    log.info("agent %d serving mounts of %s on %s", os.getpid(), cache_dir, sock_path)
    if ready_fd is not None:
        os.write(ready_fd, b"ok\n")
        os.close(ready_fd)
    try:
        while not stopping:
            try:
                conn, _ = listener.accept()
            except OSError as exc:
                if stopping or exc.errno == errno.EINVAL:
                    break
                if exc.errno in (errno.EINTR, errno.ECONNABORTED):
                    continue
                raise
            try:
                _handle(conn, listener, cache_dir, log)
            except OSError as exc:  # the caller went away; nothing to tell it
                log.warning("mount request dropped: %s", exc)
            except Exception:
                log.exception("mount request failed")
            finally:
                conn.close()
    finally:
        with contextlib.suppress(OSError):
            if os.stat(sock_path).st_ino == bound:  # not a newer agent's socket
                sock_path.unlink()
        with contextlib.suppress(OSError):
            if pid_path.read_text().strip() == str(os.getpid()):
                pid_path.unlink()
        listener.close()
        log.info("agent %d stopped", os.getpid())
    return 0


def _handle(conn: socket.socket, listener: socket.socket, cache_dir: str,
            log: logging.Logger) -> None:
    if peer_uid(conn) != os.geteuid():
        conn.sendall(b"refused: the agent serves its own uid only\n")
        return
    conn.settimeout(10.0)
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST:
            conn.sendall(b"refused: request too large\n")
            return
    if not data.strip():
        return  # a probe (agent status, another agent starting): connect and close
    try:
        cfg, env, verbose = _parse_request(data, cache_dir)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        conn.sendall(f"refused: bad request ({exc})\n".encode())
        return
    log_path = mount_log_path(cache_dir, cfg.mountpoint)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            listener.close()  # else a daemon would keep the agent's socket accepting
            code = _daemon_child(conn, cfg, env, log_path, verbose)
        finally:
            os._exit(code)


def _parse_request(data: bytes, cache_dir: str) -> tuple[MountConfig, dict[str, str], bool]:
    """A mount request, checked: the agent's own cache directory, an absolute mountpoint
    without control characters, string settings; the environment filtered again."""
    request = json.loads(data)
    if request.get("protocol") != PROTOCOL:
        raise ValueError(f"protocol {request.get('protocol')!r}, agent speaks {PROTOCOL}")
    cfg = MountConfig(**request["config"])
    if os.path.realpath(cfg.cache_dir) != os.path.realpath(cache_dir):
        raise ValueError(f"cache directory {cfg.cache_dir!r} is not this agent's")
    mountpoint = cfg.mountpoint
    if not isinstance(mountpoint, str) or not os.path.isabs(mountpoint) or \
            any(ord(ch) < 32 or ord(ch) == 127 for ch in mountpoint):
        raise ValueError("the mountpoint must be an absolute path without control characters")
    if not isinstance(cfg.ref, str) or any(ord(ch) < 32 for ch in cfg.ref):
        raise ValueError("bad image reference")
    raw_env = request["env"]
    if not isinstance(raw_env, dict):
        raise ValueError("env must be an object")
    env = daemon_environment({str(k): str(v) for k, v in raw_env.items()})
    return cfg, env, bool(request.get("verbose"))


def _daemon_child(conn: socket.socket, cfg: MountConfig, env: dict[str, str], log_path: Path,
                  verbose: bool) -> int:
    """In the forked child: become the mount's daemon, report on the connection."""
    from casfs.daemon import serve_reporting

    os.environ.clear()
    os.environ.update(env)
    detach(open_log(log_path), verbose)
    fd = os.dup(conn.fileno())
    conn.close()
    os.set_blocking(fd, True)
    os.write(fd, f"pid {os.getpid()}\n".encode())
    return serve_reporting(cfg, fd)
