"""Process plumbing shared by the background processes casfs starts (mount daemons, the
node view, the node agent): the log format, detaching stdio onto a log file (reopened on
SIGHUP, rotated past a size cap) or keeping it on the journal when supervised by
systemd, readiness notifications to systemd, malloc arena and open-file limits, and the
one-message pipes a starting process reports "ready" (or its error) on.

Nothing here knows what a mount is; the daemon and the agent use these pieces, and the
CLI uses the log format. Light on imports: the `casfs mount` front end loads it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import stat
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

DAEMON_LOG_FORMAT = "%(asctime)s casfs[%(process)d] %(levelname)s %(name)s: %(message)s"
READY = b"ready\n"
FAILED = b"error: "
# Private state: whatever a background process creates is its owner's alone.
PRIVATE_UMASK = 0o077
# Helpers (fusermount3, umount, mount) run from these directories only, whatever PATH
# the user who started casfs had: a root daemon must not run a planted binary.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# The environment a daemon keeps from whoever asked for it: store credentials and
# endpoints (AWS_*), casfs's own settings, and HOME (where ~/.aws lives). Nothing else:
# not PATH, not LD_PRELOAD, not PYTHONPATH.
ENV_PREFIXES = ("AWS_", "CASFS_")
ENV_NAMES = frozenset({"HOME"})
# Daemon logs: rotated by the process that writes them once past this size
# ($CASFS_LOG_MAX_BYTES), keeping this many older files (<log>.1 newest; $CASFS_LOG_KEEP).
LOG_MAX_BYTES = 16 << 20
LOG_KEEP = 3
LOG_CHECK_SECONDS = 30.0  # how often a process looks at its log's size ($CASFS_LOG_CHECK_SECONDS)
_log_path: Path | None = None  # the file this process's stdout/stderr go to, if any


def daemon_environment(env: dict[str, str]) -> dict[str, str]:
    """The part of a requester's environment a daemon runs with (see ENV_PREFIXES)."""
    out = {k: v for k, v in env.items()
           if (k.startswith(ENV_PREFIXES) or k in ENV_NAMES) and "\0" not in k + v}
    out["PATH"] = SAFE_PATH
    return out


def helper_command(name: str) -> str | None:
    """The absolute path of a system helper (fusermount3, umount...) found on SAFE_PATH."""
    import shutil

    return shutil.which(name, path=SAFE_PATH)


def helper_env() -> dict[str, str]:
    """A clean environment for running a system helper."""
    return {"PATH": SAFE_PATH, "LC_ALL": "C"}


def connect_private(path: Path, timeout: float | None = None) -> socket.socket:
    """A connection to a Unix socket that this user's own process serves: the socket
    file must be a socket this user owns and the peer must run as this user, checked
    before anything is sent (requests carry store credentials). ServiceUnavailable
    otherwise, or when nobody listens."""
    from casfs.errors import ServiceUnavailable

    if len(os.fsencode(path)) >= 108:
        raise ServiceUnavailable(f"{path}: path too long for a Unix socket")
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ServiceUnavailable(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
        raise ServiceUnavailable(f"{path} is not a socket of this user")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
        if peer_uid(sock) != os.geteuid():
            raise ServiceUnavailable(f"{path} is served by another user's process")
    except OSError as exc:  # ENOENT, ECONNREFUSED (stale), EACCES
        sock.close()
        raise ServiceUnavailable(f"{path}: {exc.strerror}") from exc
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket."""
    return int(struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                   12))[1])


def listen_private(path: Path) -> socket.socket:
    """A listening Unix socket only its owner may connect to (0600), replacing a stale
    socket file (the caller has made sure nobody answers on it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    sock.listen(64)
    return sock


def configure_daemon_logging(verbose: bool) -> None:
    """Log lines as a daemon writes them: time, pid, level, logger."""
    logging.basicConfig(force=True, level=logging.DEBUG if verbose else logging.INFO,
                        format=DAEMON_LOG_FORMAT)


def open_log(log_path: Path) -> int:
    """A log file opened for appending, private to its owner (0600), never through a
    symlink: a descriptor the caller dup2()s onto stdout/stderr."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o600)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o600)  # one created by an older casfs (0644)
    return fd


def redirect_stdio(log_fd: int | None) -> None:
    """stdin from /dev/null; stdout and stderr into log_fd (which is closed), or both
    onto stderr (the journal) when log_fd is None: a background process keeps nothing
    of whoever started it but that stream."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    if log_fd is None:
        os.dup2(2, 1)
        return
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)


def set_process_title(title: str) -> bool:
    """Make this process's command line (/proc/<pid>/cmdline, what `ps` shows every user)
    read `title` instead of the argv it was started with: a process forked from
    `casfs mount` without an exec would otherwise show `--store <URL>` for its whole
    life. The argv strings are overwritten in place (as setproctitle does; CPython keeps
    its own copies), padded with NULs; a title longer than the original is cut to fit.
    Needs no privilege. False where it cannot be done (no /proc)."""
    import ctypes

    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: proc(5)
    except (OSError, IndexError, ValueError):
        return False
    size = end - start
    if size <= 1:
        return False
    data = title.encode(errors="replace")[: size - 1]
    ctypes.memmove(start, data + b"\0" * (size - len(data)), size)
    return True


def detach(log_fd: int | None, verbose: bool, log_path: Path | None = None,
           title: str | None = None) -> None:
    """In a forked child becoming a background process: its own session, private
    files, stdio on its log (log_fd, opened from log_path, which SIGHUP reopens and
    rotation renames; None: keep stderr, the journal of a supervised agent), default
    signal dispositions, daemon logging, few malloc arenas; its command line made
    `title` when given (set_process_title)."""
    global _log_path
    if title is not None:
        set_process_title(title)
    os.setsid()
    os.umask(PRIVATE_UMASK)
    redirect_stdio(log_fd)
    _log_path = log_path if log_fd is not None else None
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)
    configure_daemon_logging(verbose)
    limit_malloc_arenas(2)


