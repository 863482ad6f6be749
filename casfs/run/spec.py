"""The OCI runtime bundle's config.json for `casfs run`: what the image config stored in
the manifest's meta (Env, Entrypoint, Cmd, WorkingDir, User) and the user's options
make of a container, with the defaults a container runtime user expects (namespaces,
/proc, /dev, /sys, rlimits, docker's default capability set, masked kernel paths).

Everything read from the image (its /etc/passwd, /etc/group, the command to run) is
read through `RootFS`, which resolves paths as the container would see them: symlinks,
absolute or relative, never leave the image's root, and only regular files of bounded
size are read (an image's /etc/passwd that is a FIFO, a device or a link to the node's
/etc/shadow is no file of the node's).
"""

from __future__ import annotations

import errno
import os
import resource
import stat
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# docker's and podman's default capability set: what a container's root may do.
DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
MASKED_PATHS = ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
                "/sys/firmware", "/sys/devices/virtual/powercap"]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
MAX_ETC_FILE = 4 << 20
MAX_LINKS = 40


class SpecError(Exception):
    """The container cannot be described (an unknown user, no command): exit 125."""


class CommandError(Exception):
    """The command cannot be run: `code` is 127 (not found) or 126 (not executable)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class RootFS:
    """Paths inside a container's root directory, resolved as inside the container."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def resolve(self, path: str, follow_last: bool = True) -> str | None:
        """The host path of `path` (absolute in the container), symlinks followed within
        the root; None when a component is missing (or a loop)."""
        parts = [p for p in path.split("/") if p not in ("", ".")]
        done: list[str] = []
        links = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                if done:
                    done.pop()
                continue
            host = os.path.join(self.root, *done, name)
            try:
                st = os.lstat(host)
            except OSError:
                return None
            if stat.S_ISLNK(st.st_mode) and (parts or follow_last):
                links += 1
                if links > MAX_LINKS:
                    return None
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p not in ("", ".")] + parts
                continue
            done.append(name)
        return os.path.join(self.root, *done)

    def read_file(self, path: str, limit: int = MAX_ETC_FILE) -> bytes | None:
        """A regular file's bytes (at most `limit`), or None when it is missing or not a
        regular file."""
        host = self.resolve(path)
        if host is None:
            return None
        try:
            fd = os.open(host, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks, left = [], limit
            while left > 0:
                data = os.read(fd, min(left, 1 << 20))
                if not data:
                    break
                chunks.append(data)
                left -= len(data)
            return b"".join(chunks)
        finally:
            os.close(fd)


@dataclass
class User:
    uid: int
    gid: int
    additional_gids: list[int] = field(default_factory=list)
    home: str = "/"
    name: str = ""


def _table(rootfs: RootFS, path: str) -> list[list[str]]:
    raw = rootfs.read_file(path)
    if raw is None:
        return []
    rows = []
    for line in raw.decode("utf-8", "replace").splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _number(text: str) -> int | None:
    return int(text) if text.isdigit() and int(text) < 2**32 else None


def resolve_user(rootfs: RootFS, spec: str) -> User:
    """`user[:group]` (names or numbers, as docker takes them) to ids, from the image's
    /etc/passwd and /etc/group. An empty spec is root."""
    user_part, _, group_part = (spec or "0").partition(":")
    passwd = _table(rootfs, "/etc/passwd")
    entry = None
    uid = _number(user_part)
    for row in passwd:
        if len(row) >= 6 and (row[0] == user_part if uid is None else _number(row[2]) == uid):
            entry = row
            break
    if uid is None:
        if entry is None:
            raise SpecError(f"unable to find user {user_part}: no matching entries in the "
                            "image's /etc/passwd")
        uid = _number(entry[2])
        if uid is None:
            raise SpecError(f"user {user_part} has a bad uid in the image's /etc/passwd")
    gid = _number(entry[3]) if entry is not None else 0
    gid = 0 if gid is None else gid
    home = entry[5] if entry is not None and entry[5] else "/"
    name = entry[0] if entry is not None else ""
    groups = _table(rootfs, "/etc/group")
    if group_part:
        gid_given = _number(group_part)
        if gid_given is None:
            found = [g for g in groups if len(g) >= 3 and g[0] == group_part]
            if not found or _number(found[0][2]) is None:
                raise SpecError(f"unable to find group {group_part}: no matching entries in "
                                "the image's /etc/group")
            gid_given = _number(found[0][2])
        assert gid_given is not None
        gid = gid_given
    extra: list[int] = []  # as initgroups(3): the primary group and the user's others
    if name and not group_part:
        extra.append(gid)
        for g in groups:
            if len(g) >= 4 and name in g[3].split(","):
                n = _number(g[2])
                if n is not None and n not in extra:
                    extra.append(n)
    return User(uid, gid, extra, home, name)


def image_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The runtime section of the image config from a manifest's meta ({} if none)."""
    cfg = meta.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _str_list(value: Any) -> list[str]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    if isinstance(value, str):
        return [value]
    return []


def command_line(config: dict[str, Any], command: list[str],
                 entrypoint: list[str] | None) -> list[str]:
    """The process's argv, as docker and podman build it: the entrypoint (--entrypoint
    replaces the image's, and then drops the image's Cmd) followed by the command given
    on the command line, else the image's Cmd."""
    if entrypoint is not None:
        return [*entrypoint, *command]
    return [*_str_list(config.get("Entrypoint")), *(command or _str_list(config.get("Cmd")))]


def environment(config: dict[str, Any], env_args: list[str], hostname: str, tty: bool,
                home: str) -> list[str]:
    """The process's environment: PATH and HOSTNAME, the image's Env, then each -e
    (KEY=VALUE, or KEY alone for the caller's value of KEY), TERM under a tty, HOME."""
    env: dict[str, str] = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname}
    for item in _str_list(config.get("Env")):
        key, sep, value = item.partition("=")
        if key and sep:
            env[key] = value
    if tty:
        env["TERM"] = "xterm"
    for item in env_args:
        key, sep, value = item.partition("=")
        if not key:
            raise SpecError(f"bad environment variable {item!r}")
        if sep:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    env.setdefault("HOME", home)
    return [f"{k}={v}" for k, v in env.items()]


