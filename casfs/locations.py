"""Where things are when nobody says: the store URL (--store, else $CASFS_STORE, else
the embedded default local store) and the node cache directory (--cache-dir, else
$CASFS_CACHE_DIR, else a per-user or system default). Free of heavy imports: the
`casfs mount` front end resolves both before it knows whether it will load a daemon.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from casfs.errors import UnsafeSetting


def default_store_url() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"file://{Path(base) / 'casfs' / 'store'}"


def resolve_store_url(url: str | None) -> str:
    return url or os.environ.get("CASFS_STORE") or default_store_url()


def ensure_private_dir(path: str | os.PathLike[str], what: str = "cache directory") -> None:
    """Make sure a directory of casfs state is this user's alone: created 0700 when
    missing; refused (UnsafeSetting) when another user owns it, since whoever owns it
    could read what casfs keeps there or answer on its sockets; tightened to 0700 when
    it is ours but open to others (made by an older casfs)."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as exc:
        from casfs.errors import CacheError

        raise CacheError(f"cannot use {what} {path}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeSetting(f"{what} {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise UnsafeSetting(f"{what} {path} belongs to uid {st.st_uid}, not to this user "
                            f"(uid {os.geteuid()}): choose a directory of your own")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def runtime_dir(*sub: str) -> Path:
    """This user's private runtime directory (mount records, the node view's socket):
    /run/casfs as root, else $XDG_RUNTIME_DIR/casfs, else /tmp/casfs-<uid>; each level
    created 0700 and refused unless it is a real directory this user owns that no other
    user can write (a shared /tmp must not let another user plant a symlink or a
    record)."""
    from casfs.errors import MountError

    if os.geteuid() == 0:
        base = Path("/run/casfs")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "casfs"
    else:
        base = Path(f"/tmp/casfs-{os.geteuid()}")
    path = base
    for level in (base, *(base / "/".join(sub[: i + 1]) for i in range(len(sub)))):
        path = level
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise MountError(f"{path} is not a private directory of this user: remove it")
    return path


def mount_log_path(cache_dir: str | os.PathLike[str], mountpoint: str) -> Path:
    """Where the daemon of a mount logs: named after the mountpoint, inside the cache
    directory (whoever starts the daemon decides this, never a request)."""
    import hashlib

    key = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:12]
    return Path(cache_dir) / "logs" / f"mount-{key}.log"


def default_cache_dir() -> str:
    env = os.environ.get("CASFS_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/casfs"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "casfs")
