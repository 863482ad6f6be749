"""The content-addressed store: blobs, manifests, tags, layer records, pack indexes,
traces and packs on any backend: what each kind's bytes are (compression, digests,
size bounds), on top of the key layout of casfs.store.keys (docs/format.md).

Every read is verified: a blob or manifest whose bytes do not hash to its name
raises BlobCorrupt and is never returned. Every read is bounded: each kind is
fetched with the largest size it can have (`max_bytes`, the backend contract), so
a damaged or hostile store cannot make a reader download or allocate more; an
object over its bound is damage, reported as BlobCorrupt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading

import zstandard

from casfs.digest import hash_bytes, is_digest
from casfs.errors import BlobCorrupt, ObjectNotFound, StoreError, TagNotFound
from casfs.store.backend import ObjectBackend, ObjectTooLarge
from casfs.store.keys import (
    PREFIXES,
    STORE_MARKER,
    Kind,
    ParsedKey,
    blob_key,
    layer_record_key,
    layer_traces_prefix,
    manifest_key,
    pack_index_key,
    pack_key,
    tag_key,
    trace_key,
    trace_pointer_key,
    traces_prefix,
    try_parse_key,
)

# STORE_MARKER, blob_key and manifest_key are also imported from here by older callers.
__all__ = [
    "MAX_BLOB_SIZE", "MAX_MANIFEST_SIZE", "MAX_STORED_BLOB_SIZE", "STORE_MARKER", "Store",
    "blob_key", "compress", "decompress", "manifest_key", "stored_bound", "verify_blob",
]

STORE_FORMAT_VERSION = 1
MAX_BLOB_SIZE = 64 << 20
MIN_FRAME_SIZE = 9  # the smallest zstd frame: magic, frame header, one empty block
MAX_MANIFEST_SIZE = 1 << 30
MAX_RECORD_SIZE = MAX_MANIFEST_SIZE  # a layer record, decompressed
MAX_SMALL_OBJECT = 4 << 10
"""The store marker, a tag, a lock: a line of JSON or a digest, far below this."""
ZSTD_LEVEL = 3
log = logging.getLogger(__name__)


def stored_bound(size: int) -> int:
    """The most bytes a zstd frame of `size` bytes of content can take: zstd's
    compressBound (size + size/256 + up to 64 for small inputs), rounded up generously."""
    return size + (size >> 7) + 1024


MAX_STORED_BLOB_SIZE = stored_bound(MAX_BLOB_SIZE)

_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # Compressor objects are not thread-safe; one per thread (and level).
    made: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if made is None:
        made = _local.cctx = {}
    c = made.get(level)
    if c is None:
        c = made[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | memoryview, level: int = ZSTD_LEVEL) -> bytes:
    """One zstd frame with its size in the header (readers take any level)."""
    return _compressor(level).compress(data)


def decompress(data: bytes, limit: int, what: str) -> bytes:
    """Decompress one zstd frame of at most `limit` bytes; corrupt input raises BlobCorrupt."""
    try:
        # A frame may declare any size; the library would allocate it before
        # checking max_output_size, so refuse absurd declarations first.
        declared = zstandard.get_frame_parameters(data).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:
            raise BlobCorrupt(f"{what} declares {declared} bytes, over the {limit}-byte limit")
        return _decompressor().decompress(data, max_output_size=limit)
    except zstandard.ZstdError as exc:
        raise BlobCorrupt(f"{what} is not a valid zstd frame: {exc}") from exc


class Store:
    """A content-addressed store over an object backend. Thread-safe."""

    def __init__(self, backend: ObjectBackend) -> None:
        self.backend = backend
        self.url = backend.url
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        self._marker_checked = False

    def _get(self, key: str, max_bytes: int, what: str) -> bytes:
        """An object no larger than its kind can be; one larger is damage (BlobCorrupt)."""
        try:
            return self.backend.get(key, max_bytes=max_bytes)
        except ObjectTooLarge as exc:
            raise BlobCorrupt(f"{what} in {self.url} is damaged: {exc}") from exc

    def _keys(self, kind: Kind, prefix: str) -> list[ParsedKey]:
        """The parsed keys of a kind under prefix; keys that do not parse are left out
        (casfs check reports them)."""
        out = []
        for key in self.backend.list(prefix):
            parsed = try_parse_key(key)
            if isinstance(parsed, ParsedKey) and parsed.kind == kind:
                out.append(parsed)
        return out

    # -- format marker -------------------------------------------------------

    def check_format(self, create: bool) -> None:
        """Refuse a store written by a newer casfs; write the marker on first write."""
        if self._marker_checked:
            return
        try:
            info = json.loads(self._get(STORE_MARKER, MAX_SMALL_OBJECT, "the store marker"))
            version = int(info.get("version", 0))
        except ObjectNotFound:
            if create:
                self.backend.put(
                    STORE_MARKER,
                    json.dumps({"format": "casfs-store", "version": STORE_FORMAT_VERSION}).encode(),
                )
            self._marker_checked = create
            return
        except (ValueError, AttributeError, BlobCorrupt) as exc:
            raise StoreError(f"{self.url}/{STORE_MARKER} is not a casfs store marker "
                             f"({exc})") from exc
        if version > STORE_FORMAT_VERSION:
            raise StoreError(
                f"store {self.url} has format version {version}; this casfs reads up to "
                f"{STORE_FORMAT_VERSION}: upgrade casfs"
            )
        self._marker_checked = True

    def sync(self) -> None:
        """Make every blob put so far durable; call before publishing a manifest."""
        self.backend.sync()

    def deferred_syncs(self) -> contextlib.AbstractContextManager[None]:
        """A block in which puts need not be durable until sync() (the backend contract)."""
        return self.backend.deferred_syncs()

    # -- blobs ---------------------------------------------------------------

    def forget_known(self) -> None:
        """Drop the memo of blobs seen stored (after deletions, e.g. by gc)."""
        with self._known_lock:
            self._known.clear()

    def _stored(self, key: str) -> bool:
        """Whether key holds an object that can be a zstd frame. An object too small to
        be one is what an aborted upload can leave (an empty object): it counts as
        absent, so the next upload of that content replaces it."""
        size_of = getattr(self.backend, "size", None)
        if size_of is None:
            return self.backend.exists(key)
        size = size_of(key)
        if size is None:
            return False
        if 0 <= size < MIN_FRAME_SIZE:
            log.warning("%s in %s is a %d-byte object (an aborted upload?): writing it again",
                        key, self.url, size)
            return False
        return True

    def has_blob(self, digest: str) -> bool:
        with self._known_lock:
            if digest in self._known:
                return True
        found = self._stored(blob_key(digest))
        if found:
            with self._known_lock:
                self._known.add(digest)
        return found

    def put_blob(self, data: bytes | memoryview, digest: str | None = None,
                 packed: bytes | None = None) -> tuple[str, int]:
        """Store a blob unless present (`packed`: its stored form, when already made).
        Returns (digest, compressed bytes uploaded, 0 if skipped)."""
        digest = digest or hash_bytes(data)
        if self.has_blob(digest):
            return digest, 0
        packed = packed if packed is not None else compress(data)
        self.backend.put(blob_key(digest), packed)
        with self._known_lock:
            self._known.add(digest)
        return digest, len(packed)

    def get_blob_compressed(self, digest: str) -> bytes:
        """The stored (compressed) form of a blob, unverified: callers verify after decompressing."""
        return self._get(blob_key(digest), MAX_STORED_BLOB_SIZE, f"blob {digest}")

    def get_blob(self, digest: str) -> bytes:
        """A blob's bytes, verified against its digest."""
        return verify_blob(digest, self.get_blob_compressed(digest))

    # -- manifests -----------------------------------------------------------

    def put_manifest(self, data: bytes) -> str:
        digest = hash_bytes(data)
        key = manifest_key(digest)
        if not self._stored(key):
            self.backend.put(key, compress(data))
        return digest

    def get_manifest(self, digest: str) -> bytes:
        try:
            packed = self._get(manifest_key(digest), stored_bound(MAX_MANIFEST_SIZE),
                               f"manifest {digest}")
        except ObjectNotFound:
            raise ObjectNotFound(f"manifest {digest} not found in {self.url}") from None
        data = decompress(packed, MAX_MANIFEST_SIZE, f"manifest {digest}")
        if hash_bytes(data) != digest:
            raise BlobCorrupt(f"manifest {digest} in {self.url} does not match its digest")
        return data

    def has_manifest(self, digest: str) -> bool:
        return self.backend.exists(manifest_key(digest))

    # -- tags ----------------------------------------------------------------

    def set_tag(self, name: str, digest: str) -> None:
        self.backend.put(tag_key(name), digest.encode())

    def get_tag(self, name: str) -> str:
        try:
            raw = self._get(tag_key(name), MAX_SMALL_OBJECT, f"tag {name!r}")
        except ObjectNotFound:
            raise TagNotFound(f"tag {name!r} not found in {self.url}") from None
        except BlobCorrupt as exc:
            raise StoreError(f"tag {name!r} in {self.url} holds no manifest digest "
                             f"({exc})") from exc
        value = raw.decode(errors="replace").strip()
        if not is_digest(value):
            raise StoreError(f"tag {name!r} in {self.url} holds no manifest digest")
        return value

    def list_tags(self) -> list[str]:
        """Tag names, sorted (keys under tags/ that are no valid name are left out)."""
        return sorted(k.name for k in self._keys(Kind.TAG, PREFIXES[Kind.TAG]))

    def delete_tag(self, name: str) -> None:
        self.backend.delete(tag_key(name))

    # -- layer records -------------------------------------------------------

    def read_layer_record(self, layer_digest: str) -> bytes:
        """A layer's record, decompressed (unparsed). Raises ObjectNotFound, BlobCorrupt."""
        what = f"layer record {layer_digest}"
        packed = self._get(layer_record_key(layer_digest), stored_bound(MAX_RECORD_SIZE), what)
        return decompress(packed, MAX_RECORD_SIZE, what)

    def get_layer_record(self, layer_digest: str) -> bytes | None:
        """A layer's record, or None when there is none, or it is damaged (e.g. an
        aborted upload left an empty object): the layer is then indexed again and its
        record rewritten."""
        try:
            return self.read_layer_record(layer_digest)
        except ObjectNotFound:
            return None
        except BlobCorrupt as exc:
            log.warning("%s; indexing the layer again", exc)
            return None

    def put_layer_record(self, layer_digest: str, data: bytes) -> None:
        self.backend.put(layer_record_key(layer_digest), compress(data))

    # -- traces and packs (written and read by prefetch/) ---------------------

    def put_trace(self, manifest: str, trace_id: str, data: bytes, layers: list[str]) -> None:
        self.backend.put(trace_key(manifest, trace_id), compress(data))
        for layer in layers:
            self.backend.put(trace_pointer_key(layer, manifest, trace_id), b"")

    def list_traces(self, manifest: str) -> list[str]:
        """Trace ids of a manifest, oldest first."""
        found = self._keys(Kind.TRACE, traces_prefix(manifest))
        return sorted(k.trace_id for k in found if k.manifest == manifest)

    def list_layer_traces(self, layer: str) -> list[tuple[str, str]]:
        """(manifest, trace id) of every trace of an image holding this layer."""
        return sorted((k.manifest, k.trace_id)
                      for k in self._keys(Kind.TRACE_POINTER, layer_traces_prefix(layer)))

    def get_trace(self, manifest: str, trace_id: str, limit: int) -> bytes:
        what = f"trace {manifest}/{trace_id}"
        packed = self._get(trace_key(manifest, trace_id), stored_bound(limit), what)
        return decompress(packed, limit, what)

    def put_pack(self, data: bytes) -> str:
        digest = hash_bytes(data)
        self.backend.put(pack_key(digest), data)
        return digest

    def get_pack_range(self, pack: str, offset: int, length: int) -> bytes:
        return self.backend.get_range(pack_key(pack), offset, length)

    # -- pack indexes (a layer's directory packs: casfs.packindex) ------------

    def put_pack_index(self, layer_digest: str, data: bytes) -> None:
        self.backend.put(pack_index_key(layer_digest), compress(data))

    def has_pack(self, pack: str) -> bool:
        return self.backend.exists(pack_key(pack))

    def get_pack_index(self, layer_digest: str, limit: int) -> bytes | None:
        """A layer's pack index (decompressed, unparsed), or None when it has none."""
        what = f"pack index of layer {layer_digest}"
        try:
            packed = self._get(pack_index_key(layer_digest), stored_bound(limit), what)
        except ObjectNotFound:
            return None
        return decompress(packed, limit, what)


def verify_blob(digest: str, packed: bytes) -> bytes:
    """Decompress a stored blob and check it hashes to digest."""
    data = decompress(packed, MAX_BLOB_SIZE, f"blob {digest}")
    if hash_bytes(data) != digest:
        raise BlobCorrupt(f"blob {digest} does not match its digest (corrupt in the store)")
    return data
