"""The layer record format: what indexing one image layer produced, kept so that a
re-index of a known layer reads nothing but this (docs/format.md, store key
`layers/<algo>/<hex>`, zstd-compressed JSON). This module owns writing and parsing
it; indexer.index stores and reuses records, casfs.gc and casfs.check read them.

    {"version": 1, "chunking": "<scheme>", "ops": [op, ...]}

Records of the earlier fixed chunking carry `"chunk_size": 262144` instead of
`"chunking"` (they parse; indexer.index does not reuse them). The ops are those
indexer.layer makes and indexer.apply applies, in the layer's tar order:

    {"op": "add", "path", "type", "perm", "uid", "gid", "mtime_ns", ["xattrs"],
       a regular file: "size", "chunks": [[digest, length], ...] tiling the file;
       a symlink: "target"; a device: "rdev": [major, minor]}
    {"op": "link", "path", "target"}         a hardlink
    {"op": "whiteout", "path"}, {"op": "opaque", "path"}

Records come from the store and are untrusted: parse() checks the envelope and the
type of every field apply reads, and that each file's chunks are BLAKE3 digests whose
lengths add up to its size, and raises LayerRecordError otherwise.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from typing import Any, TypeGuard

from casfs.digest import is_digest
from casfs.errors import LayerRecordError
from casfs.store.content import MAX_BLOB_SIZE, MAX_RECORD_SIZE

LAYER_RECORD_VERSION = 1
MAX_RECORD_BYTES = MAX_RECORD_SIZE
_INT_FIELDS = ("type", "perm", "uid", "gid", "mtime_ns")


@dataclass
class LayerRecord:
    ops: list[dict[str, Any]]
    chunking: str | None  # the chunking scheme; None in records of the fixed chunking

    def chunk_digests(self) -> set[str]:
        """Every chunk the record's files name."""
        return {digest for op in self.ops for digest, _length in op.get("chunks") or ()}


def encode(ops: list[dict[str, Any]], chunking: str) -> bytes:
    """A record of a layer's ops (their chunks resolved to [digest, length])."""
    record = {"version": LAYER_RECORD_VERSION, "chunking": chunking, "ops": ops}
    return json.dumps(record, separators=(",", ":")).encode()


def files_size(ops: list[dict[str, Any]]) -> int:
    """Uncompressed bytes of the files a layer's ops add."""
    return sum(op.get("size", 0) for op in ops if op["op"] == "add")


def _int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_op(op: Any) -> str | None:
    """What is wrong with one op, or None."""
    if not isinstance(op, dict) or not isinstance(op.get("path"), str):
        return "an op without a path"
    kind = op.get("op")
    if kind in ("whiteout", "opaque"):
        return None
    if kind == "link":
        return None if isinstance(op.get("target"), str) else "a hardlink without a target"
    if kind != "add":
        return f"an op of unknown kind {kind!r}"
    if not all(_int(op.get(f)) for f in _INT_FIELDS):
        return f"entry {op['path']!r}: a metadata field is missing or not an integer"
    xattrs = op.get("xattrs")
    if xattrs is not None and not (isinstance(xattrs, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in xattrs.items())):
        return f"entry {op['path']!r}: bad xattrs"
    kind_bits = stat.S_IFMT(op["type"])
    if kind_bits == stat.S_IFREG:
        size, chunks = op.get("size"), op.get("chunks")
        if not _int(size) or size < 0 or not isinstance(chunks, list):
            return f"file {op['path']!r}: no size or chunk list"
        total = 0
        for chunk in chunks:
            if not (isinstance(chunk, list) and len(chunk) == 2 and isinstance(chunk[0], str)
                    and is_digest(chunk[0]) and _int(chunk[1])
                    and 0 < chunk[1] <= MAX_BLOB_SIZE):
                return f"file {op['path']!r}: a malformed chunk"
            total += chunk[1]
        if total != size:
            return f"file {op['path']!r}: chunks cover {total} of its {size} bytes"
    elif kind_bits == stat.S_IFLNK and not isinstance(op.get("target"), str):
        return f"symlink {op['path']!r} without a target"
    elif kind_bits in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = op.get("rdev")
        if not (isinstance(rdev, list) and len(rdev) == 2 and all(_int(v) for v in rdev)):
            return f"device {op['path']!r} without a device number"
    return None


def parse(data: bytes, what: str) -> LayerRecord:
    """A layer record's ops and scheme; raises LayerRecordError."""
    if len(data) > MAX_RECORD_BYTES:
        raise LayerRecordError(f"{what}: larger than {MAX_RECORD_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise LayerRecordError(f"{what}: not JSON ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("version") != LAYER_RECORD_VERSION:
        raise LayerRecordError(f"{what}: not a version {LAYER_RECORD_VERSION} layer record")
    ops, chunking = doc.get("ops"), doc.get("chunking")
    if not isinstance(ops, list):
        raise LayerRecordError(f"{what}: no op list")
    if chunking is not None and not isinstance(chunking, str):
        raise LayerRecordError(f"{what}: bad chunking scheme")
    for op in ops:
        wrong = _check_op(op)
        if wrong is not None:
            raise LayerRecordError(f"{what}: {wrong}")
    return LayerRecord(ops, chunking)