def find_command(rootfs: RootFS, argv0: str, env: list[str], cwd: str,
                 elsewhere: list[str] = ()) -> None:  # type: ignore[assignment]
    """Raise CommandError (127: not found, 126: not executable) when the container could
    not exec argv0, looking it up as execvp would in the image (paths under `elsewhere`,
    volume destinations, are not the image's to judge)."""
    path_var = next((e[5:] for e in reversed(env) if e.startswith("PATH=")), DEFAULT_PATH)
    if "/" in argv0:
        candidates = [argv0 if argv0.startswith("/") else os.path.join(cwd or "/", argv0)]
    else:
        candidates = [os.path.join(d or ".", argv0) for d in path_var.split(":")]
    denied = None
    for cand in candidates:
        if any(cand == d or cand.startswith(d.rstrip("/") + "/") for d in elsewhere):
            return
        host = rootfs.resolve(cand)
        if host is None:
            continue
        try:
            st = os.stat(host)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return
        denied = cand
    if denied is not None:
        raise CommandError(f"{denied}: {os.strerror(errno.EACCES)} (not an executable file)",
                           126)
    where = "" if "/" in argv0 else " in $PATH"
    raise CommandError(f"{argv0}: executable file not found{where}", 127)


@dataclass
class Volume:
    source: str
    destination: str
    readonly: bool = False


