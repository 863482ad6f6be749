"""`casfs index`: an image in, a manifest digest out.

Order of work, which is also the crash-safety argument: every layer's blobs are
uploaded, the whole image applied and its manifest built, and the backend synced
before any layer record is written; every record before the manifest; the
manifest before the tag. A crash or a failure at any point (a corrupt or hostile
layer, an unreachable store or registry) leaves only unreferenced blobs, never a
layer record, manifest or tag, so nothing refers to content that is not all there.

A layer is named (its record key) by the sha256 of its stored bytes. A local layer
(OCI layout, docker archive) is hashed before it is read for indexing. A registry
layer is named by its descriptor digest and checked while it streams: hashing it first
would mean downloading it twice. Its digest is thus known to be right only at the end
of its stream, after its chunks were uploaded; a mismatch then fails the index like any
bad layer, and the chunks it uploaded are unreferenced blobs that `casfs gc` sweeps
(keeping them out of the store would need a temp copy of every layer).

Layers are read in parallel (LAYER_WORKERS threads for a registry image, each
streaming one layer through download, digest check, decompression, tar parsing and
chunking into the one shared uploader, whose memory bound covers them all), and
applied to the tree in layer order as they complete.
"""

from __future__ import annotations

import gc
import hashlib
import io
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from casfs import packindex
from casfs.digest import to_ref
from casfs.errors import (
    CasfsError,
    CorruptLayer,
    HostileLayer,
    ImageError,
    LayerDigestMismatch,
    StoreError,
)
from casfs.manifest import build_manifest
from casfs.progress import Progress, ProgressBar, human_bytes
from casfs.store import Store
from casfs.store.keys import layer_record_key, validate_tag
from casfs.store.locks import Lock, index_lock
from indexer.apply import TreeBuilder
from indexer.chunking import SCHEME as CHUNKING
from indexer.decompress import (
    READ_SIZE,
    ExpansionGuard,
    HashingReader,
    PassThrough,
    Readable,
    ReadAhead,
    layer_limits,
    open_decompressed,
)
from indexer.dirpack import DirPacker, PackStats
from indexer.imageref import parse_image_ref
from indexer.layer import read_layer, resolve_chunks
from indexer.layerrecord import LayerRecordError, files_size
from indexer.layerrecord import encode as encode_record
from indexer.layerrecord import parse as parse_record
from indexer.oci import Image, Layer, json_object
from indexer.open import open_image, open_tree
from indexer.registry import RegistryOptions
from indexer.tree import MEDIA_TYPE as TREE_MEDIA_TYPE
from indexer.tree import TreeReader, TreeSource
from indexer.upload import Aborted, BlobPresence, BlobUploader, UploadStats, stoppable_store

log = logging.getLogger(__name__)
HASH_READ = 4 << 20
LAYER_WORKERS = 3  # registry layers streamed at once
BLAME_READ_LIMIT = 512 << 20  # see _blame_digest
LOCAL_LAYER_WORKERS = 1  # local layers are CPU-bound: more threads only contend for the GIL
LOCAL_UPLOAD_WORKERS = 4  # uploads into a local store (16 into a remote one)


@dataclass
class IndexResult:
    digest: str
    image: Image
    layers_reused: int = 0
    uncompressed_bytes: int = 0
    upload: UploadStats = field(default_factory=UploadStats)
    seconds: float = 0.0
    manifest_bytes: int = 0
    downloaded_bytes: int = 0  # stored (compressed) layer bytes read for indexing
    packs: PackStats = field(default_factory=PackStats)  # directory packs written

    @property
    def ref(self) -> str:
        return to_ref(self.digest)


class _Tracked(PassThrough):
    """A layer's stored byte stream: counts bytes onto a progress bar and stops when the
    index is aborted."""

    def __init__(self, inner: Readable, bar: ProgressBar,
                 abort: threading.Event) -> None:
        super().__init__(inner)
        self.bar = bar
        self.abort = abort

    def pull(self, n: int) -> bytes:
        if self.abort.is_set():
            raise Aborted()
        return self.inner.read(n)

    def seen(self, data: bytes) -> None:
        self.bar.advance(len(data))

    def close(self) -> None:
        self.inner.close()
        super().close()


