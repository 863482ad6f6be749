"""Read one layer's tar stream into a layer record: the list of operations the
layer applies (add an entry, add a hardlink, whiteout a name, make a directory
opaque), in tar order, with each file's content turned into chunk digests.

A record is what `casfs index` stores per layer (so a re-index of a known layer
reads nothing) and what indexer.apply folds into the image tree. Entries that
would escape the image root are refused here.
"""

from __future__ import annotations

import base64
import stat
import tarfile
from collections.abc import Callable
from concurrent.futures import Future
from decimal import Decimal, InvalidOperation
from typing import IO, Any

from casfs.errors import CorruptLayer, HostileLayer
from indexer.chunking import chunk_size_for
from indexer.dirpack import DirPacker
from indexer.upload import BlobUploader

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_ENTRIES = 10_000_000
U32 = 1 << 32

_TYPE_BITS = {
    tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK,
    tarfile.CHRTYPE: stat.S_IFCHR,
    tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def normalize_path(name: str, what: str) -> str:
    """A tar member name as a clean relative path ("" for the root); refuses escapes."""
    if name.startswith("/"):
        raise HostileLayer(f"{what}: entry {name!r} has an absolute path")
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise HostileLayer(f"{what}: entry {name!r} has a '..' component")
        if "\0" in part:
            raise HostileLayer(f"{what}: entry {name!r} has a NUL byte")
        parts.append(part)
    return "/".join(parts)


def _mtime_ns(member: tarfile.TarInfo) -> int:
    text = member.pax_headers.get("mtime")
    if text is not None:
        try:
            return int(Decimal(text) * 1_000_000_000)
        except InvalidOperation:
            pass
    return int(member.mtime) * 1_000_000_000


def _check_fields(op: dict[str, Any], member: tarfile.TarInfo, what: str) -> None:
    """Owner and time must fit the manifest's fields (32-bit ids, signed 64-bit ns)."""
    for field in ("uid", "gid"):
        if not 0 <= op[field] < U32:
            raise HostileLayer(f"{what}: entry {member.name!r} has an out-of-range "
                               f"{field} {op[field]}")
    if not -(1 << 63) <= op["mtime_ns"] < 1 << 63:
        raise HostileLayer(f"{what}: entry {member.name!r} has an out-of-range mtime "
                           f"{member.mtime}")


def _xattrs(member: tarfile.TarInfo) -> dict[str, str]:
    """xattrs from PAX headers, as {name: base64 value}."""
    out: dict[str, str] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            raw = value.encode("utf-8", "surrogateescape")
            out[key[len("SCHILY.xattr.") :]] = base64.b64encode(raw).decode()
        elif key.startswith("LIBARCHIVE.xattr."):
            from urllib.parse import unquote

            out[unquote(key[len("LIBARCHIVE.xattr.") :])] = value
    return dict(sorted(out.items()))


# tarfile's own classes for a header that is damaged or cut short (not in its type stubs)
_HEADER_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError)  # type: ignore[attr-defined]


class _BadHeader(tarfile.TarError):
    """A header that is not one (bad checksum, garbage) or is cut short, after the first."""


