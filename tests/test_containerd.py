"""The casfs snapshotter under a real containerd 1.6 (Debian), with the Debian
docker-registry: each started by a fixture on its own socket, port and state
directory, stopped by PID.

containerd is driven over its gRPC API by casfs.snapshotter.containerd, which pulls as
containerd's client pull with unpack does when it passes the snapshot labels (CRI's
`disable_snapshot_annotations = false`): Debian 12 has no crictl or nerdctl, and the
CRI API's protos are not in any Debian package. The snapshotter runs as
`casfs snapshotter`. Nothing here skips when CI=true.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casfs.testing import ocibuild as ob
from tests import test_run as tr
from tests.mounthelp import cli, in_ci, mounts_under, require_mode

CONTAINERD = "/usr/bin/containerd"


def _need(what: str, ok: bool, how: str) -> None:
    if ok:
        return
    if in_ci():
        pytest.fail(f"{what} missing in CI: {how}")
    pytest.skip(f"{what} missing: {how}")


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], log: Path, what: str,
                 timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if path.exists():
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(path))
                return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on {path}:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


class Node:
    """A snapshotter and a containerd, each its own process with its own state."""

    def __init__(self, work: Path, store: str, mode: str) -> None:
        self.work = work
        self.store = store
        self.mode = mode
        self.sock_dir = Path(tempfile.mkdtemp(prefix="casfs-ctd-"))
        self.snap_sock = self.sock_dir / "snap.sock"
        self.ctd_sock = self.sock_dir / "ctd.sock"
        self.snap_root = work / "snapshotter"
        self.cache = work / "cache"
        self.snap: subprocess.Popen[bytes] | None = None
        self.ctd: subprocess.Popen[bytes] | None = None
        self.snap_log = work / "snapshotter.log"
        self.ctd_log = work / "containerd.log"

    def start_snapshotter(self) -> None:
        log = open(self.snap_log, "ab")
        self.snap = subprocess.Popen(
            [sys.executable, "-m", "casfs.cli", "snapshotter", "--address", str(self.snap_sock),
             "--root", str(self.snap_root), "--store", self.store, "--cache-dir",
             str(self.cache), "--mode", self.mode],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        log.close()
        _wait_socket(self.snap_sock, self.snap, self.snap_log, "casfs snapshotter")

    def start_containerd(self) -> None:
        config = self.work / "containerd.toml"
        config.write_text(f"""version = 2
root = "{self.work / 'ctd-root'}"
state = "{self.sock_dir / 'state'}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.ctd_sock}"
[ttrpc]
  address = "{self.ctd_sock}.ttrpc"
[debug]
  address = "{self.sock_dir / 'debug.sock'}"
[proxy_plugins]
  [proxy_plugins.casfs]
    type = "snapshot"
    address = "{self.snap_sock}"
