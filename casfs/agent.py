"""The node agent: a resident process, one per cache directory, that starts mount
daemons (and the kernel mode's node view) already warm, holds every FUSE connection of
the node for failover, replaces its daemons on upgrade, and serves the node's metrics.

Warm starts. Starting a mount daemon from nothing costs a Python start-up and the import
of trio, pyfuse3 and casfs: about 200 ms on a small machine. The agent pays that once:
it imports everything a daemon needs, then waits on a Unix socket
(`<cache-dir>/agent.sock`, mode 0600, connections from its own uid only). For each
`casfs mount` that connects, it forks; the child becomes the mount's daemon (its own
session, its log, the caller's environment) and reports through the connection: a line
`pid N`, then `ready` or `error: <message>`. A kernel-mode `casfs mount` asks it for the
node view the same way (`{"op": "view"}`) when none serves the cache directory yet.
Without an agent, `casfs mount` forks its daemon (or the view) itself, as before.

Failover (casfs.failover). Every serving process of the cache directory (the daemons it
forks, those `casfs mount` forked itself, the node view) links to the agent and hands
it a duplicate of its /dev/fuse descriptor. The agent watches each process (a pidfd)
and each connection (the descriptor polls POLLERR once unmounted). When a process ends
without saying `release` (a crash, SIGKILL, the OOM killer), the agent forks a
successor from itself (warm: tens of milliseconds) that takes the same connection over
(a kernel-mode view also re-attaches its mounts); readers see a stall, not an error.
A successor that cannot start is retried with backoff; after START_FAILURES_MAX in a row
the agent lets the connection go (its requests then fail with ENOTCONN, as they would
without an agent).

Upgrades. `casfs agent restart` starts a successor agent (the casfs now installed)
that takes over the old agent's listening socket and every held connection
(`{"op": "handover"}`: descriptors over SCM_RIGHTS), then asks each serving process for
a graceful handover and starts its replacement: nothing is unmounted. An agent also
replaces any process that links to it running other code than its own (a daemon left
from before an upgrade).

Node metrics. With `--metrics-port`, one Prometheus endpoint for the node
(casfs.nodemetrics): at each scrape the agent asks every linked process for its stats.

The agent runs no threads (forking a threaded process is unsafe) and blocks on nothing:
one epoll loop. Killing it (SIGKILL) leaves every mount serving (each process holds its
own descriptor) but without failover until an agent runs again: the processes link to
the next one by themselves (within about two seconds of it listening).

    casfs agent start [--cache-dir DIR] [--foreground] [--metrics-port [HOST:]PORT]
    casfs agent stop|status|restart [--cache-dir DIR]

The agent trusts nobody's settings: a request names a mount, never a file to write
(the agent picks the log path), a daemon gets only the caller's AWS_*, CASFS_* and HOME
variables (PATH is the system's), and the mount's cache directory must be the agent's
own. `casfs mount` checks that the socket and the process answering on it belong to its
own user before it sends anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from casfs.errors import AgentError, AgentUnavailable, MountError, ServiceUnavailable
from casfs.locations import mount_log_path
from casfs.mountconfig import MountConfig
from casfs.process import (
    connect_private,
    daemon_environment,
    detach,
    listen_private,
    open_log,
    read_until,
)

SOCKET_NAME = "agent.sock"
PID_NAME = "agent.pid"
LOG_NAME = "agent.log"
PROTOCOL = 2
# `casfs agent status` exit codes, as systemctl/LSB use them
STATUS_RUNNING = 0
STATUS_DEAD_PIDFILE = 1
STATUS_NOT_RUNNING = 3
STATUS_UNKNOWN = 4

__all__ = ["AgentError", "AgentUnavailable", "agent_report", "agent_status",
           "agent_status_code", "mount_via_agent", "request_view", "restart_agent",
           "start_agent", "stop_agent"]

log = logging.getLogger("casfs.agent")


def socket_path(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir) / SOCKET_NAME


def log_path(cache_dir: str | os.PathLike[str]) -> Path:
    return Path(cache_dir) / "logs" / LOG_NAME


# -- the client side (`casfs mount`, `casfs agent ...`): no heavy imports ------------------------


def mount_via_agent(cfg: MountConfig, verbose: bool = False, timeout: float = 60.0) -> int:
    """Ask the cache directory's agent for a daemon serving cfg; its pid once it serves.

    AgentUnavailable when no agent of ours listens there (no socket, a stale one, one
    that belongs to another user); MountError with the daemon's own one-line message
    when the mount fails. Nothing is sent before the answering process is known to run
    as this user: the request carries the caller's store credentials.
    """
    path = socket_path(cfg.cache_dir)
    log_file = mount_log_path(cfg.cache_dir, cfg.mountpoint)
    sock = connect_private(path)
    try:
        request = {"protocol": PROTOCOL, "config": cfg.as_dict(),
                   "env": daemon_environment(dict(os.environ)), "verbose": verbose}
        sock.sendall(json.dumps(request).encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        return _await_ready(sock, log_file, time.monotonic() + timeout)
    finally:
        sock.close()


def _await_ready(sock: socket.socket, log_file: Path, deadline: float) -> int:
    buf = b""
    pid = None
    while True:
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            chunk = sock.recv(4096)
        except TimeoutError:
            raise MountError(f"the mount daemon did not become ready; see {log_file}") from None
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
                                 or f"the mount daemon failed; see {log_file}")
            elif text.startswith("refused: "):  # the agent's own answer: not for us
                raise AgentUnavailable(text[len("refused: "):])
    if pid is None:
        raise AgentUnavailable("the agent closed the connection without starting a daemon")
    raise MountError(f"the mount daemon exited before serving; see {log_file}")


def _ask(cache_dir: str, message: dict[str, Any], timeout: float) -> str:
    """One request to the agent; the first line of its answer. AgentUnavailable when
    none answers."""
    try:
        sock = connect_private(socket_path(cache_dir), timeout=min(timeout, 5.0))
    except ServiceUnavailable as exc:
        raise AgentUnavailable(str(exc)) from None
    try:
        sock.sendall(json.dumps(message).encode() + b"\n")
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AgentError(f"the agent did not answer in {timeout:.0f}s") from None
            if not chunk:
                break
            buf += chunk
    except OSError as exc:
        raise AgentUnavailable(f"the agent went away: {exc.strerror or exc}") from None
    finally:
        sock.close()
    line = buf.split(b"\n", 1)[0].decode(errors="replace")
    if not line:
        raise AgentUnavailable("the agent closed the connection")
    if line.startswith("refused: "):
        raise AgentUnavailable(line[len("refused: "):])
    return line


def request_view(cache_dir: str, cache_size: int, verbose: bool = False, start: bool = True,
                 timeout: float = 60.0) -> bool:
    """Kernel mode: have the agent make sure the node view serves cache_dir (forking it
    warm when `start` and none runs, waiting for one failing over). Whether a view
    serves; AgentUnavailable without an agent, MountError with the view's error."""
    line = _ask(cache_dir, {"op": "view", "cache_size": cache_size, "verbose": verbose,
                            "start": start, "env": daemon_environment(dict(os.environ))},
                timeout)
    if line == "ready":
        return True
    if line == "none":
        return False
    if line.startswith("error: "):
        raise MountError(line[len("error: "):])
    raise AgentUnavailable(f"unexpected answer {line!r}")


