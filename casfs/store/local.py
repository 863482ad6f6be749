"""The local-directory backend (`file:///abs/path`), also the embedded default store.

Objects are files under the root, keyed by their relative path. A put writes a
temporary file in `<root>/.tmp`, fsyncs it, renames it into place and fsyncs the
directory (the rename is durable only then), so a reader (or a crash) never sees a
partial object. Inside `deferred_syncs()` both fsyncs wait for `sync()`, which
fsyncs each file and directory written since. A writer killed mid-put leaves its
temp file; opening the store for writing removes those older than a day.

Reads trust nothing in the directory: a key must be a regular file, opened without
following a symlink at its last component and without blocking on a FIFO, and a
bounded read stops at the bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from casfs.errors import ObjectNotFound, StoreError, StoreUnreachable
from casfs.store.backend import ObjectTooLarge

TMP_DIR = ".tmp"
STALE_TMP_SECONDS = 24 * 3600
"""A temp file this old belongs to a writer that died (killed mid-put): removed when
the store is next opened for writing."""
SYNC_THREADS = 16
"""fsyncs in flight at sync(): the filesystem's journal commits them together."""
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FileBackend:
    """Objects as files under a root directory."""

    def __init__(self, root: str | os.PathLike[str], create: bool = True) -> None:
        self.root = Path(root)
        self._sync_lock = threading.Lock()
        self._deferring = 0  # deferred_syncs() blocks open
        # Written while deferring, not yet fsynced: files, and directories whose
        # entries (a rename, a new subdirectory) are not yet durable.
        self._pending_files: set[str] = set()
        self._pending_dirs: set[str] = set()
        self.url = f"file://{self.root}"
        if create:
            try:
                (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnreachable(f"cannot create store directory {self.root}: {exc.strerror}") from exc
            self._sweep_tmp()
        elif not self.root.is_dir():
            raise StoreUnreachable(f"store directory {self.root} does not exist")
        self._tighten()

    def _tighten(self) -> None:
        """A store holds every indexed image's content, whatever the images' own modes:
        one an older casfs left open to other users (0755) is closed (0700) when its
        owner opens it. Entering the root is what others would need; its files keep
        their modes."""
        try:
            st = os.stat(self.root)
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                os.chmod(self.root, 0o700)
        except OSError:
            pass  # not ours, or read-only media: the store works as it is

    def _sweep_tmp(self) -> None:
        """Remove the partial puts of writers killed long ago (a put takes seconds)."""
        cutoff = time.time() - STALE_TMP_SECONDS
        with contextlib.suppress(OSError), os.scandir(self.root / TMP_DIR) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):
                    if entry.name.endswith(".part") and entry.stat().st_mtime < cutoff:
                        os.unlink(entry.path)

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or key.startswith(TMP_DIR):
            raise StoreError(f"invalid object key {key!r}")
        return self.root / key

    def _open(self, key: str) -> tuple[int, int]:
        """(fd, size) of the regular file a key names."""
        try:
            fd = os.open(self._path(key), READ_FLAGS)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(f"{key} in {self.url} is a symlink, not an object") from exc
            raise StoreError(f"cannot read {key} from {self.url}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StoreError(f"{key} in {self.url} is not a regular file")
        except BaseException:
            os.close(fd)
            raise
        return fd, st.st_size

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        fd, size = self._open(key)
        try:
            if max_bytes is not None and size > max_bytes:
                raise ObjectTooLarge(f"object {key} in {self.url} is {size} bytes, over the "
                                     f"{max_bytes}-byte bound")
            # The size is a hint (a file can grow under us): read to EOF, never past
            # the bound. One byte over the size finds EOF without a second large buffer.
            limit = None if max_bytes is None else max_bytes + 1
            want = (size if limit is None else min(size + 1, limit))
            parts = []
            got = 0
            while True:
                n = want - got if got < want else 1 << 16
                chunk = os.read(fd, n if limit is None else min(n, limit - got))
                if not chunk:
                    break
                parts.append(chunk)
                got += len(chunk)
                if limit is not None and got >= limit:
                    raise ObjectTooLarge(f"object {key} in {self.url} grew over the "
                                         f"{max_bytes}-byte bound while read")
            return b"".join(parts)
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        fd, _size = self._open(key)
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc.strerror}") from exc
        finally:
            os.close(fd)

    def _make_parents(self, path: Path) -> list[str]:
        """Create path's missing parent directories; returns the directories whose
        entries changed (the parent of each one created), for fsync."""
        missing = []
        parent = path.parent
        while not parent.is_dir():
            missing.append(parent)
            parent = parent.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # another put made it first
                d.mkdir()
        return [str(d.parent) for d in missing]

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.part"
        with self._sync_lock:
            deferred = self._deferring > 0
        try:
            changed_dirs = self._make_parents(path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if not deferred:
                    os.fsync(f.fileno())
            os.rename(tmp, path)
            changed_dirs.append(str(path.parent))
            if deferred:
                with self._sync_lock:
                    # A put that outlived every block (whose leaving synced) is owed no
                    # later sync: it makes itself durable now.
                    deferred = self._deferring > 0
                    if deferred:
                        self._pending_files.add(str(path))
                        self._pending_dirs.update(changed_dirs)
                if not deferred:
                    _fsync_path(str(path))
            if not deferred:
                for d in changed_dirs:
                    _fsync_path(d)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise StoreError(f"store {self.url} is full (no space left writing {key})") from exc
            raise StoreError(f"cannot write {key} to {self.url}: {exc.strerror}") from exc

    def sync(self) -> None:
        """fsync every file and directory written by a deferred put so far: files first,
        so that no directory entry is durable before the bytes it names."""
        with self._sync_lock:
            files, self._pending_files = self._pending_files, set()
            dirs, self._pending_dirs = self._pending_dirs, set()
        try:
            if len(files) + len(dirs) >= SYNCFS_AT and _syncfs(self.root):
                return  # one syncfs(2) of the store's filesystem: far cheaper than 27k fsyncs
            for batch in (files, dirs):
                if len(batch) <= 1:
                    for p in batch:
                        _fsync_path(p)
                    continue
                with ThreadPoolExecutor(min(SYNC_THREADS, len(batch)),
                                        thread_name_prefix="fsync") as pool:
                    list(pool.map(_fsync_path, batch))
        except OSError as exc:
            with self._sync_lock:  # still owed: a later sync tries again
                self._pending_files |= files
                self._pending_dirs |= dirs
            raise StoreError(f"cannot sync {self.url}: {exc.strerror}") from exc

    @contextlib.contextmanager
    def deferred_syncs(self) -> Iterator[None]:
        with self._sync_lock:
            self._deferring += 1
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            with self._sync_lock:
                self._deferring -= 1
            if failed:
                with contextlib.suppress(StoreError):  # the block's own error is the report
                    self.sync()
            else:
                self.sync()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        try:
            st = os.stat(self._path(key))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot stat {key} in {self.url}: {exc.strerror}") from exc
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot delete {key} from {self.url}: {exc.strerror}") from exc

    def list(self, prefix: str) -> Iterator[str]:
        for key, _size, _mtime in self.list_info(prefix):
            yield key

    def list_info(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        # Walk only the directory the prefix names, then filter by the rest.
        head, _, _ = prefix.rpartition("/")
        base = self.root / head if head else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != TMP_DIR]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    try:
                        st = os.stat(os.path.join(dirpath, name))
                    except FileNotFoundError:
                        continue  # deleted while listing
                    yield key, st.st_size, st.st_mtime


def _fsync_path(path: str) -> None:
    """fsync a file or directory by name (a file deleted since has nothing to sync)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


SYNCFS_AT = 256  # pending files from which one syncfs(2) replaces the fsyncs


def _syncfs(root: Path) -> bool:
    """syncfs(2) of the filesystem holding root (every file on it made durable, its
    directories included); False where it is not available, so the caller fsyncs."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (OSError, AttributeError):
        return False
    try:
        if libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(root))
        return True
    except AttributeError:
        return False
    finally:
        os.close(fd)
