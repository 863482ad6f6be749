"""`casfs index`: an image in, a manifest digest out.

Order of work, which is also the crash-safety argument: every layer's blobs are
uploaded and the backend synced before that layer's record is written; every
blob and record is written before the manifest; the manifest before the tag. A
crash at any point leaves only unreferenced content, never a manifest or tag
pointing at something missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from casfs.digest import to_ref
from casfs.errors import CorruptLayer, ImageError, LayerDigestMismatch
from casfs.manifest import build_manifest
from casfs.progress import Progress, human_bytes
from casfs.store import Store
from indexer.apply import TreeBuilder
from indexer.decompress import HashingReader, open_decompressed
from indexer.imageref import parse_image_ref
from indexer.layer import CHUNK_SIZE, read_layer, resolve_chunks
from indexer.source import Image, Layer, open_image
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
    store.check_format(create=True)
    if hasattr(store.backend, "deferred_sync"):
        store.backend.deferred_sync = True
    result = IndexResult(digest="", image=image)
    builder = TreeBuilder()
    layer_meta = []
    uploader = BlobUploader(store)
    try:
        for i, layer in enumerate(image.layers, start=1):
            label = f"layer {i}/{len(image.layers)}"
            progress.update(f"{label}: verifying", force=True)
            key = _file_digest(layer)
            ops = _load_record(store, key) if reuse_layers else None
            if ops is not None:
                result.layers_reused += 1
                size = sum(op.get("size", 0) for op in ops if op["op"] == "add")
            else:
                ops, size = _index_layer(layer, key, uploader, store, label, progress)
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
        "image": image.ref,
        "platform": image.platform,
        "config_digest": image.config_digest,
        "image_manifest_digest": image.manifest_digest,
        "config": {k: image.config.get("config", {}).get(k) for k in ("Env", "Entrypoint", "Cmd", "WorkingDir", "User")},
        "layers": layer_meta,
        "chunk_size": CHUNK_SIZE,
    }
    data = build_manifest(builder.root, meta)
    store.sync()
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
    layer: Layer, key: str, uploader: BlobUploader, store: Store, label: str, progress: Progress,
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
        if layer.diff_id and not layer.digest and diff.hash.hexdigest() != layer.diff_id.partition(":")[2]:
            raise LayerDigestMismatch(f"{what} does not match its diff_id {layer.diff_id}")
    try:
        resolve_chunks(ops)
    except CorruptLayer:
        raise
    except ImageError:
        raise
    store.sync()
    record = {"version": LAYER_RECORD_VERSION, "chunk_size": CHUNK_SIZE, "ops": ops}
    store.put_layer_record(key, json.dumps(record, separators=(",", ":")).encode())
    return ops, done
