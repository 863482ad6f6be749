"""Real casfs mounts for tests and benchmarks: `casfs <cmd>` in a subprocess, mounts made
in the background and always taken down again, reads bounded by a timeout.

Owns: the FUSE availability check, the mount table and fusectl helpers, `Mount`,
`start_mount`/`mounted`/`unmount_checked`/`force_cleanup`, `clear_leftovers`, bounded
reads in a child process and `wait_stats`. tests/mounthelp.py adds the pytest side
(`require_fuse`: skip, or fail when CI=true); benchmarks use this module directly.

Every mount made through :func:`mounted` is unmounted with `casfs umount` when the
block ends normally, and the helper then checks that the mountpoint is no longer a
mount and that the daemon process is gone. When the block raised, or `casfs umount`
itself fails or hangs, the mount is torn down by force: the FUSE connection is
aborted through fusectl (which unblocks any process stuck in D state on it), the
mountpoint lazily unmounted and the daemon killed. Nothing is left behind either way.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CASFS = [sys.executable, "-m", "casfs.cli"]
FUSECTL = "/sys/fs/fuse/connections"
STATS_XATTR = "user.casfs.stats"
CLI_TIMEOUT = 60.0


# -- availability ---------------------------------------------------------------------------

def fuse_unavailable_reason() -> str | None:
    """Why real FUSE mounts cannot be made here, or None when they can."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as exc:
        return f"cannot open /dev/fuse: {exc.strerror}"
    os.close(fd)
    try:
        import pyfuse3  # noqa: F401
    except ImportError as exc:
        return f"pyfuse3 is not importable: {exc}"
    if os.geteuid() != 0:
        return "FUSE mount tests need root (allow_other, suid/dev, fusectl abort)"
    return None


def kernel_mode_unavailable_reason() -> str | None:
    """Why kernel-mode mounts cannot be made here, or None when they can."""
    from casfs.kernel.support import unsupported_reason

    return fuse_unavailable_reason() or unsupported_reason()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# -- images -----------------------------------------------------------------------------------

