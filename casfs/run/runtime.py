"""Driving an OCI runtime (runc or crun) for `casfs run`: create, start, wait, delete.

casfs makes itself a child subreaper, then `<runtime> create`s the container: the
container's init is orphaned when the runtime's create process exits and becomes casfs's
child, so casfs waits for it directly (its exit status is the container's) and sends it
the signals casfs receives (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2), as
conmon and containerd's shim do. Without a terminal the container's stdin (with -i;
/dev/null otherwise), stdout and stderr are casfs's own descriptors, passed through.
With -t the runtime creates a pty and hands its master to casfs over the console socket
(`--console-socket`, SCM_RIGHTS); casfs copies between its own stdio and the master,
puts its terminal in raw mode, and follows its window size (SIGWINCH).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casfs.errors import CreateFailed, RunError

RUNTIMES = ("crun", "runc")
RUNTIME_ENV = "CASFS_RUNTIME"
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)
PR_SET_CHILD_SUBREAPER = 36


def find_runtime(asked: str | None) -> tuple[str, str]:
    """(name, absolute path) of the runtime to use: --runtime (a name or a path), else
    $CASFS_RUNTIME, else crun, else runc, whichever is installed (runc first where crun
    refuses the node's cgroup layout)."""
    asked = asked or os.environ.get(RUNTIME_ENV) or None
    order = list(RUNTIMES) if not crun_refuses_cgroups() else ["runc", "crun"]
    for name in [asked] if asked else order:
        path = name if "/" in name else shutil.which(name, path=os.environ.get("PATH", "") +
                                                     ":/usr/sbin:/usr/bin:/sbin:/bin")
        if path and os.access(path, os.X_OK):
            return os.path.basename(name), os.path.abspath(path)
    if asked:
        raise RunError(f"OCI runtime {asked!r} not found")
    raise RunError("no OCI runtime found: install crun or runc (Debian: apt-get install crun)")


def crun_refuses_cgroups() -> bool:
    """Whether crun (1.8) refuses this node's cgroups: a hybrid layout (v1 controllers
    under /sys/fs/cgroup, plus a v2 hierarchy at /sys/fs/cgroup/unified) whose v2 side
    holds controllers no v1 hierarchy has taken (systemd's hybrid layout mounts them
    all as v1). runc handles it."""
    try:
        with open("/sys/fs/cgroup/unified/cgroup.controllers") as f:
            return bool(f.read().strip())
    except OSError:
        return False


def set_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise RunError(f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(ctypes.get_errno())}")


class Runtime:
    def __init__(self, name: str, path: str, state_root: Path) -> None:
        self.name = name
        self.path = path
        self.root = state_root / "runtime" / name
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def argv(self, *args: str) -> list[str]:
        return [self.path, "--root", str(self.root), *args]

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise RunError(f"{self.name} {args[0]} failed: {last_line(proc.stderr)}")
        return proc

    def delete(self, cid: str) -> None:
        self.run("delete", "--force", cid, check=False)

    def kill(self, cid: str, sig: str = "KILL") -> None:
        self.run("kill", cid, sig, check=False)

    def state(self, cid: str) -> str | None:
        """The runtime's status of a container (running, stopped, ...), None if unknown."""
        import json

        proc = self.run("state", cid, check=False)
        if proc.returncode != 0:
            return None
        try:
            return str(json.loads(proc.stdout).get("status"))
        except ValueError:
            return None


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no message"


class Session:
    """One container's process, from create to exit."""

    def __init__(self, runtime: Runtime, cid: str, bundle: Path, tty_mode: bool,
                 interactive: bool) -> None:
        self.runtime = runtime
        self.cid = cid
        self.bundle = bundle
        self.tty = tty_mode
        self.interactive = interactive
        self.pid: int | None = None
        self.master: int | None = None
        self.pending: list[int] = []

    # -- create ----------------------------------------------------------------------

    def create(self) -> int:
        """Create the container (not yet started); returns its init's pid."""
        set_subreaper()
        pid_file = self.bundle.parent / "init.pid"
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        args = ["create", "--bundle", str(self.bundle), "--pid-file", str(pid_file)]
        sock_dir = None
        listener = None
        if self.tty:
            sock_dir = tempfile.mkdtemp(prefix="casfs-console-")
            sock_path = os.path.join(sock_dir, "console.sock")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(sock_path)
            listener.listen(1)
            args += ["--console-socket", sock_path]
        stdin: int = subprocess.DEVNULL
        if self.interactive and not self.tty:
            stdin = 0
        # Without a terminal the runtime hands its own stdio to the container: they must
        # be casfs's (a pipe here would stay open as long as the container runs). What
        # went wrong is read back from the runtime's log instead.
        log = self.bundle.parent / "runtime.log"
        with contextlib.suppress(FileNotFoundError):
            log.unlink()
        argv = self.runtime.argv(*args, self.cid)
        argv[1:1] = ["--log", str(log)]
        try:
            proc = subprocess.Popen(argv, stdin=stdin,
                                    stdout=subprocess.DEVNULL if self.tty else None,
                                    stderr=subprocess.DEVNULL if self.tty else None)
            if listener is not None:
                self.master = self._receive_console(listener, proc)
            if proc.wait() != 0:
                raise CreateFailed(_read_log(log))
            self.pid = int(pid_file.read_text().strip())
        finally:
            if listener is not None:
                listener.close()
            if sock_dir is not None:
                shutil.rmtree(sock_dir, ignore_errors=True)
        return self.pid

    def _receive_console(self, listener: socket.socket, proc: subprocess.Popen[bytes]) -> int:
        listener.settimeout(0.2)
        while True:
            try:
                conn, _ = listener.accept()
                break
            except TimeoutError:
                if proc.poll() is not None:
                    log = self.bundle.parent / "runtime.log"
                    raise CreateFailed(_read_log(log)) from None
        with conn:
            conn.settimeout(30)
            _, fds, _, _ = socket.recv_fds(conn, 4096, 1)
        if not fds:
            raise RunError(f"{self.runtime.name} sent no console on the console socket")
        return fds[0]

    # -- start and wait --------------------------------------------------------------

    def start(self) -> None:
        self.runtime.run("start", self.cid)
        for sig in self.pending:
            self.forward(sig)

    def forward(self, sig: int) -> None:
        if self.pid is None:
            self.pending.append(sig)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def wait(self) -> int:
        """Serve the container until its init exits; its exit code (128+N for signal N)."""
        assert self.pid is not None
        if self.master is not None:
            self._copy_tty()
        while True:
            try:
                _, status = os.waitpid(self.pid, 0)
                break
            except ChildProcessError:
                return 255
        reap_orphans()
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def _copy_tty(self) -> None:
        assert self.master is not None and self.pid is not None
        master = self.master
        pidfd = os.pidfd_open(self.pid)
        stdin_tty = os.isatty(0)
        saved = None
        if self.interactive and stdin_tty:
            saved = termios.tcgetattr(0)
            tty.setraw(0)
        self._sync_size()
        old_winch = signal.signal(signal.SIGWINCH, lambda *_: self._sync_size())
        read_stdin = self.interactive
        try:
            while True:
                fds = [master, pidfd] + ([0] if read_stdin else [])
                try:
                    ready, _, _ = select.select(fds, [], [])
                except InterruptedError:
                    continue
                if master in ready and not _pump(master, 1):
                    break
                if 0 in ready:
                    data = os.read(0, 65536)
                    if data:
                        _write_all(master, data)
                    else:
                        read_stdin = False
                        with contextlib.suppress(OSError):
                            _write_all(master, b"\x04")  # EOF on the terminal
                if pidfd in ready:
                    os.set_blocking(master, False)
                    with contextlib.suppress(OSError):
                        while _pump(master, 1):
                            pass
                    break
        finally:
            signal.signal(signal.SIGWINCH, old_winch)
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
            os.close(pidfd)
            os.close(master)
            self.master = None

    def _sync_size(self) -> None:
        if self.master is None:
            return
        size = None
        for fd in (0, 1, 2):
            if os.isatty(fd):
                with contextlib.suppress(OSError):
                    size = fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8)
                    break
        if size is None:
            size = struct.pack("HHHH", 24, 80, 0, 0)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)