class _StrictTarInfo(tarfile.TarInfo):
    """Refuses what tarfile's stream reader would otherwise take for the end of the
    archive: a header with a bad checksum, or one cut short, after the first member.
    tarfile stops there silently and every later entry (files, whiteouts) would be
    dropped; Go's archive/tar (Docker, containerd, umoci) fails the layer instead."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        try:
            return super().fromtarfile(tarfile_)
        except _HEADER_ERRORS as exc:
            raise _BadHeader(f"bad header at byte {tarfile_.offset}: {exc}") from None


def _check_end(tar: tarfile.TarFile) -> None:
    """After the first end-of-archive (zero) block: the next block is zeros too, or the
    stream ends (as Go's archive/tar requires: a zero block then data is not an end)."""
    after = tar.fileobj.read(tarfile.BLOCKSIZE) if tar.fileobj is not None else b""
    if after.strip(b"\0"):
        raise _BadHeader(f"a zero block followed by data at byte {tar.offset}")


def read_layer(
    stream: IO[bytes],
    uploader: BlobUploader,
    what: str,
    on_bytes: Callable[[int], None] = lambda n: None,
    packer: DirPacker | None = None,
) -> list[dict[str, Any]]:
    """The operations of the layer whose uncompressed tar stream is given.

    File chunks go to the uploader (small files also to the packer); the returned ops
    hold futures in their "chunks" lists until resolve_chunks() is called.
    """
    ops: list[dict[str, Any]] = []
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", errorlevel=2, tarinfo=_StrictTarInfo)
        for member in tar:
            if len(ops) >= MAX_ENTRIES:
                raise HostileLayer(f"{what}: more than {MAX_ENTRIES} entries")
            path = normalize_path(member.name, what)
            parent, _, base = path.rpartition("/")
            if base == OPAQUE:
                ops.append({"op": "opaque", "path": parent})
                continue
            if base.startswith(WHITEOUT):
                hidden = base[len(WHITEOUT):]
                if hidden in ("", ".", ".."):
                    raise HostileLayer(f"{what}: whiteout {member.name!r} names no entry")
                ops.append({"op": "whiteout", "path": f"{parent}/{hidden}".lstrip("/")})
                continue
            if member.islnk():
                target = normalize_path(member.linkname, what)
                ops.append({"op": "link", "path": path, "target": target})
                continue
            op: dict[str, Any] = {
                "op": "add",
                "path": path,
                "perm": member.mode & 0o7777,
                "uid": member.uid,
                "gid": member.gid,
                "mtime_ns": _mtime_ns(member),
            }
            _check_fields(op, member, what)
            xattrs = _xattrs(member)
            if xattrs:
                op["xattrs"] = xattrs
            if member.isreg():
                op["type"] = stat.S_IFREG
                op["size"] = member.size
                op["chunks"] = _read_chunks(tar, member, uploader, on_bytes,
                                            packer if packer and packer.wants(member.size)
                                            else None, path)
            elif member.type in _TYPE_BITS:
                op["type"] = _TYPE_BITS[member.type]
                if member.issym():
                    op["target"] = member.linkname
                if member.ischr() or member.isblk():
                    if not (0 <= member.devmajor < U32 and 0 <= member.devminor < U32):
                        raise HostileLayer(f"{what}: entry {member.name!r} has an out-of-range "
                                           f"device number {member.devmajor},{member.devminor}")
                    op["rdev"] = [member.devmajor, member.devminor]
            else:
                raise CorruptLayer(f"{what}: entry {member.name!r} has unsupported type {member.type!r}")
            if path == "" and op["type"] != stat.S_IFDIR:
                raise HostileLayer(f"{what}: the root entry is not a directory")
            ops.append(op)
        _check_end(tar)
    except tarfile.TarError as exc:
        raise CorruptLayer(f"{what}: tar archive is corrupt or truncated ({exc})") from exc
    except EOFError as exc:
        raise CorruptLayer(f"{what}: tar archive is truncated ({exc})") from exc
    return ops


def _read_chunks(
    tar: tarfile.TarFile, member: tarfile.TarInfo, uploader: BlobUploader,
    on_bytes: Callable[[int], None], packer: DirPacker | None, path: str,
) -> list[tuple[Future[str], int]]:
    f = tar.extractfile(member)
    on_stored = None
    if packer is not None:
        def on_stored(digest: str, stored: bytes) -> None:
            packer.add(path, digest, stored)
    assert f is not None
    chunks = []
    remaining = member.size
    chunk_size = chunk_size_for(member.size, path)
    while remaining > 0:
        data = f.read(min(chunk_size, remaining))
        if not data:
            raise CorruptLayer(f"entry {member.name!r} is truncated")
        chunks.append((uploader.submit(data, on_stored), len(data)))
        remaining -= len(data)
        on_bytes(len(data))
    return chunks


def resolve_chunks(ops: list[dict[str, Any]]) -> None:
    """Replace each op's chunk futures with [digest, length] (waits for the uploads)."""
    for op in ops:
        chunks = op.get("chunks")
        if chunks and isinstance(chunks[0], tuple):
            op["chunks"] = [[fut.result(), length] for fut, length in chunks]