def cli(*args: str, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    """`casfs <args>` in a subprocess (python -m casfs.cli)."""
    full_env = dict(os.environ)
    full_env.pop("CASFS_STORE", None)
    if env:
        full_env.update(env)
    proc = subprocess.run([*CASFS, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"casfs {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return proc


def index_layout(layout: str | os.PathLike[str], tag: str, store_url: str,
                 name: str | None = None) -> str:
    """Index an OCI layout into a store; returns the manifest reference (blake3:<hex>)."""
    from casfs.store import open_store
    from indexer.index import index_image

    store = open_store(store_url, create=True)
    return index_image(f"oci:{os.fspath(layout)}:{tag}", store, tag=name).ref


def build_and_index(path: Path, layers: Sequence[Any], store_url: str, *,
                    name: str | None = None, compression: str = "gzip") -> str:
    """Write an OCI layout of ``layers`` at ``path`` (tag "t") and index it into the store."""
    from casfs.testing import ocibuild as ob

    ob.write_oci_layout(path, layers, tag="t", compression=compression)  # type: ignore[arg-type]
    return index_layout(path, "t", store_url, name=name)


# -- the mount table, fusectl -------------------------------------------------------------------

def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def mount_entry(mountpoint: str | os.PathLike[str]) -> dict[str, str] | None:
    """This process's /proc/self/mountinfo entry for a mountpoint (the last one), or None.

    Read from the mount table only: a stat of a hung FUSE mount would block."""
    target = os.path.abspath(os.fspath(mountpoint))
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if _unescape(fields[4]) == target:
                rest = right.split()
                found = {"dev": fields[2], "options": fields[5], "fstype": rest[0],
                         "source": rest[1], "super_options": rest[2] if len(rest) > 2 else ""}
    return found


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    return mount_entry(mountpoint) is not None


def mounts_under(prefix: str | os.PathLike[str]) -> list[str]:
    """Every mountpoint at or below a directory, deepest first (from the mount table)."""
    base = os.path.abspath(os.fspath(prefix))
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape(line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


def clear_leftovers(prefix: str | os.PathLike[str]) -> list[str]:
    """Force every mount left below a directory away; returns what was left."""
    left = mounts_under(prefix)
    for point in left:
        force_cleanup(point, None)
    return left


def abort_fuse(mountpoint: str | os.PathLike[str]) -> bool:
    """Abort the FUSE connection behind a mountpoint (unblocks every waiter) and detach it.

    Returns whether a connection was aborted."""
    entry = mount_entry(mountpoint)
    if entry is None:
        return False
    aborted = False
    if entry["fstype"].startswith("fuse"):
        if not os.path.ismount(FUSECTL):
            subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True)
        conn = entry["dev"].split(":")[1]
        with contextlib.suppress(OSError):
            Path(FUSECTL, conn, "abort").write_text("1")
            aborted = True
    subprocess.run(["umount", "-l", os.fspath(mountpoint)], capture_output=True)
    return aborted


# -- processes ------------------------------------------------------------------------------------

def process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


# -- mounts ---------------------------------------------------------------------------------------

@dataclass
class Mount:
    """A running casfs mount made by :func:`start_mount`."""

    mountpoint: Path
    ref: str
    store_url: str
    cache_dir: Path
    pid: int
    log_path: Path
    args: list[str] = field(default_factory=list)
    mode: str = "fuse"  # the serving mode the mount runs in ("fuse" or "kernel")

    def path(self, rel: str) -> Path:
        return self.mountpoint / rel.lstrip("/")

    def stats(self) -> dict[str, Any]:
        """The mount's counters (the JSON `casfs stats --json` prints)."""
        if self.mode == "kernel":
            from casfs.kernel import client

            return client.stats(os.fspath(self.cache_dir), os.fspath(self.mountpoint))
        return json.loads(os.getxattr(self.mountpoint, STATS_XATTR))

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def start_mount(ref: str, mountpoint: str | os.PathLike[str], store_url: str,
                cache_dir: str | os.PathLike[str], *args: str,
                env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT,
                mode: str | None = "fuse") -> Mount:
    """`casfs mount` in the background; returns once it serves (raises AssertionError if not).
    `mode`: the serving mode asked for (--mode): FUSE unless a test asks (tests of what a
    mount shows take the `mode` fixture, which runs them in both); None: casfs's default."""
    if mode is not None:
        args = (*args, "--mode", mode)
    mnt = Path(mountpoint)
    if not is_mounted(mnt):  # a stale mount's stat fails with ENOTCONN
        mnt.mkdir(parents=True, exist_ok=True)
    argv = ["mount", ref, str(mnt), "--store", store_url, "--cache-dir", os.fspath(cache_dir),
            *args]
    try:
        proc = cli(*argv, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        force_cleanup(mnt, None)
        raise AssertionError(f"casfs mount did not return within {timeout}s") from None
    if proc.returncode != 0:
        force_cleanup(mnt, None)
        raise AssertionError(f"casfs mount failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    m = re.search(r"\((\w+) mode[^:]*: daemon pid (\d+), log (.+)\)$", proc.stdout.strip())
    assert m, f"unexpected casfs mount output: {proc.stdout!r}"
    assert is_mounted(mnt), f"casfs mount returned but {mnt} is not mounted"
    return Mount(mnt, ref, store_url, Path(cache_dir), int(m.group(2)), Path(m.group(3)),
                 list(args), m.group(1))


def force_cleanup(mountpoint: str | os.PathLike[str], pid: int | None) -> None:
    """Take a mount down whatever state it is in, and kill its daemon (for a kernel-mode
    mount, the node view: its FUSE view is aborted too)."""
    view = None
    entry = mount_entry(mountpoint)
    if entry is not None and entry["fstype"] == "overlay":
        lower = [opt for opt in entry["super_options"].split(",") if opt.startswith("lowerdir=")]
        if lower:
            view = lower[0].rsplit("::", 1)[-1]
    if is_mounted(mountpoint):
        abort_fuse(mountpoint)
    if pid is not None and process_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 10)
    if view is not None and is_mounted(view) and (pid is None or not process_alive(pid)):
        abort_fuse(view)
    # A mount may have been stacked by a retry; clear all of them.
    for _ in range(5):
        if not is_mounted(mountpoint):
            break
        abort_fuse(mountpoint)


def unmount_checked(m: Mount, timeout: float = 30.0) -> None:
    """`casfs umount`, then assert no mount and no daemon are left (cleaning up if they are)."""
    try:
        proc = cli("umount", str(m.mountpoint), timeout=timeout)
    except subprocess.TimeoutExpired:
        state = process_state(m.pid)
        force_cleanup(m.mountpoint, m.pid)
        raise AssertionError(f"casfs umount hung for {timeout}s (daemon state {state}); "
                             f"log:\n{m.log()[-3000:]}") from None
    problems = []
    if proc.returncode != 0:
        problems.append(f"casfs umount failed ({proc.returncode}): {proc.stderr.strip()}")
    if is_mounted(m.mountpoint):
        problems.append(f"{m.mountpoint} is still mounted after casfs umount")
    if m.mode == "kernel" and _other_kernel_mounts(m):
        pass  # the node view serves other mounts of this cache dir: it stays
    elif not wait_gone(m.pid, 5):
        problems.append(f"daemon {m.pid} still running after casfs umount "
                        f"(state {process_state(m.pid)})")
    if problems:
        force_cleanup(m.mountpoint, m.pid)
        raise AssertionError("; ".join(problems) + f"\nlog:\n{m.log()[-3000:]}")


def _other_kernel_mounts(m: Mount) -> bool:
    """Whether the node view of m's cache dir serves another mount still."""
    from casfs.mounts import records_dir

    for path in records_dir().glob("*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("mode") == "kernel" and record.get("pid") == m.pid and \
                record.get("mountpoint") != os.path.realpath(m.mountpoint):
            return True
    return False


@contextlib.contextmanager
def mounted(ref: str, mountpoint: str | os.PathLike[str], store_url: str,
            cache_dir: str | os.PathLike[str], *args: str,
            env: dict[str, str] | None = None, mode: str | None = "fuse") -> Iterator[Mount]:
    """Mount in the background for the block; unmount (checked) after it, forcibly on error."""
    m = start_mount(ref, mountpoint, store_url, cache_dir, *args, env=env, mode=mode)
    try:
        yield m
    except BaseException:
        force_cleanup(m.mountpoint, m.pid)
        raise
    unmount_checked(m)


# -- reading with a bound -----------------------------------------------------------------------

_READER = r"""
import errno, json, os, sys, time
out = []
for path in sys.argv[1:]:
    t = time.monotonic()
    try:
        with open(path, "rb") as f:
            data = f.read()
        import blake3
        out.append({"path": path, "ok": True, "hash": blake3.blake3(data).hexdigest(),
                    "size": len(data), "seconds": time.monotonic() - t})
    except OSError as exc:
        out.append({"path": path, "ok": False, "errno": exc.errno,
                    "seconds": time.monotonic() - t})
print(json.dumps(out))
"""


def read_in_subprocess(paths: Sequence[str | os.PathLike[str]], timeout: float,
                       mountpoint: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read whole files in a child process, bounded by ``timeout``.

    A read stuck in the kernel cannot be interrupted from Python; if the child does not
    finish in time the mount's FUSE connection is aborted (which fails the read) and the
    test fails with the reason."""
    names = [os.fspath(p) for p in paths]
    child = subprocess.Popen([sys.executable, "-c", _READER, *names],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        state = process_state(child.pid)
        abort_fuse(mountpoint)
        child.kill()
        child.communicate(timeout=10)
        raise AssertionError(f"reading {names} took over {timeout}s "
                             f"(reader state {state}); aborted the mount") from None
    assert child.returncode == 0, err
    return json.loads(out)


def drop_file_cache(path: str | os.PathLike[str]) -> None:
    """Drop one file's pages from the page cache, so the next read reaches the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))


def wait_stats(m: Mount, pred: Callable[[dict], bool], what: str, timeout: float = 30.0,
               interval: float = 0.05) -> dict:
    """The mount's stats once pred holds; an AssertionError with its log after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        st = m.stats()
        if pred(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; stats prefetch "
                                 f"{st.get('prefetch')}\nlog:\n{m.log()[-3000:]}")
        time.sleep(interval)
