"""The content-addressed store: blobs, manifests, tags and layer records on any backend.

Object keys (the store format, docs/format.md):

    casfs-store.json          {"format": "casfs-store", "version": 1}
    blobs/<hh>/<hex>          a chunk of file content, zstd-compressed; <hex> is the
                              BLAKE3-256 of the *uncompressed* bytes
    manifests/<hex>           a manifest, zstd-compressed; <hex> as for blobs
    tags/<name>               the hex digest of a manifest, as text
    layers/<algo>/<hex>       what indexing one image layer produced (for re-indexing)
    traces/m/<manifest>/<id>  a boot trace of a manifest, zstd-compressed JSON (prefetch/)
    traces/l/<layer hex>/<manifest>.<id>
                              an empty pointer: a trace of an image holding that layer
    packs/<hex>               blobs back to back: concatenated zstd frames, each the
                              stored form of one blob; <hex> is the BLAKE3 of the pack
                              bytes; located by the trace that wrote it (boot order) or
                              by a pack index (a layer's small files, by directory)
    packidx/<algo>/<hex>      a layer's pack index (casfs.packindex), zstd-compressed

Every read is verified: a blob or manifest whose bytes do not hash to its name
raises BlobCorrupt and is never returned.
"""

from __future__ import annotations

import json
import logging
import re
import threading

import zstandard

from casfs.digest import hash_bytes, is_digest
from casfs.errors import BlobCorrupt, CasfsError, ObjectNotFound, StoreError, TagNotFound
from casfs.store.backend import ObjectBackend

STORE_FORMAT_VERSION = 1
STORE_MARKER = "casfs-store.json"
MAX_BLOB_SIZE = 64 << 20
MIN_FRAME_SIZE = 9  # the smallest zstd frame: magic, frame header, one empty block
MAX_MANIFEST_SIZE = 1 << 30
ZSTD_LEVEL = 3
log = logging.getLogger(__name__)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@+-]{0,199}$")

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # Compressor objects are not thread-safe; one per thread.
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes | memoryview) -> bytes:
    return _compressor().compress(data)


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


def blob_key(digest: str) -> str:
    return f"blobs/{digest[:2]}/{digest}"


def manifest_key(digest: str) -> str:
    return f"manifests/{digest}"


def tag_key(name: str) -> str:
    return f"tags/{name}"


def layer_key(prefix: str, layer_digest: str) -> str:
    """The key of a per-layer object: `layers/sha256/<hex>`, `packidx/sha256/<hex>`."""
    algo, _, hex_ = layer_digest.partition(":")
    return f"{prefix}/{algo}/{hex_}"


def validate_tag(name: str) -> str:
    if not _TAG.match(name):
        raise CasfsError(f"invalid tag name {name!r} (letters, digits and _.:@+- only)")
    return name


