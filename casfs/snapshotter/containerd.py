"""A small containerd client over its gRPC API (the stubs in api/), enough to pull an
image from a registry and run it through a snapshotter, as containerd's own client does
with `WithPullUnpack` and the snapshotter labels of `AppendInfoHandlerWrapper` (the
labels CRI passes with `disable_snapshot_annotations = false`): used by the tests and
the benchmark, since Debian 12 has no crictl or nerdctl and `ctr images pull` (1.6)
fetches every layer before it unpacks.

Pull: the manifest and config go into containerd's content store under a lease; each
layer is offered to the snapshotter first (Prepare with `containerd.io/snapshot.ref` and
the `cri.*` labels): a snapshotter that answers ALREADY_EXISTS serves that layer itself,
and it is never downloaded. The others are downloaded into the content store, applied
with containerd's diff service and committed. Run: a container with an OCI spec, its
snapshot on the image's top layer, a task whose stdout and stderr are FIFOs read here.
Registries over plain http, anonymous (a test registry), only.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2, field_mask_pb2

from casfs.snapshotter.api.containerd.api.services.containers.v1 import containers_pb2 as cpb
from casfs.snapshotter.api.containerd.api.services.containers.v1 import (
    containers_pb2_grpc as cgrpc,
)
from casfs.snapshotter.api.containerd.api.services.content.v1 import content_pb2 as ctpb
from casfs.snapshotter.api.containerd.api.services.content.v1 import (
    content_pb2_grpc as ctgrpc,
)
from casfs.snapshotter.api.containerd.api.services.diff.v1 import diff_pb2 as dpb
from casfs.snapshotter.api.containerd.api.services.diff.v1 import diff_pb2_grpc as dgrpc
from casfs.snapshotter.api.containerd.api.services.images.v1 import images_pb2 as ipb
from casfs.snapshotter.api.containerd.api.services.images.v1 import images_pb2_grpc as igrpc
from casfs.snapshotter.api.containerd.api.services.leases.v1 import leases_pb2 as lpb
from casfs.snapshotter.api.containerd.api.services.leases.v1 import leases_pb2_grpc as lgrpc
from casfs.snapshotter.api.containerd.api.services.snapshots.v1 import snapshots_pb2 as spb
from casfs.snapshotter.api.containerd.api.services.snapshots.v1 import (
    snapshots_pb2_grpc as sgrpc,
)
from casfs.snapshotter.api.containerd.api.services.tasks.v1 import tasks_pb2 as tpb
from casfs.snapshotter.api.containerd.api.services.tasks.v1 import tasks_pb2_grpc as tgrpc
from casfs.snapshotter.api.containerd.api.types import descriptor_pb2

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = ("application/vnd.oci.image.index.v1+json",
           "application/vnd.docker.distribution.manifest.list.v2+json")
SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Spec"
CHUNK = 1 << 20


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain id of each layer prefix (the OCI image spec's ChainID)."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else
                   "sha256:" + hashlib.sha256(f"{out[-1]} {d}".encode()).hexdigest())
    return out


@dataclass
class Pulled:
    name: str
    manifest_digest: str
    config: dict[str, Any]
    chain: list[str]
    remote_layers: int = 0  # layers the snapshotter served itself
    downloaded_layers: list[str] = field(default_factory=list)


class Registry:
    """Anonymous plain-http reads from a registry (a test registry on this machine)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.requests: list[str] = []

    def get(self, path: str, accept: str | None = None) -> tuple[bytes, str]:
        req = urllib.request.Request(f"http://{self.host}/v2/{path}")
        if accept:
            req.add_header("Accept", accept)
        self.requests.append(path)
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.read(), resp.headers.get("Content-Type", "")


