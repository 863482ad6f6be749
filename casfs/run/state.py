"""The node's container state for `casfs run`, `casfs ps` and `casfs rm`: a root-only
(0700) directory holding one shared read-only mount per image and one directory per
container (its record, its writable upper layer, its OCI bundle).

    <state>/                      0700 (--state-dir, $CASFS_STATE_DIR, /var/lib/casfs)
      lock                        flock: taken to mount, release or reconcile
      images/<manifest hex>/
        rootfs/                   the image's casfs mount (--suid --dev: reachable by root only)
        users/<container id>      one empty file per container using the mount
      containers/<id>/
        container.json            the record (below)
        upper/ work/              the container's writable layer (overlayfs upper and work dirs)
        bundle/config.json        the OCI runtime config
        bundle/rootfs/            overlayfs: upper over the image's mount
        hosts hostname resolv.conf   bound into the container's /etc
      runtime/<runc|crun>/        the runtime's own state (--root), apart from any other user's

An image's mount is shared by every container of that manifest and released (unmounted)
when its last container ends: its bytes stay in the node cache, and a later mount of a
manifest already on the node is ready in milliseconds, so keeping idle mounts warm would
buy little and leave mounts nobody owns. A container holds the image only while it runs;
an exited container keeps its upper layer (for `casfs ps -a` and inspection) until
`casfs rm`.

Nothing a container writes reaches the image: the image mount is read-only, the
container's root is an overlayfs whose only writable layer is the container's upper dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from casfs.errors import RunError
from casfs.locations import ensure_private_dir
from casfs.mounts import is_mounted

STATE_ENV = "CASFS_STATE_DIR"
DEFAULT_STATE_DIR = "/var/lib/casfs"
RECORD = "container.json"


def default_state_dir() -> str:
    return os.environ.get(STATE_ENV) or DEFAULT_STATE_DIR


def proc_start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (None when it is gone): with the
    pid, names one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        if fields[0] == b"Z":
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int | None, start: int | None) -> bool:
    return bool(pid) and start is not None and proc_start_time(pid or 0) == start


@dataclass
class Container:
    """A container's record (container.json)."""

    id: str
    name: str
    image: str  # what the user named
    digest: str  # the manifest's hex digest
    command: list[str]
    runtime: str
    created: float
    status: str = "created"  # created | running | exited
    exit_code: int | None = None
    finished: float | None = None
    supervisor_pid: int | None = None  # the `casfs run` process
    supervisor_start: int | None = None
    pid: int | None = None  # the container's init, on the node
    remove: bool = False  # --rm
    holds_image: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Container:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


