"""Layer streams: decompression by magic bytes (gzip, zstd, none), digest checking, and
reading ahead in a thread of its own.

Every failure of the compressed stream (a bad header, a corrupt block, a stream
that ends early) surfaces as CorruptLayer with the layer named.

gzip is inflated by ISA-L (`isal`, 2-3x zlib's speed here) when it is installed, else by
zlib. `ReadAhead` moves a whole stream chain (reading, digests, decompression, bounds)
onto a thread of its own, so that on two cores it runs beside the tar parsing and
chunking that consume it: inflating and hashing release the GIL.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import queue
import threading
import zlib
from collections.abc import Callable
from typing import IO, Any, Protocol, cast

import zstandard

from casfs.errors import CorruptLayer, HostileLayer, LayerDigestMismatch

_fast_gzip: Any  # ISA-L's inflate; zlib's when it is missing
try:
    from isal import igzip as _fast_gzip
    from isal.isal_zlib import error as _isal_error

    _GZIP_ERRORS: tuple[type[BaseException], ...] = (
        zlib.error, cast(type[BaseException], _isal_error))
except ImportError:  # pragma: no cover - isal is a dependency
    _fast_gzip = None
    _GZIP_ERRORS = (zlib.error,)
# What reading a damaged compressed stream raises
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    OSError, EOFError, zstandard.ZstdError, *_GZIP_ERRORS)


class Readable(Protocol):
    """Anything a layer's bytes can be read from."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
READ_SIZE = 1 << 20