""")
        log = open(self.ctd_log, "ab")
        self.ctd = subprocess.Popen([CONTAINERD, "--config", str(config)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        log.close()
        _wait_socket(self.ctd_sock, self.ctd, self.ctd_log, "containerd")

    def client(self):
        from casfs.snapshotter.containerd import Containerd

        return Containerd(str(self.ctd_sock))

    def stop(self) -> None:
        _stop(self.ctd)
        _stop(self.snap)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                         for p in (self.snap_log, self.ctd_log) if p.exists())


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A registry holding `app:1` (indexed into the store from the registry), `plain:1`
    (never indexed, sharing no layer with app) and `sibling:1` (never indexed, sharing
    app's first layer)."""
    from casfs.testing.registry import RegistryServer, registry_available, skopeo_push

    _need("docker-registry/skopeo", registry_available() is None, str(registry_available()))
    _need("containerd", os.access(CONTAINERD, os.X_OK), "apt-get install containerd")
    _need("grpcio", _has_grpc(), "pip install 'casfs[containers]'")
    work = tmp_path_factory.mktemp("ctd")
    base = tr._base_members() + tr._library_members()
    python = ob.python_prefix_layer()
    app_layer = [ob.directory("srv"), ob.file("srv/hello.py", "print('hello from casfs')\n")]
    config = {"Env": [f"PATH={tr.PY.parent}:/usr/bin:/bin", "APP_GREETING=hello from the image"],
              "Cmd": ["python3", "/app/main.py"], "WorkingDir": "/app"}
    images = {
        "app": [base, python, app_layer],
        "plain": [base + [ob.file("etc/plain-marker", "plain")], python],
        "sibling": [base, [ob.file("srv/other.txt", "other")]],
    }
    digests = {}
    with RegistryServer(work / "registry") as reg:
        for name, layers in images.items():
            built = ob.write_oci_layout(work / f"oci-{name}", layers, config=config, tag="1")
            digests[name] = built.digest
            skopeo_push(work / f"oci-{name}", "1", f"{reg.host}/{name}:1")
        store = f"file://{work / 'store'}"
        proc = cli("index", f"docker://{reg.host}/app:1", "--store", store, "--tag", "app",
                   "--tls-verify=false", timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        yield {"host": reg.host, "store": store, "ref": proc.stdout.strip().splitlines()[-1],
               "app_digest": digests["app"]}


def _has_grpc() -> bool:
    try:
        import grpc  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["kernel", "fuse"])
