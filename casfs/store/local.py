"""The local-directory backend (`file:///abs/path`), also the embedded default store.

Objects are files under the root, keyed by their relative path. A put writes a
temporary file in `<root>/.tmp`, fsyncs it and renames it into place, so a
reader (or a crash) never sees a partial object. A writer killed mid-put leaves
its temp file; opening the store for writing removes those older than a day.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from casfs.errors import ObjectNotFound, StoreError, StoreUnreachable

TMP_DIR = ".tmp"
STALE_TMP_SECONDS = 24 * 3600
"""A temp file this old belongs to a writer that died (killed mid-put): removed when
the store is next opened for writing."""


class FileBackend:
    """Objects as files under a root directory."""

    def __init__(self, root: str | os.PathLike[str], create: bool = True) -> None:
        self.root = Path(root)
        # When set, puts skip their fsync and sync() makes them durable in one go:
        # the indexer writes thousands of blobs and syncs once before its manifest.
        self.deferred_sync = False
        self.url = f"file://{self.root}"
        if create:
            try:
                (self.root / TMP_DIR).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnreachable(f"cannot create store directory {self.root}: {exc.strerror}") from exc
            self._sweep_tmp()
        elif not self.root.is_dir():
            raise StoreUnreachable(f"store directory {self.root} does not exist")

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

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc.strerror}") from exc

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {key} from {self.url}: {exc.strerror}") from exc

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self.root / TMP_DIR / f"{uuid.uuid4().hex}.part"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if not self.deferred_sync:
                    os.fsync(f.fileno())
            os.rename(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise StoreError(f"store {self.url} is full (no space left writing {key})") from exc
            raise StoreError(f"cannot write {key} to {self.url}: {exc.strerror}") from exc

    def sync(self) -> None:
        """Make every put so far durable."""
        os.sync()

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