class PassThrough(io.RawIOBase):
    """A readable stream over another that counts what passes and lets subclasses look
    at each piece (`seen`) or fetch it differently (`pull`)."""

    def __init__(self, inner: Readable) -> None:
        self.inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def pull(self, n: int) -> bytes:
        return self.inner.read(n)

    def seen(self, data: bytes) -> None:
        """Called with each piece read, after it is counted."""

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.pull(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        self.seen(data)
        return n


class HashingReader(PassThrough):
    """Passes reads through and hashes them; `check()` compares at the end."""

    def __init__(self, inner: Readable, algo: str = "sha256") -> None:
        super().__init__(inner)
        self.hash = hashlib.new(algo)

    def seen(self, data: bytes) -> None:
        self.hash.update(data)

    def drain(self) -> None:
        while self.read(READ_SIZE):
            pass

    def check(self, digest: str, what: str) -> None:
        self.drain()
        algo, _, want = digest.partition(":")
        if algo == self.hash.name and self.hash.hexdigest() != want:
            raise LayerDigestMismatch(f"{what} does not match its digest {digest}")


class _Decompressing(PassThrough):
    """Wraps a decompressor so that its errors become CorruptLayer."""

    def __init__(self, inner: IO[bytes], what: str) -> None:
        super().__init__(inner)
        self.what = what

    def pull(self, n: int) -> bytes:
        try:
            return self.inner.read(n)
        except _STREAM_ERRORS as exc:
            raise CorruptLayer(f"{self.what}: compressed stream is corrupt or truncated ({exc})") from exc


class _ZstdStream(io.RawIOBase):
    """zstd frames, one after another, decoded with a check that the last one ended:
    the library's stream reader treats a stream cut mid-frame as a clean end."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.dctx = zstandard.ZstdDecompressor()
        self.dobj = self.dctx.decompressobj()
        self.pending = b""
        self.pos = 0  # bytes of `pending` already handed out
        self.in_frame = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        while self.pos >= len(self.pending):
            data = self.raw.read(READ_SIZE)
            if not data:
                if self.in_frame:
                    raise EOFError("zstd stream ended in the middle of a frame")
                return 0
            out = []
            while data:
                self.in_frame = True
                out.append(self.dobj.decompress(data))
                if not self.dobj.eof:
                    break
                data = self.dobj.unused_data
                self.dobj = self.dctx.decompressobj()
                self.in_frame = False
            self.pending = out[0] if len(out) == 1 else b"".join(out)
            self.pos = 0
        n = min(len(b), len(self.pending) - self.pos)
        b[:n] = memoryview(self.pending)[self.pos:self.pos + n]
        self.pos += n
        return n


class ReadAhead(io.RawIOBase):
    """Reads `inner` on a thread of its own, up to `depth` blocks of `block` bytes ahead
    of the reader. Whatever `inner.read` raises is raised to the reader, in order, after
    the bytes read before it. `close()` stops the thread (the blocks read ahead are
    dropped); `inner` is the reader's again once EOF, an error, or close() was seen."""

    def __init__(self, inner: IO[bytes] | Any, block: int = READ_SIZE, depth: int = 8,
                 name: str = "read-ahead") -> None:
        self.inner = inner
        self.block = block
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(depth)
        self._stop = threading.Event()
        self._buf = b""
        self._pos = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def readable(self) -> bool:
        return True

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                data = self.inner.read(self.block)
                self._put(data)
                if not data:
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            self._put(exc)

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._pos >= len(self._buf):
            if self._done:
                return 0
            item = self._queue.get()
            if isinstance(item, BaseException) or not item:
                self._done = True
                self._thread.join()
                if isinstance(item, BaseException):
                    raise item
                return 0
            self._buf, self._pos = item, 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = memoryview(self._buf)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join()
        super().close()


DEFAULT_MAX_LAYER_BYTES = 64 << 30
DEFAULT_MAX_EXPANSION = 1000
EXPANSION_FREE_BYTES = 64 << 20


def layer_limits() -> tuple[int, int]:
    """(max uncompressed bytes of one layer, max expansion ratio), from the environment
    (CASFS_MAX_LAYER_BYTES, CASFS_MAX_EXPANSION) or the defaults: 64 GiB and 1000x."""
    try:
        total = int(os.environ.get("CASFS_MAX_LAYER_BYTES", DEFAULT_MAX_LAYER_BYTES))
        ratio = int(os.environ.get("CASFS_MAX_EXPANSION", DEFAULT_MAX_EXPANSION))
    except ValueError:
        raise HostileLayer("CASFS_MAX_LAYER_BYTES and CASFS_MAX_EXPANSION must be integers") from None
    return total, ratio


class ExpansionGuard(PassThrough):
    """Stops a decompression bomb: the uncompressed stream may not exceed max_total
    bytes, nor (past its first 64 MiB) max_ratio times the compressed bytes read."""

    def __init__(self, inner: IO[bytes], compressed: Callable[[], int], what: str,
                 max_total: int, max_ratio: int) -> None:
        super().__init__(inner)
        self.compressed = compressed
        self.what = what
        self.max_total = max_total
        self.max_ratio = max_ratio

    def seen(self, data: bytes) -> None:
        if self.count > self.max_total:
            raise HostileLayer(f"{self.what}: expands past {self.max_total} bytes "
                               "(CASFS_MAX_LAYER_BYTES)")
        if self.count > EXPANSION_FREE_BYTES and self.count > self.max_ratio * max(self.compressed(), 1):
            raise HostileLayer(f"{self.what}: decompression bomb: expands more than "
                               f"{self.max_ratio}x (CASFS_MAX_EXPANSION)")


def open_decompressed(raw: IO[bytes], compression: str, what: str) -> IO[bytes]:
    """A readable stream of the uncompressed tar bytes of a layer."""
    head = b""
    if compression == "detect" or compression not in ("gzip", "zstd", "none"):
        peek = raw.peek(4) if hasattr(raw, "peek") else b""
        head = peek[:4]
        if not head:
            buffered = io.BufferedReader(cast(io.RawIOBase, raw))
            head = buffered.peek(4)[:4]
            raw = buffered
        compression = (
            "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head.startswith(ZSTD_MAGIC) else "none"
        )
    if compression == "gzip":
        inner = cast(IO[bytes], _fast_gzip.GzipFile(fileobj=raw, mode="rb") if _fast_gzip
                     else gzip.GzipFile(fileobj=raw, mode="rb"))
    elif compression == "zstd":
        inner = io.BufferedReader(_ZstdStream(raw), READ_SIZE)
    else:
        return raw
    return io.BufferedReader(_Decompressing(inner, what), READ_SIZE)