class Store:
    """A content-addressed store over an object backend. Thread-safe."""

    def __init__(self, backend: ObjectBackend) -> None:
        self.backend = backend
        self.url = backend.url
        self._known: set[str] = set()
        self._known_lock = threading.Lock()
        self._marker_checked = False

    # -- format marker -------------------------------------------------------

    def check_format(self, create: bool) -> None:
        """Refuse a store written by a newer casfs; write the marker on first write."""
        if self._marker_checked:
            return
        try:
            info = json.loads(self.backend.get(STORE_MARKER))
            version = int(info.get("version", 0))
        except ObjectNotFound:
            if create:
                self.backend.put(
                    STORE_MARKER,
                    json.dumps({"format": "casfs-store", "version": STORE_FORMAT_VERSION}).encode(),
                )
            self._marker_checked = create
            return
        except (ValueError, AttributeError) as exc:
            raise StoreError(f"{self.url}/{STORE_MARKER} is not a casfs store marker") from exc
        if version > STORE_FORMAT_VERSION:
            raise StoreError(
                f"store {self.url} has format version {version}; this casfs reads up to "
                f"{STORE_FORMAT_VERSION}: upgrade casfs"
            )
        self._marker_checked = True

    def sync(self) -> None:
        """Make every blob put so far durable; call before publishing a manifest."""
        self.backend.sync()

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
        return self.backend.get(blob_key(digest))

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
            packed = self.backend.get(manifest_key(digest))
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
        self.backend.put(tag_key(validate_tag(name)), digest.encode())

    def get_tag(self, name: str) -> str:
        try:
            value = self.backend.get(tag_key(validate_tag(name))).decode().strip()
        except ObjectNotFound:
            raise TagNotFound(f"tag {name!r} not found in {self.url}") from None
        if not is_digest(value):
            raise StoreError(f"tag {name!r} in {self.url} holds no manifest digest")
        return value

    def list_tags(self) -> list[str]:
        return sorted(k[len("tags/") :] for k in self.backend.list("tags/"))

    def delete_tag(self, name: str) -> None:
        self.backend.delete(tag_key(validate_tag(name)))

    # -- layer records -------------------------------------------------------

    def get_layer_record(self, layer_digest: str) -> bytes | None:
        """A layer's record, or None when there is none, or it is damaged (e.g. an
        aborted upload left an empty object): the layer is then indexed again and its
        record rewritten."""
        try:
            packed = self.backend.get(layer_key("layers", layer_digest))
        except ObjectNotFound:
            return None
        try:
            return decompress(packed, MAX_MANIFEST_SIZE, f"layer record {layer_digest}")
        except BlobCorrupt as exc:
            log.warning("%s; indexing the layer again", exc)
            return None

    def put_layer_record(self, layer_digest: str, data: bytes) -> None:
        self.backend.put(layer_key("layers", layer_digest), compress(data))


    # -- traces and packs (written and read by prefetch/) ---------------------

    def put_trace(self, manifest: str, trace_id: str, data: bytes, layers: list[str]) -> None:
        self.backend.put(f"traces/m/{manifest}/{trace_id}", compress(data))
        for layer in layers:
            hex_ = layer.partition(":")[2] or layer
            self.backend.put(f"traces/l/{hex_}/{manifest}.{trace_id}", b"")

    def list_traces(self, manifest: str) -> list[str]:
        """Trace ids of a manifest, oldest first."""
        prefix = f"traces/m/{manifest}/"
        return sorted(k[len(prefix):] for k in self.backend.list(prefix))

    def list_layer_traces(self, layer: str) -> list[tuple[str, str]]:
        """(manifest, trace id) of every trace of an image holding this layer."""
        hex_ = layer.partition(":")[2] or layer
        prefix = f"traces/l/{hex_}/"
        out = []
        for key in self.backend.list(prefix):
            manifest, _, trace_id = key[len(prefix):].partition(".")
            if is_digest(manifest) and trace_id:
                out.append((manifest, trace_id))
        return sorted(out)

    def get_trace(self, manifest: str, trace_id: str, limit: int) -> bytes:
        packed = self.backend.get(f"traces/m/{manifest}/{trace_id}")
        return decompress(packed, limit, f"trace {manifest}/{trace_id}")

    def put_pack(self, data: bytes) -> str:
        digest = hash_bytes(data)
        self.backend.put(f"packs/{digest}", data)
        return digest

    def get_pack_range(self, pack: str, offset: int, length: int) -> bytes:
        return self.backend.get_range(f"packs/{pack}", offset, length)

    # -- pack indexes (a layer's directory packs: casfs.packindex) ------------

    def put_pack_index(self, layer_digest: str, data: bytes) -> None:
        self.backend.put(layer_key("packidx", layer_digest), compress(data))

    def has_pack(self, pack: str) -> bool:
        return self.backend.exists(f"packs/{pack}")

    def get_pack_index(self, layer_digest: str, limit: int) -> bytes | None:
        """A layer's pack index (decompressed, unparsed), or None when it has none."""
        try:
            packed = self.backend.get(layer_key("packidx", layer_digest))
        except ObjectNotFound:
            return None
        return decompress(packed, limit, f"pack index of layer {layer_digest}")


def verify_blob(digest: str, packed: bytes) -> bytes:
    """Decompress a stored blob and check it hashes to digest."""
    data = decompress(packed, MAX_BLOB_SIZE, f"blob {digest}")
    if hash_bytes(data) != digest:
        raise BlobCorrupt(f"blob {digest} does not match its digest (corrupt in the store)")
    return data