def _file_digest(layer: Layer, bar: ProgressBar | None = None,
                 abort: threading.Event | None = None) -> str:
    """sha256 of a layer's stored bytes (checked against its descriptor when it has one)."""
    h = hashlib.sha256()
    with layer.open() as f:
        while data := f.read(HASH_READ):
            if abort is not None and abort.is_set():
                raise Aborted()
            h.update(data)
            if bar is not None:
                bar.advance(len(data))
    digest = "sha256:" + h.hexdigest()
    if layer.digest and layer.digest.startswith("sha256:") and digest != layer.digest:
        raise LayerDigestMismatch(f"layer {layer.digest} does not match its digest (read {digest})")
    return digest


def _pack_index_usable(store: Store, key: str) -> bool:
    """Whether a layer's pack index is there and names only packs the store has."""
    try:
        raw = store.get_pack_index(key, packindex.MAX_INDEX_BYTES)
        if raw is None:
            return False
        packs = {pack for pack, _, _ in packindex.parse(raw, f"pack index {key}").values()}
        return all(store.has_pack(pack) for pack in packs)
    except CasfsError as exc:
        log.warning("layer %s: its pack index is unusable (%s)", key, exc)
        return False


def _load_record(store: Store, key: str) -> list[dict[str, Any]] | None:
    """The ops of a layer's record, when it has one this casfs can reuse."""
    raw = store.get_layer_record(key)
    if raw is None:
        return None
    try:
        record = parse_record(raw, f"layer record {key}")
    except LayerRecordError as exc:
        log.warning("%s; indexing the layer again", exc)
        return None
    return record.ops if record.chunking == CHUNKING else None


@dataclass
class _LayerDone:
    key: str
    ops: list[dict[str, Any]]
    size: int  # uncompressed bytes of the layer's files
    record: bytes | None = None  # a new layer record to write (None: reused)
    pack_index: bytes | None = None  # with a new record: its directory pack index
    owner: int | None = None  # the same layer appears earlier: its index in the image
    downloaded: int = 0


def index_image(
    ref_text: str,
    store: Store,
    *,
    tag: str | None = None,
    platform: str | None = None,
    progress: Progress | None = None,
    reuse_layers: bool = True,
    registry: RegistryOptions | None = None,
    layer_workers: int | None = None,
) -> IndexResult:
    """Index an image (or a `tree:` directory) into the store; its manifest reference is
    `result.ref`. The first failure stops the whole index (see indexer.upload), which
    then publishes nothing and releases its lock."""
    start = time.monotonic()
    progress = progress or Progress(enabled=False)
    progress.update("resolving the image", force=True)
    ref = parse_image_ref(ref_text)
    tree = open_tree(ref) if ref.transport == "tree" else None
    image = tree_image(tree) if tree is not None else open_image(ref, platform, registry)
    if tag:
        validate_tag(tag)  # refuse a bad tag before any work
    store.check_format(create=True)
    # One fate for every request of this index: the first that runs out of retries
    # stops the others (indexer.upload).
    stop = threading.Event()
    view = stoppable_store(store, stop)
    # Garbage collection must not sweep a blob this index finds present and so does
    # not upload: hold the store's index lock from the first upload to the tag.
    lock = index_lock(view)
    lock.keep_fresh()
    # The cyclic garbage collector would scan the index's growing heap (an op dict, tar
    # header and future per file: 27k files make ~8 s of collections in a 20 s index of
    # the torch image); nothing the index builds is cyclic garbage worth finding early.
    collecting = gc.isenabled()
    gc.disable()
    try:
        if tree is not None:
            return _index_tree_locked(tree, image, view, tag, progress, start, stop)
        return _index_locked(image, view, tag, progress, reuse_layers, layer_workers, start,
                             stop)
    except StoreError as exc:
        if not stop.is_set():
            raise
        # The store failed under the index: one report, saying what became of it.
        raise type(exc)(f"{exc}; the index stopped at this first failure and published "
                        "nothing") from exc
    finally:
        if collecting:
            gc.enable()
        _release(lock, stop)


def _release(lock: Lock, stop: threading.Event) -> None:
    """Remove the index lock. After a failure (the store may be gone) one attempt, and a
    lock that cannot be removed is left to go stale rather than replace the report."""
    try:
        lock.release()
    except StoreError as exc:
        if not stop.is_set():
            raise
        log.warning("could not remove the index lock %s (%s): it goes stale in 15 minutes",
                    lock.key, exc)