def _read_log(path: Path) -> str:
    """The runtime's error messages from its --log file (runc writes JSON lines, crun
    text)."""
    import json

    try:
        raw = path.read_text(errors="replace")[-16384:]
    except OSError:
        return ""
    lines = []
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            lines.append(line)
            continue
        if isinstance(entry, dict):
            if entry.get("level") in ("error", "fatal", None):
                lines.append(str(entry.get("msg", line)))
        else:
            lines.append(line)
    return "\n".join(lines)


def _pump(src: int, dst: int) -> bool:
    """Copy what src has to dst; False at its end (EIO on a pty master whose slave closed)."""
    try:
        data = os.read(src, 65536)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.EIO:
            return False
        raise
    if not data:
        return False
    _write_all(dst, data)
    return True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def reap_orphans() -> None:
    """Collect any other process orphaned to casfs as the subreaper (runtime helpers)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def install_forwarding(handler: Callable[[int], None]) -> dict[int, Any]:
    """Send the signals casfs gets to `handler`; returns the previous handlers."""
    old: dict[int, Any] = {}
    for sig in FORWARDED:
        old[sig] = signal.signal(sig, lambda s, _f: handler(s))
    return old


def restore_signals(old: dict[int, Any]) -> None:
    for sig, h in old.items():
        signal.signal(sig, h)