def agent_report(cache_dir: str, timeout: float = 10.0) -> dict[str, Any] | None:
    """What the agent of cache_dir holds (pid, code, held connections...), or None."""
    try:
        line = _ask(cache_dir, {"op": "status"}, timeout)
    except AgentUnavailable:
        return None
    try:
        report = json.loads(line)
    except ValueError:
        return None
    return report if isinstance(report, dict) else None


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


def agent_status_code(cache_dir: str) -> int:
    """`casfs agent status` as systemctl (LSB) counts: 0 running, 1 not running but its
    pid file left behind (killed), 3 not running, 4 cannot tell."""
    pid_file = Path(cache_dir) / PID_NAME
    try:
        exists = pid_file.exists()
        if agent_status(cache_dir) is not None:
            return STATUS_RUNNING
    except PermissionError:
        return STATUS_UNKNOWN
    return STATUS_DEAD_PIDFILE if exists else STATUS_NOT_RUNNING


def stop_agent(cache_dir: str, timeout: float = 10.0) -> int | None:
    """Stop the agent of cache_dir (mounts keep serving, without failover until an agent
    runs again); its pid, or None if none ran."""
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


class RestartReport:
    """What `casfs agent restart` did: the new agent's pid, each process replaced (key,
    old pid, new pid, stall seconds), and those it could not replace (key: why)."""

    def __init__(self, pid: int, started_fresh: bool) -> None:
        self.pid = pid
        self.started_fresh = started_fresh  # no agent ran: one was started
        self.replaced: list[tuple[str, int, int, float]] = []
        self.not_replaced: dict[str, str] = {}