def node(request: pytest.FixtureRequest, registry: dict[str, str],
         tmp_path: Path) -> Iterator[Node]:
    require_mode(request.param)
    n = Node(tmp_path, registry["store"], request.param)
    try:
        n.start_snapshotter()
        n.start_containerd()
        yield n
    except BaseException:
        print(n.logs())
        raise
    finally:
        n.stop()
        # the image mounts outlive the snapshotter by design: take them down here
        for m in sorted(mounts_under(tmp_path), key=len, reverse=True):
            if m.endswith("/rootfs") and "/images/" in m:
                cli("umount", m)
        deadline = time.monotonic() + 60  # the node view exits after its last mount
        while mounts_under(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.2)
        leftovers = mounts_under(tmp_path)
        for m in sorted(leftovers, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        shutil.rmtree(n.sock_dir, ignore_errors=True)
        assert leftovers == [], f"mounts left behind: {leftovers}"


def test_indexed_image_runs_without_its_layers_downloaded(node: Node,
                                                          registry: dict[str, str]) -> None:
    ctd = node.client()
    pulled = ctd.pull(registry["host"], "app", "1")
    assert pulled.remote_layers == 3 and pulled.downloaded_layers == []
    # containerd's content store holds the manifest and the config, no layer
    layers = {layer["digest"] for layer in json.loads(
        (Path(registry["store"].removeprefix("file://")).parent / "oci-app" / "blobs" /
         "sha256" / pulled.manifest_digest.split(":")[1]).read_text())["layers"]}
    content = set(ctd.list_content())
    assert pulled.manifest_digest in content
    assert not layers & content, "containerd downloaded a layer of an indexed image"
    code, out = ctd.run("c1", pulled, env=["EXIT_CODE=5"])
    assert code == 5, node.logs()
    r = json.loads(out.strip().splitlines()[-1])
    assert r["env"]["APP_GREETING"] == "hello from the image" and r["cwd"] == "/app"
    code, out = ctd.run("c2", pulled, args=["python3", "/srv/hello.py"])
    assert (code, out.strip()) == (0, "hello from casfs")
    # one casfs mount for the image, under the snapshotter's root-only directory
    image_mounts = [m for m in mounts_under(node.snap_root) if "/images/" in m]
    assert len(image_mounts) == 1
    assert oct(os.stat(node.snap_root).st_mode & 0o777) == "0o700"


def test_container_writes_stay_in_its_snapshot(node: Node, registry: dict[str, str]) -> None:
    ctd = node.client()
    pulled = ctd.pull(registry["host"], "app", "1")
    marker = f"ctd-marker-{time.time_ns()}"
    code, out = ctd.run("w1", pulled, args=["python3", "/app/main.py", "write",
                                            "/app/main.py", marker])
    assert code == 0, out
    code, out = ctd.run("w2", pulled, args=["python3", "-c",
                                            "print(open('/app/main.py').read()[:30])"])
    assert code == 0 and marker not in out
    for root in (registry["store"].removeprefix("file://"), str(node.cache)):
        hits = subprocess.run(["grep", "-rl", marker, root], capture_output=True, text=True)
        assert hits.stdout == ""


def test_unindexed_image_is_unpacked_the_ordinary_way(node: Node,
                                                      registry: dict[str, str]) -> None:
    ctd = node.client()
    pulled = ctd.pull(registry["host"], "plain", "1")
    assert pulled.remote_layers == 0 and len(pulled.downloaded_layers) == 2
    code, out = ctd.run("p1", pulled, args=["python3", "-c",
                                            "print(open('/etc/plain-marker').read())"])
    assert (code, out.strip()) == (0, "plain"), node.logs()


def test_unindexed_image_on_an_indexed_images_layers_is_refused_clearly(
        node: Node, registry: dict[str, str]) -> None:
    import grpc

    ctd = node.client()
    ctd.pull(registry["host"], "app", "1")
    with pytest.raises(grpc.RpcError) as err:
        ctd.pull(registry["host"], "sibling", "1")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "casfs" in err.value.details() and "index that image" in err.value.details()


def test_snapshots_survive_restarts(node: Node, registry: dict[str, str]) -> None:
    """Committed (the image's) and active (a created container's) snapshots survive a
    restart of the snapshotter and of containerd; the container then runs."""
    ctd = node.client()
    pulled = ctd.pull(registry["host"], "app", "1")
    ctd.create_container("keep", pulled, args=["python3", "/srv/hello.py"])
    before = {i.name for i in ctd.list_snapshots()}
    ctd.close()
    node.stop()
    node.start_snapshotter()
    node.start_containerd()
    ctd = node.client()
    assert {i.name for i in ctd.list_snapshots()} == before
    code, out = ctd.run_existing("keep")
    assert (code, out.strip()) == (0, "hello from casfs"), node.logs()
    again = ctd.pull(registry["host"], "app", "1")  # nothing to do: all there
    assert again.remote_layers == 0 and again.downloaded_layers == []
    code, out = ctd.run("after", again, args=["python3", "/srv/hello.py"])
    assert (code, out.strip()) == (0, "hello from casfs")


def test_lookup_by_a_tag_named_by_the_oci_manifest_digest(registry: dict[str, str],
                                                          tmp_path: Path) -> None:
    """A tag named `sha256:<OCI manifest digest>` finds the casfs manifest without
    reading every tag's manifest; such a tag naming another image is not trusted."""
    from casfs.snapshotter.service import Images
    from casfs.store import open_store

    store = open_store(registry["store"])
    hexd = store.get_tag("app")
    listed: list[int] = []

    class Spy:
        def __getattr__(self, name: str):
            if name == "list_tags":
                listed.append(1)
            return getattr(store, name)

    store.set_tag(registry["app_digest"], hexd)
    try:
        images = Images(tmp_path, registry["store"], str(tmp_path / "cache"), "auto", "1G")
        images._store = lambda: Spy()  # type: ignore[method-assign]
        entry = images.lookup(registry["app_digest"])
        assert entry is not None and entry["manifest"] == hexd and listed == []
        liar = "sha256:" + "0" * 64
        store.set_tag(liar, hexd)
        (tmp_path / "b").mkdir()
        assert Images(tmp_path / "b", registry["store"], str(tmp_path / "cache"), "auto",
                      "1G").lookup(liar) is None
        store.delete_tag(liar)
    finally:
        store.delete_tag(registry["app_digest"])