def log_file() -> Path | None:
    """The file this background process logs to (None: stderr, e.g. the journal)."""
    return _log_path


def reopen_log() -> bool:
    """SIGHUP: open the log file again by its path (logrotate moved it away, or an
    operator removed it) and put stdout and stderr on it. False without a log file."""
    if _log_path is None:
        return False
    try:
        fd = open_log(_log_path)
    except OSError:
        return False
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    return True


def sighup() -> str:
    """What SIGHUP does to a background process (never anything else): its log file
    opened again by its path. The line it logs."""
    return "SIGHUP: " + ("log file reopened" if reopen_log() else
                         "logging to stderr, nothing to reopen")


async def maintain_log() -> None:
    """A trio task: rotate this process's log file once past its cap (rotate_log)."""
    import trio

    log = logging.getLogger("casfs.process")
    while True:
        await trio.sleep(log_check_seconds())
        if rotate_log():
            log.info("log rotated")


def rotate_log(max_bytes: int | None = None, keep: int | None = None) -> bool:
    """Past the size cap, shift <log>.1.. <log>.<keep> (the oldest dropped), move the
    log to <log>.1 and reopen a new one. Whether it rotated."""
    if _log_path is None:
        return False
    cap = max_bytes if max_bytes is not None else \
        _env_int("CASFS_LOG_MAX_BYTES", LOG_MAX_BYTES)
    count = keep if keep is not None else _env_int("CASFS_LOG_KEEP", LOG_KEEP)
    try:
        if cap <= 0 or os.fstat(2).st_size <= cap:
            return False
    except OSError:
        return False
    path = _log_path
    with contextlib.suppress(OSError):
        if count <= 0:
            path.unlink()
        else:
            for i in range(count - 1, 0, -1):
                older = path.with_name(f"{path.name}.{i}")
                if older.exists():
                    os.rename(older, path.with_name(f"{path.name}.{i + 1}"))
            os.rename(path, path.with_name(f"{path.name}.1"))
    return reopen_log()


def log_check_seconds() -> float:
    """How often a background process checks its log's size."""
    try:
        return max(0.05, float(os.environ.get("CASFS_LOG_CHECK_SECONDS", "")))
    except ValueError:
        return LOG_CHECK_SECONDS


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, ""))
    except ValueError:
        return default


def journal_stderr() -> bool:
    """Whether stderr is systemd's journal stream for this service ($JOURNAL_STREAM names
    its device and inode): a supervised process logs there rather than to files."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(2)
        return bool(value) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


def sd_notify(message: str) -> bool:
    """A notification to the service manager on $NOTIFY_SOCKET ("READY=1",
    "STOPPING=1", "MAINPID=N", "STATUS=...", "WATCHDOG=1"), as sd_notify(3) sends it:
    one datagram on a Unix socket (a leading "@" names an abstract one). False when
    not supervised or the send fails; never raises."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target or target[0] not in "/@":
        return False
    address = "\0" + target[1:] if target[0] == "@" else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


def limit_malloc_arenas(count: int) -> None:
    """Dozens of fetch threads would each get a glibc malloc arena; a couple keep the
    daemon's resident memory near what it actually holds (= MALLOC_ARENA_MAX)."""
    import ctypes

    m_arena_max = -8
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, count)


def release_free_memory() -> None:
    """Hand freed heap back to the kernel (glibc keeps it mapped otherwise)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def raise_open_files_limit(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class ReadyPipe:
    """A starting process's one message to whoever waits for it: "ready", or the error
    that stopped it (one line)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ready(self) -> None:
        self._send(READY)

    def fail(self, message: str) -> None:
        self._send(FAILED + message.replace("\n", " ").encode()[:3800] + b"\n")

    def _send(self, data: bytes) -> None:
        fd, self.fd = self.fd, None  # one message; the fd number may be reused after
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, data)
        with contextlib.suppress(OSError):
            os.close(fd)


def serve_reporting(what: str, ready_fd: int | None,
                    serve: Callable[[ReadyPipe], object]) -> int:
    """Run a background process's serve(pipe); its exit status. An error before "ready"
    goes back through the pipe as well as to the log: a casfs error as its one line
    and exit code, anything else as "<what> failed" (status 1, traceback logged)."""
    from casfs.errors import CasfsError

    pipe = ReadyPipe(ready_fd)
    try:
        serve(pipe)
    except CasfsError as exc:
        print(f"casfs: error: {exc}", file=sys.stderr)
        pipe.fail(str(exc))
        return exc.exit_code
    except BaseException as exc:
        logging.getLogger("casfs").exception("%s failed", what)
        pipe.fail(f"{what} failed: {exc!r}")
        return 1
    return 0


def read_until(fd: int, deadline: float, done: Callable[[bytes], bool]) -> bytes:
    """What fd gives until done(all read so far), end of file, or the monotonic deadline."""
    buf = b""
    while not done(buf) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


def reap(pid: int, timeout: float) -> int | None:
    """The exit status of child pid, or None if it is still running after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def last_error_line(log_path: Path) -> str:
    """The last "casfs: error: ..." a process wrote to its log, or ""."""
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if line.startswith("casfs: error: "):
            return line[len("casfs: error: "):]
    return ""