class Containerd:
    def __init__(self, address: str, namespace: str = "default", snapshotter: str = "casfs",
                 timeout: float = 120.0) -> None:
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.namespace = namespace
        self.snapshotter = snapshotter
        self.timeout = timeout
        self.lease: str | None = None
        self.content = ctgrpc.ContentStub(self.channel)
        self.images = igrpc.ImagesStub(self.channel)
        self.snapshots = sgrpc.SnapshotsStub(self.channel)
        self.diff = dgrpc.DiffStub(self.channel)
        self.containers = cgrpc.ContainersStub(self.channel)
        self.tasks = tgrpc.TasksStub(self.channel)
        self.leases = lgrpc.LeasesStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def md(self) -> list[tuple[str, str]]:
        out = [("containerd-namespace", self.namespace)]
        if self.lease:
            out.append(("containerd-lease", self.lease))
        return out

    def call(self, method: Any, request: Any) -> Any:
        return method(request, metadata=self.md(), timeout=self.timeout)

    # -- content ---------------------------------------------------------------------

    def write_content(self, data: bytes, digest: str, labels: dict[str, str] | None = None) -> None:
        def requests() -> Iterator[ctpb.WriteContentRequest]:
            ref = f"casfs-{digest}"
            for off in range(0, max(len(data), 1), CHUNK):
                last = off + CHUNK >= len(data)
                yield ctpb.WriteContentRequest(
                    action=ctpb.COMMIT if last else ctpb.WRITE, ref=ref, total=len(data),
                    expected=digest, offset=off, data=data[off:off + CHUNK],
                    labels=(labels or {}) if last else {})
        try:
            for _ in self.content.Write(requests(), metadata=self.md(), timeout=self.timeout):
                pass
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            if labels:
                self.call(self.content.Update, ctpb.UpdateRequest(
                    info=ctpb.Info(digest=digest, labels=labels),
                    update_mask=field_mask_pb2.FieldMask(
                        paths=[f"labels.{k}" for k in labels])))

    def list_content(self) -> list[str]:
        out = []
        for resp in self.content.List(ctpb.ListContentRequest(), metadata=self.md(),
                                      timeout=self.timeout):
            out += [i.digest for i in resp.info]
        return out

    # -- pull ------------------------------------------------------------------------

    def pull(self, registry_host: str, repo: str, tag: str, labels: bool = True) -> Pulled:
        """Pull `registry_host/repo:tag` and unpack it into the snapshotter; with
        `labels`, offer each layer to the snapshotter first (the remote handshake)."""
        reg = Registry(registry_host)
        name = f"{registry_host}/{repo}:{tag}"
        lease = self.call(self.leases.Create, lpb.CreateRequest(
            id=f"casfs-pull-{secrets.token_hex(6)}",
            labels={"containerd.io/gc.expire": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))}))
        self.lease = lease.lease.id
        try:
            return self._pull(reg, name, repo, tag, labels)
        finally:
            self.lease = None
            self.call(self.leases.Delete, lpb.DeleteRequest(id=lease.lease.id))

    def _pull(self, reg: Registry, name: str, repo: str, tag: str, labels: bool) -> Pulled:
        accept = ", ".join([OCI_MANIFEST, DOCKER_MANIFEST, *INDEXES])
        raw, mtype = reg.get(f"{repo}/manifests/{tag}", accept)
        doc = json.loads(raw)
        mtype = doc.get("mediaType") or mtype.split(";")[0]
        if mtype in INDEXES:
            pick = next(m for m in doc["manifests"]
                        if m.get("platform", {}).get("os") == "linux"
                        and m.get("platform", {}).get("architecture") == "amd64")
            raw, _ = reg.get(f"{repo}/manifests/{pick['digest']}", accept)
            doc = json.loads(raw)
            mtype = pick["mediaType"]
        mdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
        cfg_desc = doc["config"]
        cfg_raw, _ = reg.get(f"{repo}/blobs/{cfg_desc['digest']}")
        config = json.loads(cfg_raw)
        diff_ids = config["rootfs"]["diff_ids"]
        chain = chain_ids(diff_ids)
        layers = doc["layers"]
        gc = {"containerd.io/gc.ref.content.config": cfg_desc["digest"]}
        gc.update({f"containerd.io/gc.ref.content.l.{i}": layer["digest"]
                   for i, layer in enumerate(layers)})
        self.write_content(raw, mdigest, gc)
        self.write_content(cfg_raw, cfg_desc["digest"],
                           {f"containerd.io/gc.ref.snapshot.{self.snapshotter}": chain[-1]})
        pulled = Pulled(name, mdigest, config, chain)
        all_layers = ",".join(layer["digest"] for layer in layers)
        for i, layer in enumerate(layers):
            parent = chain[i - 1] if i else ""
            try:
                self.call(self.snapshots.Stat, spb.StatSnapshotRequest(
                    snapshotter=self.snapshotter, key=chain[i]))
                continue  # already unpacked
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
            snap_labels = {"containerd.io/snapshot.ref": chain[i]}
            if labels:
                snap_labels.update({
                    "containerd.io/snapshot/cri.image-ref": name,
                    "containerd.io/snapshot/cri.manifest-digest": mdigest,
                    "containerd.io/snapshot/cri.layer-digest": layer["digest"],
                    "containerd.io/snapshot/cri.image-layers": all_layers,
                })
            key = f"extract-{secrets.token_hex(4)} {chain[i]}"
            try:
                prep = self.call(self.snapshots.Prepare, spb.PrepareSnapshotRequest(
                    snapshotter=self.snapshotter, key=key, parent=parent, labels=snap_labels))
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
                self.call(self.snapshots.Stat, spb.StatSnapshotRequest(
                    snapshotter=self.snapshotter, key=chain[i]))
                pulled.remote_layers += 1
                continue
            blob, _ = reg.get(f"{repo}/blobs/{layer['digest']}")
            pulled.downloaded_layers.append(layer["digest"])
            self.write_content(blob, layer["digest"])
            desc = descriptor_pb2.Descriptor(media_type=layer["mediaType"],
                                             digest=layer["digest"], size=layer["size"])
            applied = self.call(self.diff.Apply, dpb.ApplyRequest(diff=desc,
                                                                  mounts=prep.mounts))
            if applied.applied.digest != diff_ids[i]:
                raise RuntimeError(f"layer {layer['digest']} unpacked to {applied.applied.digest}, "
                                   f"not its diff id {diff_ids[i]}")
            self.call(self.snapshots.Commit, spb.CommitSnapshotRequest(
                snapshotter=self.snapshotter, name=chain[i], key=key,
                labels={"containerd.io/snapshot.ref": chain[i]}))
        image = ipb.Image(name=name, target=descriptor_pb2.Descriptor(
            media_type=mtype, digest=mdigest, size=len(raw)))
        try:
            self.call(self.images.Create, ipb.CreateImageRequest(image=image))
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            self.call(self.images.Update, ipb.UpdateImageRequest(image=image))
        return pulled

    # -- run -------------------------------------------------------------------------

    def create_container(self, cid: str, pulled: Pulled, args: list[str] | None = None,
                         env: list[str] | None = None) -> None:
        from casfs.run.spec import DEFAULT_CAPS, DEFAULT_PATH, MASKED_PATHS, READONLY_PATHS

        cfg = pulled.config.get("config") or {}
        argv = args or [*(cfg.get("Entrypoint") or []), *(cfg.get("Cmd") or [])]
        spec = {
            "ociVersion": "1.0.2",
            "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": argv,
                        "env": [f"PATH={DEFAULT_PATH}", *(cfg.get("Env") or []), *(env or [])],
                        "cwd": cfg.get("WorkingDir") or "/",
                        "capabilities": {k: DEFAULT_CAPS for k in
                                         ("bounding", "effective", "permitted")},
                        "noNewPrivileges": True},
            "root": {"path": "rootfs"},
            "hostname": cid[:12],
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
            ],
            "linux": {"namespaces": [{"type": t} for t in
                                     ("pid", "ipc", "uts", "mount", "network")],
                      "maskedPaths": MASKED_PATHS, "readonlyPaths": READONLY_PATHS,
                      "resources": {"devices": [{"allow": False, "access": "rwm"}]}},
        }
        self.call(self.containers.Create, cpb.CreateContainerRequest(container=cpb.Container(
            id=cid, image=pulled.name,
            runtime=cpb.Container.Runtime(name="io.containerd.runc.v2"),
            spec=any_pb2.Any(type_url=SPEC_TYPE, value=json.dumps(spec).encode()),
            snapshotter=self.snapshotter, snapshot_key=cid)))
        self.call(self.snapshots.Prepare, spb.PrepareSnapshotRequest(
            snapshotter=self.snapshotter, key=cid, parent=pulled.chain[-1]))

    def start_task(self, cid: str) -> tuple[int, str, threading.Thread, list[bytes]]:
        """Start the container's task; (pid, fifo dir, reader thread, output chunks)."""
        mounts = self.call(self.snapshots.Mounts, spb.MountsRequest(
            snapshotter=self.snapshotter, key=cid)).mounts
        fifo_dir = tempfile.mkdtemp(prefix="casfs-ctr-")
        out = os.path.join(fifo_dir, "out")
        os.mkfifo(out)
        chunks: list[bytes] = []

        def reader() -> None:
            with open(out, "rb") as f:
                while data := f.read1(65536):
                    chunks.append(data)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        created = self.call(self.tasks.Create, tpb.CreateTaskRequest(
            container_id=cid, rootfs=mounts, stdout=out, stderr=out))
        self.call(self.tasks.Start, tpb.StartRequest(container_id=cid))
        return created.pid, fifo_dir, thread, chunks

    def run(self, cid: str, pulled: Pulled, args: list[str] | None = None,
            env: list[str] | None = None) -> tuple[int, str]:
        """Create, start and wait for a container; (exit status, output). Removes it."""
        self.create_container(cid, pulled, args, env)
        return self.run_existing(cid)

    def run_existing(self, cid: str) -> tuple[int, str]:
        import shutil

        _, fifo_dir, thread, chunks = self.start_task(cid)
        try:
            waited = self.call(self.tasks.Wait, tpb.WaitRequest(container_id=cid))
            thread.join(10)
            return waited.exit_status, b"".join(chunks).decode(errors="replace")
        finally:
            self.remove_container(cid)
            shutil.rmtree(fifo_dir, ignore_errors=True)

    def remove_container(self, cid: str) -> None:
        for method, req in (
                (self.tasks.Delete, tpb.DeleteTaskRequest(container_id=cid)),
                (self.containers.Delete, cpb.DeleteContainerRequest(id=cid)),
                (self.snapshots.Remove, spb.RemoveSnapshotRequest(snapshotter=self.snapshotter,
                                                                  key=cid))):
            try:
                self.call(method, req)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

    def list_snapshots(self) -> list[spb.Info]:
        out = []
        for resp in self.snapshots.List(spb.ListSnapshotsRequest(snapshotter=self.snapshotter),
                                        metadata=self.md(), timeout=self.timeout):
            out += list(resp.info)
        return out
