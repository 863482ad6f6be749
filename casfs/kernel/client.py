"""`casfs mount|umount|stats` talking to the node view service (casfs.kernel.service):
start it when no one serves the cache directory yet (asking the node agent to fork it
warm when an agent runs, else forking it here), send it a request, read its answer.
While a view fails over or is being replaced (casfs.failover), its socket does not
answer for a moment: a request then waits for the successor through the agent.
Light on imports: the front end loads this before it knows whether it needs more.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from casfs.errors import MountError, ServiceUnavailable
from casfs.kernel.paths import log_path, socket_path
from casfs.mountconfig import MountConfig
from casfs.process import connect_private, daemon_environment


class KernelFallback(Exception):  # noqa: N818 - auto mode serves through FUSE instead
    """This image cannot be served in kernel mode; the reason is the message."""


def request(cache_dir: str, message: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    """One request to the service; its answer. ServiceUnavailable when none runs (and
    the agent, if any, holds no view coming back), KernelFallback for "fallback",
    MountError for "error"."""
    try:
        sock = connect_private(socket_path(cache_dir), timeout=timeout)
    except ServiceUnavailable:
        if not _view_coming_back(cache_dir):
            raise
        sock = connect_private(socket_path(cache_dir), timeout=timeout)
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise MountError(f"the node view did not answer in {timeout:.0f}s; see "
                                 f"{log_path(cache_dir)}") from None
            if not chunk:
                break
            buf += chunk
    finally:
        sock.close()
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    if line.startswith("ok"):
        return json.loads(line[2:].strip() or "{}")
    if line.startswith("fallback: "):
        raise KernelFallback(line[len("fallback: "):])
    if line.startswith("error: "):
        raise MountError(line[len("error: "):])
    raise MountError(f"the node view closed the connection; see {log_path(cache_dir)}")


def _view_coming_back(cache_dir: str, timeout: float = 30.0) -> bool:
    """Whether the agent holds a view of cache_dir that serves again (after waiting for
    it to: a failover, a handover). False without an agent, or when it holds none."""
    from casfs.agent import AgentUnavailable, request_view

    try:
        return request_view(cache_dir, 0, start=False, timeout=timeout)
    except (AgentUnavailable, MountError):
        return False


def ensure_service(cache_dir: str, cache_size: int, verbose: bool = False,
                   timeout: float = 60.0) -> None:
    """Make sure the node view serves cache_dir: the node agent forks it (warm) when one
    runs, else it is forked from this process. A lock file keeps two `casfs mount` from
    starting two."""
    from casfs.agent import AgentUnavailable, request_view

    lock = os.open(Path(cache_dir) / "view.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(ServiceUnavailable):
            connect_private(socket_path(cache_dir), timeout=5).close()
            return
        try:
            request_view(cache_dir, cache_size, verbose, start=True, timeout=timeout)
            return
        except AgentUnavailable:
            pass  # no agent: this process starts the view
        _spawn(cache_dir, cache_size, verbose, timeout, lock)
    finally:
        os.close(lock)


def _spawn(cache_dir: str, cache_size: int, verbose: bool, timeout: float,
           lock: int) -> None:
    from casfs.cache import ChunkCache
    from casfs.process import (
        FAILED,
        READY,
        detach,
        last_error_line,
        open_log,
        read_until,
        reap,
    )

    # A cache directory the view could not use (a full disk, a foreign format) fails
    # here, with its own one-line error and exit status, not as "the view did not start".
    ChunkCache(cache_dir, cache_size).close()
    logfile = log_path(cache_dir)
    read_fd, write_fd = os.pipe()
    try:
        log_fd = open_log(logfile)
    except OSError as exc:
        from casfs.errors import CacheError

        os.close(read_fd)
        os.close(write_fd)
        raise CacheError(f"cannot write the node view's log {logfile}: {exc.strerror}") from exc
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            os.close(lock)  # the service must not hold the start lock for its whole life
            # A daemon of its own: it outlives this command and serves later mounts.
            if os.fork() != 0:
                os._exit(0)
            env = daemon_environment(dict(os.environ))
            os.environ.clear()
            os.environ.update(env)
            detach(log_fd, verbose, logfile, title=f"casfs view {cache_dir}")
            from casfs.kernel.service import serve_view

            code = serve_view(cache_dir, cache_size, write_fd)
        finally:
            os._exit(code)
    os.close(write_fd)
    os.close(log_fd)
    reap(pid, 5.0)
    try:
        buf = read_until(read_fd, time.monotonic() + timeout, lambda got: b"\n" in got)
    finally:
        os.close(read_fd)
    if buf.startswith(READY):
        return
    if buf.startswith(FAILED):
        raise MountError(buf[len(FAILED):].decode(errors="replace").strip())
    raise MountError(last_error_line(logfile) or f"the node view did not start; see {logfile}")


def mount(cfg: MountConfig, verbose: bool = False) -> int:
    """Mount cfg in kernel mode; the service's pid. KernelFallback when the image cannot
    be served so (auto mode then mounts it with FUSE)."""
    ensure_service(cfg.cache_dir, cfg.cache_size, verbose)
    answer = request(cfg.cache_dir, {"op": "mount", "config": cfg.as_dict(),
                                     "env": daemon_environment(dict(os.environ))})
    return int(answer["pid"])


def umount(cache_dir: str, mountpoint: str) -> bool:
    """Unmount a kernel-mode mount; whether it was the service's last (it then exits)."""
    return bool(request(cache_dir, {"op": "umount", "mountpoint": mountpoint}).get("last"))


def stats(cache_dir: str, mountpoint: str) -> dict[str, Any]:
    return request(cache_dir, {"op": "stats", "mountpoint": mountpoint}, timeout=10.0)


def unmount(real: str, record: dict[str, Any], timeout: float = 15.0) -> None:
    """A kernel-mode mount: the node view takes it down (saving its trace); when the
    view is gone (killed), the overlay is unmounted here."""
    from casfs.mounts import force_unmount, remove_record, wait_for_exit

    pid = int(record.get("pid", 0))
    try:
        last = umount(str(record.get("cache_dir", "")), real)
    except ServiceUnavailable:
        # The node view is gone: nothing to save; detach the orphaned stack.
        force_unmount(real)
        remove_record(real)
        return
    if last:
        wait_for_exit(pid, timeout)