def _uploader(store: Store, stop: threading.Event) -> BlobUploader:
    """The index's uploader; against a remote store, one that lists blob prefixes rather
    than asking about each chunk (indexer.upload.BlobPresence)."""
    if store.url.startswith("s3://"):
        presence = BlobPresence(getattr(store.backend, "inner", store.backend))
        return BlobUploader(store, stop=stop, presence=presence)
    # A local store has no latency to hide: 4 threads keep both cores busy hashing and
    # compressing; more only queue on the store directory's locks (and the GIL).
    return BlobUploader(store, workers=LOCAL_UPLOAD_WORKERS, stop=stop)


def tree_image(tree: TreeSource) -> Image:
    """The Image a tree stands as (its one pseudo-layer is named once it has been read)."""
    return Image(ref=tree.ref, config={}, config_digest="", manifest_digest="", layers=[],
                 platform="directory")


def _no_layer_blob() -> Any:
    raise ImageError("a tree has no layer blob to open")


def _index_locked(image: Image, store: Store, tag: str | None, progress: Progress,
                  reuse_layers: bool, layer_workers: int | None, start: float,
                  stop: threading.Event) -> IndexResult:
    result = IndexResult(digest="", image=image)
    builder = TreeBuilder()
    layer_meta = []
    # Layer records are written only once the whole image has been applied and its
    # manifest built: a failing image (a hostile or corrupt layer, a hardlink to a name
    # no layer has, a layer whose bytes do not match its digest) leaves no record
    # behind, only unreferenced blobs.
    new_records: list[tuple[str, bytes, bytes | None]] = []  # (key, record, pack index)
    abort = stop  # one event: a failed layer stops the uploads, a failed upload the layers
    uploader = _uploader(store, stop)
    layers = image.layers
    if layer_workers is None:
        remote = any(layer.verifies_digest for layer in layers)
        layer_workers = LAYER_WORKERS if remote else LOCAL_LAYER_WORKERS
    claims: dict[str, int] = {}  # layer key -> the first layer (index) that indexes it
    claims_lock = threading.Lock()

    def work(i: int, layer: Layer) -> _LayerDone:
        try:
            return _process_layer(i, layer)
        except BaseException:
            abort.set()
            raise

    def _process_layer(i: int, layer: Layer) -> _LayerDone:
        label = f"layer {i + 1}/{len(layers)}"
        if abort.is_set():
            raise Aborted()
        if layer.verifies_digest:
            key = layer.digest
            bar = None
        else:
            bar = progress.bar(f"{label} {layer.digest[7:19] or ''}".rstrip(), layer.size)
            bar.set_phase("verifying")
            key = _file_digest(layer, bar, abort)
        with claims_lock:
            owner = claims.setdefault(key, i)
        if owner != i:
            if bar is not None:
                bar.finish(f"same as layer {owner + 1}")
            return _LayerDone(key, [], 0, owner=owner)
        ops = _load_record(store, key) if reuse_layers else None
        unpacked = None  # a record whose layer has no (usable) directory packs
        if ops is not None and not _pack_index_usable(store, key):
            # Indexed before directory packs existed (or an older casfs's gc swept
            # them): read it again to pack it.
            progress.note(f"{label} {key[7:19]}: indexed without directory packs; "
                          "indexing it again")
            unpacked, ops = ops, None
        if ops is not None:
            size = files_size(ops)
            if bar is not None:
                bar.finish("already indexed")
            else:
                progress.note(f"{label} {key[7:19]}: already indexed")
            return _LayerDone(key, ops, size)
        if bar is None:
            bar = progress.bar(f"{label} {key[7:19]}", layer.size)
        bar.set_phase("indexing", layer.size)
        packer = DirPacker(store)
        try:
            ops, size, downloaded = _index_layer(layer, key, uploader, label, bar, abort,
                                                 packer)
        except BaseException as exc:
            packer.close()  # waits for upload threads still spilling; later adds are no-ops
            if unpacked is None or not isinstance(exc, CasfsError) or abort.is_set():
                raise
            # Packing is an optimisation: a layer that cannot be read again now (its
            # blob gone from the registry) keeps its record, without packs.
            log.warning("%s %s: could not read it again to pack it (%s); reusing its "
                        "record", label, key[7:19], exc)
            bar.finish("already indexed (not packed)")
            return _LayerDone(key, unpacked, files_size(unpacked))
        bar.set_note("(writing directory packs)")
        pack_index = packer.finish(f"{label} ({key[:19]})")  # and closes it
        with claims_lock:
            result.packs.files += packer.stats.files
            result.packs.packs += packer.stats.packs
            result.packs.bytes += packer.stats.bytes
        bar.finish(f"{human_bytes(downloaded)} read, {human_bytes(size)} of files, "
                   f"{len(ops)} entries")
        return _LayerDone(key, ops, size, encode_record(ops, CHUNKING),
                          pack_index=pack_index, downloaded=downloaded)

    # Blob and pack puts need not be durable one by one: leaving this block syncs them
    # all, before any layer record, manifest or tag that refers to them is written
    # (those are written outside it, each durable on return).
    with store.deferred_syncs():
        pool = ThreadPoolExecutor(max_workers=max(1, layer_workers), thread_name_prefix="layer")
        futures: list[Future[_LayerDone]] = [
            pool.submit(work, i, layer) for i, layer in enumerate(layers)
        ]
        try:
            for i, fut in enumerate(futures):
                res = fut.result()
                ops, size = res.ops, res.size
                if res.owner is not None:  # the layer another worker indexes (or did)
                    first = futures[res.owner].result()
                    ops, size = first.ops, first.size
                if res.owner is not None or res.record is None:
                    result.layers_reused += 1
                else:
                    new_records.append((res.key, res.record, res.pack_index))
                result.uncompressed_bytes += size
                result.downloaded_bytes += res.downloaded
                layer_meta.append({"digest": res.key, "media_type": layers[i].media_type,
                                   "size": size})
                builder.apply_layer(ops, f"layer {i + 1}/{len(layers)} ({res.key[:19]})")
            pool.shutdown(wait=True)
            uploader.close()
        except BaseException as exc:
            abort.set()
            pool.shutdown(wait=True, cancel_futures=True)
            uploader.close(cancel=True)
            if uploader.error is not None and exc is not uploader.error:
                # An upload failed first: that is the cause of whatever stopped here.
                raise uploader.error from None
            if isinstance(exc, Aborted):
                # This layer stopped because another one failed: report that failure.
                for fut in futures:
                    if fut.done() and not fut.cancelled():
                        err = fut.exception()
                        if err is not None and not isinstance(err, Aborted):
                            raise err from None
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
            "chunking": CHUNKING,
        }
        data = build_manifest(builder.root, meta)
    for key, raw, pack_index in new_records:
        # The pack index first: a layer record without one is indexed again.
        if pack_index is not None:
            store.put_pack_index(key, pack_index)
        store.put_layer_record(key, raw)
    result.digest = store.put_manifest(data)
    result.manifest_bytes = len(data)
    if tag:
        store.set_tag(tag, result.digest)
    result.seconds = time.monotonic() - start
    progress.done(
        f"indexed {len(image.layers)} layers, {human_bytes(result.uncompressed_bytes)} "
        f"in {result.seconds:.1f}s; {result.upload.new_blobs} new blobs "
        f"({human_bytes(result.upload.uploaded_bytes)} stored), "
        f"{result.packs.files} small files in {result.packs.packs} directory packs"
    )
    return result