class State:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(os.path.abspath(root or default_state_dir()))

    def ensure(self) -> State:
        if os.geteuid() != 0:
            raise RunError("casfs run needs root (it mounts the image, an overlay and runs "
                           "an OCI runtime)")
        ensure_private_dir(self.root, "state directory")
        for sub in ("images", "containers", "runtime"):
            (self.root / sub).mkdir(mode=0o700, exist_ok=True)
        return self

    # -- locking ---------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- containers ------------------------------------------------------------------

    def container_dir(self, cid: str) -> Path:
        return self.root / "containers" / cid

    def save(self, c: Container) -> None:
        path = self.container_dir(c.id) / RECORD
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(c), indent=1))
        os.replace(tmp, path)

    def load(self, cid: str) -> Container | None:
        try:
            return Container.from_json(json.loads((self.container_dir(cid) / RECORD).read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def containers(self) -> list[Container]:
        out = []
        base = self.root / "containers"
        for entry in sorted(os.listdir(base)) if base.is_dir() else []:
            c = self.load(entry)
            if c is not None:
                out.append(c)
        return sorted(out, key=lambda c: c.created)

    def new_container(self, name: str | None, image: str, digest: str, command: list[str],
                      runtime: str, remove: bool) -> Container:
        """A record for a new container, its name unique (call under the lock)."""
        cid = secrets.token_hex(32)
        existing = self.containers()
        if name is None:
            name = f"casfs-{cid[:8]}"
        elif not name or not all(ch.isalnum() or ch in "_.-" for ch in name) or \
                not name[0].isalnum():
            raise RunError(f"invalid container name {name!r} ([a-zA-Z0-9][a-zA-Z0-9_.-]*)")
        if any(c.name == name for c in existing):
            raise RunError(f"the container name {name!r} is already in use: "
                           f"casfs rm {name} to reuse it")
        cdir = self.container_dir(cid)
        cdir.mkdir(mode=0o700)
        for sub in ("upper", "work", "bundle", "bundle/rootfs"):
            (cdir / sub).mkdir(mode=0o700 if sub != "upper" else 0o755)
        c = Container(cid, name, image, digest, command, runtime, time.time(), remove=remove,
                      supervisor_pid=os.getpid(), supervisor_start=proc_start_time(os.getpid()))
        self.save(c)
        return c

    def find(self, what: str) -> Container:
        """A container by name, full id or unique id prefix."""
        found = self.containers()
        for c in found:
            if c.name == what or c.id == what:
                return c
        matches = [c for c in found if len(what) >= 3 and c.id.startswith(what)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise RunError(f"{what!r} names {len(matches)} containers: give more of the id")
        raise RunError(f"no such container: {what}")

    # -- image mounts ----------------------------------------------------------------

    def image_dir(self, digest: str) -> Path:
        return self.root / "images" / digest

    def acquire_image(self, c: Container, mount_argv: Callable[[Path], list[str]]) -> Path:
        """The image's shared mount, mounted now if no running container holds it; `c`
        is recorded as one of its users. Call under the lock."""
        idir = self.image_dir(c.digest)
        mnt = idir / "rootfs"
        (idir / "users").mkdir(parents=True, exist_ok=True, mode=0o700)
        if not is_mounted_path(mnt):
            mnt.mkdir(exist_ok=True, mode=0o755)
            for stale in (idir / "users").iterdir():
                stale.unlink()  # users of a mount that is gone
            proc = subprocess.run(mount_argv(mnt),
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                msg = proc.stderr.strip().splitlines()
                raise RunError(f"mounting the image failed: {msg[-1] if msg else proc.returncode}")
        (idir / "users" / c.id).touch()
        c.holds_image = True
        self.save(c)
        return mnt

    def release_image(self, c: Container) -> None:
        """Drop `c`'s hold on its image; unmount the image when no one else holds it.
        Call under the lock."""
        idir = self.image_dir(c.digest)
        with contextlib.suppress(FileNotFoundError):
            (idir / "users" / c.id).unlink()
        if c.holds_image:
            c.holds_image = False
            if self.container_dir(c.id).is_dir():
                self.save(c)
        self._maybe_unmount(c.digest)

    def _maybe_unmount(self, digest: str) -> None:
        idir = self.image_dir(digest)
        users = list((idir / "users").iterdir()) if (idir / "users").is_dir() else []
        live = []
        for u in users:
            other = self.load(u.name)
            if other is not None and other.holds_image:
                live.append(u)
            else:
                u.unlink()
        if live:
            return
        mnt = idir / "rootfs"
        if is_mounted_path(mnt):
            proc = casfs_umount(mnt)
            if proc.returncode != 0 and is_mounted_path(mnt):
                print(f"casfs: warning: could not unmount the image at {mnt}: "
                      f"{proc.stderr.strip()}", file=sys.stderr)
                return
        shutil.rmtree(idir, ignore_errors=True)

    def image_mounts(self) -> dict[str, int]:
        """manifest hex -> number of containers holding its mount."""
        out = {}
        base = self.root / "images"
        for idir in sorted(base.iterdir()) if base.is_dir() else []:
            users = idir / "users"
            out[idir.name] = len(list(users.iterdir())) if users.is_dir() else 0
        return out


def casfs_umount(mnt: Path) -> subprocess.CompletedProcess[str]:
    """`casfs umount` (the command-line contract, whatever the serving mode)."""
    return subprocess.run([sys.executable, "-m", "casfs.cli", "umount", str(mnt)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def is_mounted_path(path: Path) -> bool:
    return is_mounted(str(path))


def umount_path(path: Path) -> None:
    """Unmount a plain (overlay) mount, lazily if it is busy."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for flags in (0, 2):  # then MNT_DETACH
        if libc.umount2(os.fsencode(str(path)), flags) == 0:
            return
        err = ctypes.get_errno()
        if err == 22:  # EINVAL: not mounted
            return
    raise RunError(f"cannot unmount {path}: {os.strerror(ctypes.get_errno())}")
