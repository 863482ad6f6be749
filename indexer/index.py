"""`casfs index`: an image in, a manifest digest out.

Order of work, which is also the crash-safety argument: every layer's blobs are
uploaded, the whole image applied and its manifest built, and the backend synced
before any layer record is written; every record before the manifest; the
manifest before the tag. A crash or a failure at any point (a corrupt or hostile
layer, an unreachable store) leaves only unreferenced blobs, never a layer
record, manifest or tag, so nothing refers to content that is not all there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from casfs.digest import to_ref
from casfs.errors import LayerDigestMismatch
from casfs.manifest import build_manifest
from casfs.progress import Progress, human_bytes
from casfs.store import Store
from casfs.store.content import validate_tag
from indexer.apply import TreeBuilder
from indexer.decompress import HashingReader, open_decompressed
from indexer.imageref import parse_image_ref
from indexer.layer import CHUNK_SIZE, read_layer, resolve_chunks
from indexer.source import Image, Layer, json_object, open_image
from indexer.upload import BlobUploader, UploadStats

log = logging.getLogger(__name__)
LAYER_RECORD_VERSION = 1
HASH_READ = 4 << 20


@dataclass
class IndexResult:
    digest: str
    image: Image
    layers_reused: int = 0
    uncompressed_bytes: int = 0
    upload: UploadStats = field(default_factory=UploadStats)
    seconds: float = 0.0
    manifest_bytes: int = 0

    @property
    def ref(self) -> str:
        return to_ref(self.digest)


def _file_digest(layer: Layer) -> str:
    """sha256 of a layer's stored bytes (checked against its descriptor when it has one)."""
    h = hashlib.sha256()
    with layer.open() as f:
        while data := f.read(HASH_READ):
            h.update(data)
    digest = "sha256:" + h.hexdigest()
    if layer.digest and layer.digest.startswith("sha256:") and digest != layer.digest:
        raise LayerDigestMismatch(f"layer {layer.digest} does not match its digest (read {digest})")
    return digest


def _load_record(store: Store, key: str) -> list[dict[str, Any]] | None:
    raw = store.get_layer_record(key)
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        log.warning("layer record %s is unreadable; indexing the layer again", key)
        return None
    if rec.get("version") != LAYER_RECORD_VERSION or rec.get("chunk_size") != CHUNK_SIZE:
        return None
    return rec["ops"]


def index_image(
    ref_text: str,
    store: Store,
    *,
    tag: str | None = None,
    platform: str | None = None,
    progress: Progress | None = None,
    reuse_layers: bool = True,
) -> IndexResult:
    start = time.monotonic()
    progress = progress or Progress(enabled=False)
    image = open_image(parse_image_ref(ref_text), platform)
    if tag:
        validate_tag(tag)  # refuse a bad tag before any work
    store.check_format(create=True)
    # Blob puts skip their fsync and one sync makes them durable before anything that
    # references them is written; records, manifest and tag are written with fsync.
    deferred = hasattr(store.backend, "deferred_sync")
    was_deferred = getattr(store.backend, "deferred_sync", False)
    if deferred:
        store.backend.deferred_sync = True
    result = IndexResult(digest="", image=image)
    builder = TreeBuilder()
    layer_meta = []
    # Layer records are written only once the whole image has been applied and its
    # manifest built: a failing image (a hostile or corrupt layer, a hardlink to a name
    # no layer has) leaves no record behind, only unreferenced blobs.
    new_records: list[tuple[str, bytes]] = []
    pending: dict[str, list[dict[str, Any]]] = {}  # layers indexed in this run, by key
    uploader = BlobUploader(store)
    try:
        try:
            for i, layer in enumerate(image.layers, start=1):
                label = f"layer {i}/{len(image.layers)}"
                progress.update(f"{label}: verifying", force=True)
                key = _file_digest(layer)
                ops = pending.get(key)
                if ops is None and reuse_layers:
                    ops = _load_record(store, key)
                if ops is not None:
                    result.layers_reused += 1
                    size = sum(op.get("size", 0) for op in ops if op["op"] == "add")
                else:
                    ops, size = _index_layer(layer, key, uploader, label, progress)
                    record = {"version": LAYER_RECORD_VERSION, "chunk_size": CHUNK_SIZE,
                              "ops": ops}
                    new_records.append((key, json.dumps(record, separators=(",", ":")).encode()))
                    pending[key] = ops
                result.uncompressed_bytes += size
                layer_meta.append({"digest": key, "media_type": layer.media_type, "size": size})
                builder.apply_layer(ops, f"{label} ({key[:19]})")
            uploader.close()
        except BaseException:
            uploader.close(cancel=True)
            raise
        result.upload = uploader.stats
        meta = {
            "casfs": "manifest",
            # Where the image was read from (a directory, an archive path) is no part of
            # the image: naming the image by its manifest digest keeps the manifest digest
            # the same for the same image wherever it is indexed from.
            "image": image.manifest_digest,
            "platform": image.platform,
            "config_digest": image.config_digest,
            "image_manifest_digest": image.manifest_digest,
            "config": {k: json_object(image.config.get("config")).get(k) for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User")},
            "layers": layer_meta,
            "chunk_size": CHUNK_SIZE,
        }
        data = build_manifest(builder.root, meta)
        store.sync()
    finally:
        if deferred:
            store.backend.deferred_sync = was_deferred
    for key, raw in new_records:
        store.put_layer_record(key, raw)
    result.digest = store.put_manifest(data)
    result.manifest_bytes = len(data)
    if tag:
        store.set_tag(tag, result.digest)
    result.seconds = time.monotonic() - start
    progress.done(
        f"indexed {len(image.layers)} layers, {human_bytes(result.uncompressed_bytes)} "
        f"in {result.seconds:.1f}s; {result.upload.new_blobs} new blobs "
        f"({human_bytes(result.upload.uploaded_bytes)} stored)"
    )
    return result


def _index_layer(
    layer: Layer, key: str, uploader: BlobUploader, label: str, progress: Progress,
) -> tuple[list[dict[str, Any]], int]:
    done = 0
    started = time.monotonic()

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        rate = done / max(time.monotonic() - started, 1e-6)
        progress.update(f"{label} {key[7:19]}: {human_bytes(done)} ({human_bytes(rate)}/s)")

    what = f"{label} ({key[:19]})"
    with layer.open() as raw:
        hashed = HashingReader(raw)
        stream = open_decompressed(hashed, layer.compression, what)
        diff = HashingReader(stream)
        ops = read_layer(diff, uploader, what, on_bytes)
        diff.drain()
        # The config's diff_id names the uncompressed tar: it catches damage a compressed
        # stream does not check itself (a zstd frame written without a checksum).
        algo, _, want = layer.diff_id.partition(":")
        if algo == "sha256" and diff.hash.hexdigest() != want:
            raise LayerDigestMismatch(
                f"{what}: its uncompressed content does not match its diff_id {layer.diff_id}"
            )
    resolve_chunks(ops)
    return ops, done