def _index_tree_locked(tree: TreeSource, image: Image, store: Store, tag: str | None,
                       progress: Progress, start: float, stop: threading.Event) -> IndexResult:
    """A directory as an image of one pseudo-layer, named by the sha256 of its record
    (the tree's operations): the same tree gives the same name, so its record and
    directory packs are written once, and a mount finds its pack index like a layer's."""
    result = IndexResult(digest="", image=image)
    uploader = _uploader(store, stop)
    packer = DirPacker(store)
    bar = progress.bar(f"tree {tree.path}")
    bar.set_phase("indexing")
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        bar.advance(n)
        bar.set_note(f"({human_bytes(done)} read)")

    reader = TreeReader(tree, uploader, packer=packer, on_bytes=on_bytes, abort=stop)
    with store.deferred_syncs():
        try:
            ops = reader.read()
            resolve_chunks(ops)
            uploader.close()
        except BaseException as exc:
            stop.set()
            packer.close()
            uploader.close(cancel=True)
            if uploader.error is not None and exc is not uploader.error:
                raise uploader.error from None
            raise
        record = encode_record(ops, CHUNKING)
        key = "sha256:" + hashlib.sha256(record).hexdigest()
        known = store.backend.exists(layer_record_key(key)) and _pack_index_usable(store, key)
        pack_index = None
        if known:
            packer.close()  # the same tree was indexed before: its packs are there
        else:
            bar.set_note("(writing directory packs)")
            pack_index = packer.finish(f"{tree.ref} ({key[:19]})")
            result.packs = packer.stats
        size = files_size(ops)
        image.layers = [Layer(digest=key, media_type=TREE_MEDIA_TYPE, size=-1,
                              open=_no_layer_blob)]
        builder = TreeBuilder()
        builder.apply_layer(ops, tree.ref)
        meta = {
            "casfs": "manifest",
            # No path: the same tree gives the same manifest wherever it lies.
            "source": "tree",
            "config": {},
            "layers": [{"digest": key, "media_type": TREE_MEDIA_TYPE, "size": size}],
            "chunking": CHUNKING,
        }
        data = build_manifest(builder.root, meta)
    result.upload = uploader.stats
    result.uncompressed_bytes = size
    if known:
        result.layers_reused = 1
    else:
        if pack_index is not None:
            store.put_pack_index(key, pack_index)
        store.put_layer_record(key, record)
    result.digest = store.put_manifest(data)
    result.manifest_bytes = len(data)
    if tag:
        store.set_tag(tag, result.digest)
    result.seconds = time.monotonic() - start
    bar.finish(f"{reader.files} files, {human_bytes(size)}, {len(ops)} entries")
    progress.done(
        f"indexed {tree.ref}: {human_bytes(size)} in {result.seconds:.1f}s; "
        f"{result.upload.new_blobs} new blobs ({human_bytes(result.upload.uploaded_bytes)} "
        f"stored), {result.packs.files} small files in {result.packs.packs} directory packs"
    )
    return result


