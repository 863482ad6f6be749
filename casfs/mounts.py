"""Mountpoints on this node: finding casfs mounts, clearing stale ones left by a
crashed daemon, unmounting, and the per-mount records daemons leave in the cache."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from casfs.errors import MountError
from casfs.locations import runtime_dir
from casfs.process import helper_command, helper_env

FSTYPE = "fuse.casfs"


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def mount_table() -> dict[str, str]:
    """mountpoint -> fstype for every mount in this namespace."""
    out = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            out[_unescape(fields[4])] = right.split()[0]
    return out


def mount_device(real_mountpoint: str) -> str | None:
    """The "major:minor" of a mount, from /proc (never a request to the mount itself)."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ")[0].split()
            if _unescape(fields[4]) == real_mountpoint:
                found = fields[2]  # the last (top) mount on that path wins
    return found


def tune_kernel(real_mountpoint: str, readahead_kb: int, max_background: int) -> list[str]:
    """Let the kernel keep many reads in flight to the daemon: a bigger readahead
    window on the mount's bdi, and more background requests on its FUSE connection.
    Needs root and fusectl; does what it can and returns what it changed."""
    dev = mount_device(real_mountpoint)
    if dev is None:
        return []
    done = []
    settings = [(f"/sys/class/bdi/{dev}/read_ahead_kb", readahead_kb)]
    conn = Path("/sys/fs/fuse/connections") / dev.split(":")[1]
    if not conn.exists() and os.geteuid() == 0:
        run_helper("mount", "-t", "fusectl", "none", "/sys/fs/fuse/connections")
    settings += [(str(conn / "max_background"), max_background),
                 (str(conn / "congestion_threshold"), max(1, max_background * 3 // 4))]
    for path, value in settings:
        if value <= 0:
            continue
        try:
            Path(path).write_text(f"{value}\n")
            done.append(f"{path}={value}")
        except OSError:
            pass
    return done


def is_mounted(mountpoint: str) -> bool:
    return os.path.realpath(mountpoint) in mount_table()


def is_stale(mountpoint: str, timeout: float = 5.0) -> bool:
    """Whether a FUSE mount's daemon is gone: its requests fail with ENOTCONN (or
    ECONNABORTED once the connection was aborted through fusectl).

    Probed with statfs, which the kernel always sends to the daemon: a stat of the root
    is answered from the kernel's attribute cache (casfs lets it keep attributes for a
    year), so it succeeds on a dead mount. A daemon that is alive but does not answer is
    not stale; the probe gives up on it after `timeout` (its thread blocks in the kernel
    until it answers, or until this process exits)."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.statvfs(mountpoint)
        except OSError as exc:
            result.append(exc.errno or 0)
        else:
            result.append(0)

    thread = threading.Thread(target=probe, name="casfs-stale-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result) and result[0] in (errno.ENOTCONN, errno.ECONNABORTED)


def run_helper(name: str, *args: str) -> subprocess.CompletedProcess[str] | None:
    """Run a system helper by its absolute path, with a clean environment; None when
    it is not installed."""
    path = helper_command(name)
    if path is None:
        return None
    return subprocess.run([path, *args], capture_output=True, text=True, env=helper_env())


def kernel_mount_orphaned(real: str, table: dict[str, str] | None = None) -> bool:
    """Whether a kernel-mode mount's node view is gone (killed): the kernel still serves
    what the node holds, but nothing fetches the rest, and a remount may replace it."""
    table = mount_table() if table is None else table
    if table.get(real) != "overlay":
        return False
    record = find_record(real)
    return record is not None and record.get("mode") == "kernel" and \
        not process_running(int(record.get("pid", 0)))


def force_unmount(mountpoint: str) -> None:
    """Lazily detach a mount (used for stale mounts)."""
    for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        done = run_helper(*cmd)
        if done is not None and done.returncode == 0:
            return
    raise MountError(f"cannot clear the stale mount at {mountpoint}")


def prepare_mountpoint(mountpoint: str) -> str:
    """Check a mountpoint can be used; clear a stale casfs mount on it. Returns its real path."""
    real = os.path.realpath(mountpoint)
    table = mount_table()
    if real in table:
        if is_stale(real) or kernel_mount_orphaned(real, table):
            force_unmount(real)
            remove_record(real)
        else:
            raise MountError(f"{mountpoint} is already a mountpoint ({table[real]}); unmount it first")
    if not os.path.isdir(real):
        raise MountError(f"mountpoint {mountpoint} is not a directory")
    return real


def kernel_record(mountpoint: str) -> dict[str, Any] | None:
    """The record of a kernel-mode mount at mountpoint, or None (not one, or not mounted)."""
    real = os.path.realpath(mountpoint)
    if mount_table().get(real) != "overlay":
        return None
    record = find_record(real)
    return record if record and record.get("mode") == "kernel" else None


def unmount(mountpoint: str, timeout: float = 15.0) -> None:
    """Cleanly unmount a FUSE-mode mount; waits for the daemon to exit. (A kernel-mode
    mount is the node view's to take down: casfs.kernel.client.unmount.)"""
    real = os.path.realpath(mountpoint)
    table = mount_table()
    if real not in table:
        raise MountError(f"{mountpoint} is not mounted")
    record = find_record(real)
    if table.get(real) == "overlay" and record and record.get("mode") == "kernel":
        raise MountError(f"{mountpoint} is a kernel-mode mount: its node view takes it down "
                         "(casfs umount, casfs.kernel.client.unmount)")
    if is_stale(real):
        force_unmount(real)
        remove_record(real)
        return
    proc = run_helper("fusermount3", "-u", real)
    if proc is None:
        raise MountError("fusermount3 is not installed (Debian: apt-get install fuse3)")
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "unknown error"
        raise MountError(f"cannot unmount {mountpoint}: {msg}")
    if record:
        wait_for_exit(record.get("pid", 0), timeout)


def process_running(pid: int) -> bool:
    """Whether pid is a live process. A daemon that has exited stays a zombie until its
    parent (init, or the container's PID 1, which may reap slowly) collects it: that
    counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_for_exit(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while pid and time.monotonic() < deadline:
        if not process_running(pid):
            return
        time.sleep(0.02)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- mount records (one per live mount, in a runtime directory private to the user) ---------

def records_dir() -> Path:
    """This user's directory of mount records: `mounts/` in its private runtime
    directory (casfs.locations.runtime_dir)."""
    return runtime_dir("mounts")


def _record_path(real_mountpoint: str) -> Path:
    # Never resolve the path here: the daemon writes its record while its own
    # mount is not serving yet, and a stat of the mountpoint would deadlock.
    key = hashlib.sha256(real_mountpoint.encode()).hexdigest()[:24]
    return records_dir() / f"{key}.json"


def write_record(mountpoint: str, info: dict[str, Any]) -> None:
    path = _record_path(mountpoint)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with open(fd, "w") as f:
        f.write(json.dumps(info))
    os.rename(tmp, path)


def find_record(mountpoint: str) -> dict[str, Any] | None:
    try:
        fd = os.open(_record_path(mountpoint), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except (OSError, MountError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > 1 << 16:
            return None
        record = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    return record if isinstance(record, dict) else None


def remove_record(mountpoint: str) -> None:
    with contextlib.suppress(MountError):
        _record_path(mountpoint).unlink(missing_ok=True)
