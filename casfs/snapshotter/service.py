"""containerd's Snapshots service (gRPC, containerd 1.6+ proxy plugin) served by casfs.

The remote-snapshot handshake (as stargz and nydus do it): containerd unpacks an image
layer by layer; for each it calls Prepare with the label `containerd.io/snapshot.ref`
(the chain id it wants committed) and, when the pull passes them (CRI does, with
`disable_snapshot_annotations = false`; so does any client using containerd's
AppendInfoHandlerWrapper), `containerd.io/snapshot/cri.manifest-digest` and
`cri.layer-digest`. When the image's manifest digest names an image casfs indexed (its
manifest's meta `image`) and the layer is one of its layers, the snapshotter commits the
chain id itself and answers ALREADY_EXISTS: containerd then finds the snapshot and
neither downloads nor unpacks the layer. The top layer's snapshot is the casfs mount of
the whole (flattened) image; the ones below it are placeholders, since casfs stores the
image flattened. A container's snapshot on top is an ordinary overlayfs upper over the
casfs mount.

An image casfs has not indexed (or whose layers the pull does not label) is unpacked the
ordinary way: the snapshotter is then a plain overlayfs snapshotter (containerd 1.6's CRI
takes one snapshotter for every image, the pause image included, so refusing would leave
the node unable to run anything casfs has not indexed). An unindexed image that shares
its lower layers with an indexed one cannot be built on that image's placeholders: such a
request is refused (FAILED_PRECONDITION) with a message saying so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from casfs.snapshotter.api.containerd.api.services.snapshots.v1 import (
    snapshots_pb2 as pb,
)
from casfs.snapshotter.api.containerd.api.services.snapshots.v1 import (
    snapshots_pb2_grpc as pb_grpc,
)
from casfs.snapshotter.api.containerd.api.types import mount_pb2
from casfs.snapshotter.store import (
    ACTIVE,
    COMMITTED,
    VIEW,
    Record,
    Records,
    SnapshotError,
)

log = logging.getLogger("casfs.snapshotter")

SNAPSHOT_REF = "containerd.io/snapshot.ref"
TARGET_REF = "containerd.io/snapshot/cri.image-ref"
TARGET_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"
TARGET_LAYER = "containerd.io/snapshot/cri.layer-digest"
REMOTE_LABEL = "containerd.io/snapshot/casfs.manifest"
NEGATIVE_TTL = 30.0


class Images:
    """Which casfs manifest an OCI image manifest digest names, and its shared mounts."""

    def __init__(self, root: Path, store_url: str, cache_dir: str, mode: str,
                 cache_size: str) -> None:
        self.root = root
        self.store_url = store_url
        self.cache_dir = cache_dir
        self.mode = mode
        self.cache_size = cache_size
        self.lock = threading.RLock()
        self.known_path = root / "images.json"
        # OCI manifest digest -> {"manifest": casfs hex, "layers": [...]}, and the casfs
        # manifests already read (a later scan reads only the manifests of new tags)
        self.known: dict[str, dict[str, Any]] = {}
        self.scanned: set[str] = set()
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            saved = json.loads(self.known_path.read_text())
            self.known = dict(saved.get("images", {}))
            self.scanned = set(saved.get("scanned", []))
        self.misses: dict[str, float] = {}
        (root / "images").mkdir(exist_ok=True, mode=0o700)

    def _store(self):  # noqa: ANN202
        from casfs.store import open_store

        return open_store(self.store_url)

    def lookup(self, oci_digest: str) -> dict[str, Any] | None:
        """{"manifest": hex, "layers": [layer digests]} of the casfs image indexed from
        the image whose OCI manifest is `oci_digest`, or None. Found by a tag named by
        that digest, else among the manifests the store's tags name (each manifest's meta
        names the image it was indexed from); remembered."""
        with self.lock:
            hit = self.known.get(oci_digest)
            if hit is not None:
                return hit
            if time.monotonic() - self.misses.get(oci_digest, -NEGATIVE_TTL) < NEGATIVE_TTL:
                return None
            from casfs.manifest import Manifest

            store = self._store()
            direct = self._by_digest_tag(store, oci_digest)
            if direct is not None:
                return direct
            for tag in store.list_tags():
                try:
                    hexd = store.get_tag(tag)
                except Exception:  # noqa: BLE001 - a tag removed meanwhile
                    continue
                if hexd in self.scanned:
                    continue
                meta = Manifest(store.get_manifest(hexd), hexd).meta
                entry = {"manifest": hexd,
                         "layers": [str(layer.get("digest")) for layer in meta.get("layers", [])]}
                for key in ("image", "image_manifest_digest"):
                    if isinstance(meta.get(key), str) and meta[key]:
                        self.known[meta[key]] = entry
                self.scanned.add(hexd)
            self._save()
            found = self.known.get(oci_digest)
            if found is None:
                self.misses[oci_digest] = time.monotonic()
            return found

    def _by_digest_tag(self, store: Any, oci_digest: str) -> dict[str, Any] | None:
        """A tag named by the OCI manifest digest itself (`casfs index ... --tag
        sha256:<hex>`): found without reading every tag's manifest."""
        from casfs.manifest import Manifest

        try:
            hexd = store.get_tag(oci_digest)
        except Exception:  # noqa: BLE001 - no such tag (or not a valid tag name)
            return None
        meta = Manifest(store.get_manifest(hexd), hexd).meta
        if oci_digest not in (meta.get("image"), meta.get("image_manifest_digest")):
            return None  # a tag that names another image: not to be trusted for this one
        entry = {"manifest": hexd,
                 "layers": [str(layer.get("digest")) for layer in meta.get("layers", [])]}
        self.known[oci_digest] = entry
        self.scanned.add(hexd)
        self._save()
        return entry

    def _save(self) -> None:
        tmp = self.known_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "images": self.known,
                                   "scanned": sorted(self.scanned)}))
        os.replace(tmp, self.known_path)

    def mountpoint(self, hexd: str) -> Path:
        return self.root / "images" / hexd / "rootfs"

    def ensure_mounted(self, hexd: str) -> Path:
        """The image's casfs mount, mounted now if it is not (after a reboot, or a first
        use). Under the snapshotter's root (0700): --suid --dev are safe there."""
        from casfs.mounts import force_unmount, is_mounted, is_stale

        with self.lock:
            mnt = self.mountpoint(hexd)
            if is_mounted(str(mnt)):
                if not is_stale(str(mnt)):
                    return mnt
                force_unmount(str(mnt))
            mnt.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "casfs.cli", "mount", f"blake3:{hexd}", str(mnt),
                    "--store", self.store_url, "--cache-dir", self.cache_dir, "--cache-size",
                    self.cache_size, "--mode", self.mode, "--suid", "--dev"]
            proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                raise SnapshotError("UNAVAILABLE", f"casfs cannot mount image blake3:{hexd}: "
                                    f"{lines[-1] if lines else proc.returncode}")
            log.info("mounted blake3:%s at %s", hexd, mnt)
            return mnt

    def release(self, hexd: str) -> None:
        from casfs.mounts import is_mounted

        with self.lock:
            mnt = self.mountpoint(hexd)
            if is_mounted(str(mnt)):
                proc = subprocess.run([sys.executable, "-m", "casfs.cli", "umount", str(mnt)],
                                      capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if proc.returncode != 0 and is_mounted(str(mnt)):
                    log.warning("could not unmount %s: %s", mnt, proc.stderr.strip())
                    return
            shutil.rmtree(mnt.parent, ignore_errors=True)
            log.info("released blake3:%s", hexd)


def _ts(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


def _info(r: Record) -> pb.Info:
    return pb.Info(name=r.name, parent=r.parent, kind=pb.Kind.Name(r.kind), created_at=_ts(r.created),
                   updated_at=_ts(r.updated), labels=r.labels)


def _du(path: Path) -> tuple[int, int]:
    size = inodes = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(dirpath, name))
                inodes += 1
                size += st.st_blocks * 512
    return size, inodes


class Snapshotter(pb_grpc.SnapshotsServicer):
    def __init__(self, root: Path, images: Images) -> None:
        self.root = root
        self.records = Records(root)
        self.images = images

    # -- paths and mounts ------------------------------------------------------------

    def _dir(self, r: Record) -> Path:
        return self.root / "snapshots" / r.id

    def _lowers(self, parent: str) -> list[str]:
        lowers: list[str] = []
        for p in self.records.chain(parent) if parent else []:
            if p.remote:
                if not p.top:
                    raise SnapshotError(
                        "FAILED_PRECONDITION",
                        f"snapshot {p.name} is a placeholder for layer {p.layer + 1} of the "
                        f"casfs image blake3:{p.manifest} (casfs stores images flattened): an "
                        "image casfs has not indexed cannot be built on it; index that image "
                        "with casfs too, or remove the casfs image's snapshots first")
                lowers.append(str(self.images.ensure_mounted(p.manifest)))
                break
            lowers.append(str(self._dir(p) / "fs"))
        return lowers

    def _mounts(self, r: Record) -> list[mount_pb2.Mount]:
        if r.remote:
            src = str(self.images.ensure_mounted(r.manifest)) if r.top else \
                str(self._dir(r) / "fs")
            return [mount_pb2.Mount(type="bind", source=src, options=["ro", "rbind"])]
        d = self._dir(r)
        lowers = self._lowers(r.parent)
        if r.kind == ACTIVE:
            if not lowers:
                return [mount_pb2.Mount(type="bind", source=str(d / "fs"),
                                        options=["rw", "rbind"])]
            return [mount_pb2.Mount(type="overlay", source="overlay", options=[
                "index=off", f"workdir={d / 'work'}", f"upperdir={d / 'fs'}",
                f"lowerdir={':'.join(lowers)}"])]
        if not lowers:
            return [mount_pb2.Mount(type="bind", source=str(d / "fs"), options=["ro", "rbind"])]
        if len(lowers) == 1:
            return [mount_pb2.Mount(type="bind", source=lowers[0], options=["ro", "rbind"])]
        return [mount_pb2.Mount(type="overlay", source="overlay",
                                options=["index=off", f"lowerdir={':'.join(lowers)}"])]

    def _create(self, key: str, parent: str, labels: dict[str, str], kind: int) -> Record:
        with self.records.lock:
            r = self.records.add(key, parent, kind, labels)
            d = self._dir(r)
            (d / "fs").mkdir(parents=True, mode=0o755)
            (d / "work").mkdir(mode=0o700)
            os.chmod(d / "fs", 0o755)
            try:
                self._lowers(parent)  # refuse a placeholder parent before containerd uses it
            except SnapshotError:
                del self.records.items[key]
                shutil.rmtree(d, ignore_errors=True)
                raise
            self.records.save()
            return r

    def _remote(self, key: str, parent: str, labels: dict[str, str]) -> bool:
        """The handshake: commit the layer's chain id as a casfs snapshot when the image
        is one casfs indexed. True when done (the caller answers ALREADY_EXISTS)."""
        target = labels.get(SNAPSHOT_REF)
        oci_manifest = labels.get(TARGET_MANIFEST)
        layer = labels.get(TARGET_LAYER)
        if not (target and oci_manifest and layer):
            return False
        try:
            entry = self.images.lookup(oci_manifest)
        except Exception as exc:  # noqa: BLE001 - store down: unpack the ordinary way
            log.warning("casfs store unavailable for %s (%s): unpacking it the ordinary way",
                        oci_manifest, exc)
            return False
        if entry is None or layer not in entry["layers"]:
            return False
        index = entry["layers"].index(layer)
        count = len(entry["layers"])
        with self.records.lock:
            if target in self.records.items:
                return True
            if parent:
                self.records.get(parent)
            if index == count - 1:
                self.images.ensure_mounted(entry["manifest"])
            now = time.time()
            r = Record(target, parent, COMMITTED, self.records.new_id(), now, now,
                       {**labels, REMOTE_LABEL: entry["manifest"]}, manifest=entry["manifest"],
                       layer=index, layers=count)
            (self._dir(r) / "fs").mkdir(parents=True, mode=0o755)
            self.records.items[target] = r
            self.records.save()
        log.info("layer %d/%d of %s (%s) served by casfs blake3:%s", index + 1, count,
                 labels.get(TARGET_REF, "?"), layer, entry["manifest"])
        return True

    # -- the service -----------------------------------------------------------------

    def _call(self, context: grpc.ServicerContext, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except SnapshotError as exc:
            context.abort(getattr(grpc.StatusCode, exc.code), str(exc))
        except Exception as exc:  # noqa: BLE001 - reported to containerd, logged here
            log.exception("snapshotter request failed")
            context.abort(grpc.StatusCode.INTERNAL, f"casfs snapshotter: {exc}")

    def Prepare(self, request: pb.PrepareSnapshotRequest,  # noqa: N802
                context: grpc.ServicerContext) -> pb.PrepareSnapshotResponse:
        def go() -> pb.PrepareSnapshotResponse:
            labels = dict(request.labels)
            if self._remote(request.key, request.parent, labels):
                raise SnapshotError("ALREADY_EXISTS",
                                    f"target snapshot {labels[SNAPSHOT_REF]}: already exists "
                                    "(served by casfs)")
            r = self._create(request.key, request.parent, labels, ACTIVE)
            return pb.PrepareSnapshotResponse(mounts=self._mounts(r))
        return self._call(context, go)

    def View(self, request: pb.ViewSnapshotRequest,  # noqa: N802
             context: grpc.ServicerContext) -> pb.ViewSnapshotResponse:
        def go() -> pb.ViewSnapshotResponse:
            r = self._create(request.key, request.parent, dict(request.labels), VIEW)
            return pb.ViewSnapshotResponse(mounts=self._mounts(r))
        return self._call(context, go)

    def Mounts(self, request: pb.MountsRequest,  # noqa: N802
               context: grpc.ServicerContext) -> pb.MountsResponse:
        def go() -> pb.MountsResponse:
            r = self.records.get(request.key)
            if r.kind == COMMITTED and not r.remote:
                raise SnapshotError("FAILED_PRECONDITION",
                                    f"snapshot {r.name} is committed: it has no mounts")
            return pb.MountsResponse(mounts=self._mounts(r))
        return self._call(context, go)

    def Commit(self, request: pb.CommitSnapshotRequest,  # noqa: N802
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        def go() -> empty_pb2.Empty:
            with self.records.lock:
                r = self.records.get(request.key)
                if r.kind != ACTIVE:
                    raise SnapshotError("FAILED_PRECONDITION",
                                        f"snapshot {r.name} is not active")
                if request.name in self.records.items:
                    raise SnapshotError("ALREADY_EXISTS",
                                        f"snapshot {request.name}: already exists")
                del self.records.items[r.name]
                r.name, r.kind, r.updated = request.name, COMMITTED, time.time()
                r.labels.update(request.labels)
                self.records.items[r.name] = r
                self.records.save()
            return empty_pb2.Empty()
        return self._call(context, go)

    def Remove(self, request: pb.RemoveSnapshotRequest,  # noqa: N802
               context: grpc.ServicerContext) -> empty_pb2.Empty:
        def go() -> empty_pb2.Empty:
            with self.records.lock:
                r = self.records.get(request.key)
                if self.records.children(r.name):
                    raise SnapshotError("FAILED_PRECONDITION",
                                        f"snapshot {r.name} has children")
                del self.records.items[r.name]
                self.records.save()
                shutil.rmtree(self._dir(r), ignore_errors=True)
                if r.top and not any(o.top and o.manifest == r.manifest
                                     for o in self.records.items.values()):
                    self.images.release(r.manifest)
            return empty_pb2.Empty()
        return self._call(context, go)

    def Stat(self, request: pb.StatSnapshotRequest,  # noqa: N802
             context: grpc.ServicerContext) -> pb.StatSnapshotResponse:
        return self._call(context, lambda: pb.StatSnapshotResponse(
            info=_info(self.records.get(request.key))))

    def Update(self, request: pb.UpdateSnapshotRequest,  # noqa: N802
               context: grpc.ServicerContext) -> pb.UpdateSnapshotResponse:
        def go() -> pb.UpdateSnapshotResponse:
            with self.records.lock:
                r = self.records.get(request.info.name)
                paths = list(request.update_mask.paths)
                new = dict(request.info.labels)
                if not paths:
                    r.labels = new
                for path in paths:
                    if path == "labels":
                        r.labels = new
                    elif path.startswith("labels."):
                        k = path[len("labels."):]
                        if k in new:
                            r.labels[k] = new[k]
                        else:
                            r.labels.pop(k, None)
                    else:
                        raise SnapshotError("INVALID_ARGUMENT", f"cannot update {path}")
                r.updated = time.time()
                self.records.save()
                return pb.UpdateSnapshotResponse(info=_info(r))
        return self._call(context, go)

    def List(self, request: pb.ListSnapshotsRequest,  # noqa: N802
             context: grpc.ServicerContext) -> Iterator[pb.ListSnapshotsResponse]:
        # Filters are left to containerd, which checks what a walk returns.
        with self.records.lock:
            infos = [_info(r) for r in self.records.items.values()]
        for i in range(0, len(infos), 100):
            yield pb.ListSnapshotsResponse(info=infos[i:i + 100])

    def Usage(self, request: pb.UsageRequest,  # noqa: N802
              context: grpc.ServicerContext) -> pb.UsageResponse:
        def go() -> pb.UsageResponse:
            r = self.records.get(request.key)
            if r.remote:
                return pb.UsageResponse(size=0, inodes=0)
            size, inodes = _du(self._dir(r) / "fs")
            return pb.UsageResponse(size=size, inodes=inodes)
        return self._call(context, go)

    def Cleanup(self, request: pb.CleanupRequest,  # noqa: N802
                context: grpc.ServicerContext) -> empty_pb2.Empty:
        def go() -> empty_pb2.Empty:
            with self.records.lock:
                used = {r.id for r in self.records.items.values()}
                for entry in (self.root / "snapshots").iterdir():
                    if entry.name not in used:
                        shutil.rmtree(entry, ignore_errors=True)
            return empty_pb2.Empty()
        return self._call(context, go)


def serve(address: str, root: Path, images: Images, ready: threading.Event | None = None,
          stop: threading.Event | None = None) -> None:
    """Serve on the Unix socket `address` until `stop` is set (or forever)."""
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_SnapshotsServicer_to_server(Snapshotter(root, images), server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(address)
    Path(address).parent.mkdir(parents=True, exist_ok=True)
    server.add_insecure_port(f"unix:{address}")
    server.start()
    os.chmod(address, 0o600)
    log.info("casfs snapshotter serving on %s (root %s, store %s)", address, root,
             images.store_url)
    if ready is not None:
        ready.set()
    try:
        while stop is None or not stop.is_set():
            time.sleep(0.2)
    finally:
        server.stop(grace=5).wait()