def _blame_digest(raw: Any, layer: Layer) -> None:
    """A registry layer failed to decompress or parse: if the rest of it is not too big,
    read it through so that bytes damaged on the way are reported as a digest mismatch
    (the root cause) rather than as a corrupt or hostile layer."""
    left = layer.size - getattr(raw, "count", 0) if layer.size >= 0 else -1
    if not 0 <= left <= BLAME_READ_LIMIT:
        return
    try:
        while raw.read(READ_SIZE):
            pass
    except LayerDigestMismatch:
        raise
    except Exception:  # noqa: BLE001 - the original error is the one to report
        return


def _index_layer(
    layer: Layer, key: str, uploader: BlobUploader, label: str, bar: ProgressBar,
    abort: threading.Event, packer: DirPacker,
) -> tuple[list[dict[str, Any]], int, int]:
    """(ops, uncompressed file bytes, stored bytes read) of one layer."""
    done = 0

    def on_bytes(n: int) -> None:
        nonlocal done
        done += n
        bar.set_note(f"({human_bytes(done)} unpacked)")

    what = f"{label} ({key[:19]})"
    with _Tracked(layer.open(), bar, abort) as tracked:
        # A registry layer checks its own digest as it streams; a local one was hashed
        # before, and is hashed again as it is read (it could have changed since).
        hashed = None if layer.verifies_digest else HashingReader(tracked)
        raw: Any = tracked if hashed is None else hashed
        try:
            max_total, max_ratio = layer_limits()
            stream = open_decompressed(raw, layer.compression, what)
            guarded = io.BufferedReader(
                ExpansionGuard(stream, lambda: tracked.count, what, max_total, max_ratio), READ_SIZE
            )
            diff = HashingReader(guarded)
            # Reading, digests, decompression and bounds run on a thread of their own,
            # beside the tar parsing and chunking here (two cores).
            ahead = ReadAhead(diff, name="layer-read")
            try:
                tar = io.BufferedReader(ahead, READ_SIZE)
                ops = read_layer(tar, uploader, what, on_bytes, packer)
                while tar.read(READ_SIZE):
                    pass
            finally:
                ahead.close()  # raw is this thread's again
        except (CorruptLayer, HostileLayer):
            if layer.verifies_digest:
                _blame_digest(raw, layer)
            raise
        # Read the stored stream to its end: that is where a registry blob's digest is
        # checked (a decompressor may stop before trailing bytes).
        while raw.read(READ_SIZE):
            pass
        if hashed is not None and key.startswith("sha256:") \
                and hashed.hash.hexdigest() != key.partition(":")[2]:
            raise LayerDigestMismatch(f"{what}: the layer changed while it was read "
                                      f"(it no longer matches {key})")
        # The config's diff_id names the uncompressed tar: it catches damage a compressed
        # stream does not check itself (a zstd frame written without a checksum).
        algo, _, want = layer.diff_id.partition(":")
        if algo == "sha256" and diff.hash.hexdigest() != want:
            raise LayerDigestMismatch(
                f"{what}: its uncompressed content does not match its diff_id {layer.diff_id}"
            )
        downloaded = tracked.count
    resolve_chunks(ops)
    return ops, done, downloaded