def parse_volume(text: str) -> Volume:
    """-v SRC:DST[:ro|rw] (SRC an existing absolute path on the node)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise SpecError(f"bad volume {text!r}: use SRC:DST[:ro]")
    src, dst = parts[0], parts[1]
    opts = parts[2].split(",") if len(parts) == 3 else []
    if any(o not in ("ro", "rw") for o in opts):
        raise SpecError(f"bad volume options in {text!r}: only ro or rw")
    if not src.startswith("/") or not dst.startswith("/"):
        raise SpecError(f"bad volume {text!r}: both paths must be absolute (named volumes "
                        "are not supported)")
    if not os.path.exists(src):
        raise SpecError(f"volume source {src} does not exist")
    return Volume(os.path.realpath(src), os.path.normpath(dst), "ro" in opts)


@dataclass
class Options:
    """What the user asked for, beyond the image."""

    command: list[str]
    entrypoint: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    volumes: list[Volume] = field(default_factory=list)
    network: str = "none"
    tty: bool = False
    interactive: bool = False
    read_only: bool = False
    no_new_privileges: bool = False
    hostname: str = ""


def _bind(src: str, dst: str, readonly: bool) -> dict[str, Any]:
    return {"destination": dst, "type": "bind", "source": src,
            "options": ["rbind", "rprivate"] + (["ro"] if readonly else ["rw"])}


def build_spec(meta: dict[str, Any], opts: Options, rootfs_dir: str,
               etc_files: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(config.json as a dict, the process argv). `rootfs_dir` is the container's root
    as mounted (read for users and the command); `etc_files` maps /etc/hosts,
    /etc/hostname and /etc/resolv.conf to the node files bound there."""
    config = image_config(meta)
    rootfs = RootFS(rootfs_dir)
    argv = command_line(config, opts.command, opts.entrypoint)
    if not argv:
        raise SpecError("no command: the image has no Entrypoint or Cmd, and none was given")
    user = resolve_user(rootfs, opts.user if opts.user is not None
                        else str(config.get("User") or ""))
    env = environment(config, opts.env, opts.hostname, opts.tty, user.home)
    cwd = opts.workdir or str(config.get("WorkingDir") or "") or "/"
    if not cwd.startswith("/"):
        raise SpecError(f"the working directory must be absolute, not {cwd!r}")
    find_command(rootfs, argv[0], env, cwd, [v.destination for v in opts.volumes])
    root_caps = user.uid == 0
    caps = {"bounding": list(DEFAULT_CAPS), "effective": list(DEFAULT_CAPS) if root_caps else [],
            "permitted": list(DEFAULT_CAPS) if root_caps else [], "inheritable": [],
            "ambient": []}
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
    ]
    if opts.read_only:
        # as podman's --read-only: the root is read-only, scratch space is not
        for dst in ("/tmp", "/var/tmp", "/run"):
            mounts.append({"destination": dst, "type": "tmpfs", "source": "tmpfs",
                           "options": ["nosuid", "nodev", "mode=1777"]})
    for dst, src in sorted(etc_files.items()):
        mounts.append(_bind(src, dst, opts.read_only))
    for vol in opts.volumes:
        mounts.append(_bind(vol.source, vol.destination, vol.readonly))
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")]
    if opts.network != "host":
        namespaces.append({"type": "network"})
    # podman's 1048576 open files, or as many as casfs may give (raising it needs a
    # privilege a container manager may not have)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if hard == resource.RLIM_INFINITY else min(1048576, hard)
    process: dict[str, Any] = {
        "terminal": opts.tty,
        "user": {"uid": user.uid, "gid": user.gid,
                 **({"additionalGids": user.additional_gids} if user.additional_gids else {})},
        "args": argv,
        "env": env,
        "cwd": cwd,
        "capabilities": caps,
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
        "noNewPrivileges": opts.no_new_privileges,
    }
    if opts.tty:
        process["consoleSize"] = {"height": 24, "width": 80}
    spec = {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": "rootfs", "readonly": opts.read_only},
        "hostname": opts.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "maskedPaths": MASKED_PATHS,
            "readonlyPaths": READONLY_PATHS,
        },
    }
    return spec, argv