def restart_agent(cache_dir: str, verbose: bool = False, metrics: str | None = None,
                  timeout: float = 120.0) -> RestartReport:
    """Replace the agent of cache_dir and every process it holds, unmounting nothing:
    a successor agent (this process's casfs) takes the old one's socket and descriptors
    over, then hands each mount to a new daemon (and the node view to a new view).
    Without a running agent, start one."""
    if agent_status(cache_dir) is None:
        return RestartReport(start_agent(cache_dir, verbose=verbose, metrics=metrics), True)
    log_file = log_path(cache_dir)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = open_log(log_file)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            # a daemon of its own: it outlives this command (systemd: NotifyAccess=all
            # lets it report its MAINPID)
            if os.fork() != 0:
                os._exit(0)
            from casfs.process import journal_stderr

            journal = journal_stderr()
            detach(None if journal else log_fd, verbose, None if journal else log_file)
            code = _serve(None, cache_dir, ready_fd=write_fd, metrics=metrics,
                          verbose=verbose, successor=True)
        except BaseException:  # noqa: BLE001 - report, then exit with the status
            log.exception("the successor agent failed")
        finally:
            os._exit(code)
    os.close(write_fd)
    os.close(log_fd)
    os.waitpid(pid, 0)
    report: RestartReport | None = None
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while time.monotonic() < deadline:
            got = read_until(read_fd, deadline, lambda b: b"\n" in b)
            if not got:
                break
            buf += got
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                words = line.decode(errors="replace").split(" ")
                if words[0] == "ok" and len(words) > 1:
                    report = RestartReport(int(words[1]), False)
                elif words[0] == "error":
                    raise AgentError(" ".join(words[1:]) or f"the restart failed; see {log_file}")
                elif words[0] == "replaced" and report is not None and len(words) == 5:
                    report.replaced.append((words[1], int(words[2]), int(words[3]),
                                            float(words[4])))
                elif words[0] == "failed" and report is not None and len(words) >= 2:
                    report.not_replaced[words[1]] = " ".join(words[2:])
                elif words[0] == "done":
                    if report is None:
                        break
                    return report
    finally:
        os.close(read_fd)
    if report is None:
        raise AgentError(f"the new agent did not start; see {log_file}")
    raise AgentError(f"the new agent (pid {report.pid}) did not finish replacing the "
                     f"daemons in {timeout:.0f}s; see {log_file}")


# -- starting the agent ------------------------------------------------------------------------


def start_agent(cache_dir: str, foreground: bool = False, verbose: bool = False,
                timeout: float = 30.0, metrics: str | None = None) -> int:
    """Start the agent of cache_dir: serve in this process (foreground), or fork it off
    and return its pid once it listens. `metrics`: [HOST:]PORT of the node's Prometheus
    endpoint (default $CASFS_AGENT_METRICS; HOST defaults to 127.0.0.1)."""
    from casfs.cache import ChunkCache
    from casfs.process import journal_stderr

    ChunkCache(cache_dir).close()  # a usable, private cache directory, or its one-line error
    if _answers(socket_path(cache_dir)):
        running = agent_status(cache_dir)
        raise AgentError(f"an agent already serves {cache_dir}"
                         + (f" (pid {running})" if running else ""))
    metrics = metrics if metrics is not None else os.environ.get("CASFS_AGENT_METRICS") or None
    metrics_sock = _listen_metrics(metrics) if metrics else None
    listener = _listen(socket_path(cache_dir))
    if foreground:
        return _serve(listener, cache_dir, metrics_sock=metrics_sock, metrics=metrics,
                      verbose=verbose)
    log_file = log_path(cache_dir)
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = open_log(log_file)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            journal = journal_stderr()
            detach(None if journal else log_fd, verbose, None if journal else log_file)
            code = _serve(listener, cache_dir, ready_fd=write_fd, metrics_sock=metrics_sock,
                          metrics=metrics, verbose=verbose)
        finally:
            os._exit(code)
    os.close(log_fd)
    listener.close()
    if metrics_sock is not None:
        metrics_sock.close()
    os.close(write_fd)
    try:
        reply = read_until(read_fd, time.monotonic() + timeout, lambda got: b"\n" in got)
        ok = reply.split(b"\n", 1)[0].startswith(b"ok")
    finally:
        os.close(read_fd)
    if not ok:
        raise AgentError(f"the agent did not start; see {log_file}")
    return pid


def _listen(path: Path) -> socket.socket:
    if len(os.fsencode(path)) >= 108:
        raise AgentError(f"{path}: too long for a Unix socket; use a shorter --cache-dir")
    try:
        return listen_private(path)  # a stale one: agent_status() found nobody on it
    except OSError as exc:
        raise AgentError(f"cannot listen on {path}: {exc.strerror}") from exc


def _listen_metrics(address: str) -> socket.socket:
    from casfs.agentloop import listen_metrics

    return listen_metrics(address)


def _serve(listener: socket.socket | None, cache_dir: str, ready_fd: int | None = None,
           metrics_sock: socket.socket | None = None, metrics: str | None = None,
           verbose: bool = False, successor: bool = False) -> int:
    """Run the agent until SIGTERM/SIGINT (or until a successor took over). Once the
    imports are done, the pid file written and the socket listening, "ok <pid>" goes to
    ready_fd (a successor then reports each replacement, and "done")."""
    # Everything a daemon or the node view imports, imported once here: children start warm.
    import casfs.daemon  # noqa: F401
    import casfs.fuse_ops  # noqa: F401
    import casfs.kernel.service  # noqa: F401
    import casfs.nodemetrics  # noqa: F401
    import casfs.store.s3  # noqa: F401
    import prefetch.heuristics  # noqa: F401
    import prefetch.recorder  # noqa: F401
    import prefetch.replay  # noqa: F401
    from casfs.agentloop import Agent
    from casfs.failover import code_fingerprint

    code_fingerprint()
    agent = Agent(cache_dir, socket_path(cache_dir), Path(cache_dir) / PID_NAME, listener,
                  metrics_sock, metrics, verbose)
    return agent.run(ready_fd, successor=successor)
