"""`casfs index docker://…` against a real registry: Debian's docker-registry (the reference
implementation), started on a free port with a throwaway config by a session fixture and
stopped by PID, images pushed into it with skopeo from OCI layouts built by
casfs.testing.ocibuild. Faults (corrupt bytes, dropped connections, 5xx/429) come from a
proxy in front of the real registry (casfs.testing.registry.FaultProxy); the bearer-token
flow uses the registry's own `auth: token` mode with a small token service of the test's.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casfs.errors import (
    BadImageRef,
    ImageNotFound,
    LayerDigestMismatch,
    RegistryAuthError,
    RegistryError,
)
from casfs.manifest import Manifest
from casfs.progress import Progress
from casfs.store import Store
from casfs.testing import ocibuild as ob
from casfs.testing.registry import (
    FaultProxy,
    ProxyFault,
    RegistryServer,
    TokenServer,
    push_layout_raw,
    registry_available,
    skopeo_push,
)
from indexer.imageref import parse_image_ref
from indexer.index import index_image
from indexer.registry import (
    RegistryClient,
    RegistryOptions,
    find_credentials,
    parse_www_authenticate,
)
from indexer.source import host_platform_name
from tests.treecheck import (
    file_content,
    file_store,
    index,
    manifest_snapshot,
    run_cli,
    store_keys,
)

VISIBLE = ("manifests/", "tags/", "layers/")
FAST = RegistryOptions(tls_verify=False, backoff=0.05, max_backoff=0.2)


def _random(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


# --- images ------------------------------------------------------------------------------

BASE = [
    ob.directory("etc"), ob.file("etc/os-release", "ID=casfs\n"),
    ob.directory("usr"), ob.directory("usr/bin"), ob.file("usr/bin/tool", b"\x7fELF" + b"t" * 9000, mode=0o755),
    ob.symlink("bin", "usr/bin"), ob.hardlink("usr/bin/tool2", "usr/bin/tool"),
    ob.file("data/big.bin", _random(600_000, 1)),  # incompressible: several cut points
]
UPPER = [
    ob.whiteout("etc/os-release"), ob.file("etc/hostname", "casfs\n"),
    ob.file("app/main.py", "print('hi')\n" * 500, xattrs={"user.note": b"x"}),
    ob.file("app/blob.bin", _random(400_000, 2)),
]
TOP = [ob.opaque_whiteout("app"), ob.file("app/new.py", "print('new')\n")]


@pytest.fixture(scope="session")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    # gzip, zstd and uncompressed layers in one image.
    mixed = [ob.Layer.from_members(BASE, "gzip"), ob.Layer.from_members(UPPER, "zstd"),
             ob.Layer.from_members(TOP, "none")]
    ob.write_oci_layout(root / "mixed", mixed, config={"Env": ["A=1"], "Cmd": ["/bin/sh"]}, tag="v1")
    out["mixed"] = root / "mixed"
    ob.write_oci_layout(root / "gz", [BASE, UPPER], tag="v1", compression="gzip")
    out["gz"] = root / "gz"
    ob.write_oci_layout(root / "zst", [BASE, UPPER], tag="v1", compression="zstd")
    out["zst"] = root / "zst"
    # Docker schema2 manifest list of two platforms.
    ob.write_oci_layout(root / "dmulti", tag="v1", media_types="docker", platforms=[
        ("linux", "amd64", [[ob.file("arch", "amd64\n")] + BASE]),
        ("linux", "arm64", [[ob.file("arch", "arm64\n")] + BASE]),
    ])
    out["dmulti"] = root / "dmulti"
    # OCI index of two platforms.
    ob.write_oci_layout(root / "multi", tag="v1", platforms=[
        ("linux", "amd64", [[ob.file("arch", "amd64\n")]]),
        ("linux", "arm64", [[ob.file("arch", "arm64\n")], [ob.file("extra", "arm\n")]]),
    ])
    out["multi"] = root / "multi"
    # Three layers of 1 MB incompressible data each (parallel download).
    ob.write_oci_layout(root / "wide", [[ob.file(f"l{i}.bin", _random(1 << 20, 10 + i))]
                                        for i in range(3)], tag="v1")
    out["wide"] = root / "wide"
    return out


def _need_registry() -> None:
    why = registry_available()
    if why:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(why + "; required in CI")
        pytest.skip(why)


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory, layouts: dict[str, Path]) -> Iterator[RegistryServer]:
    """An open registry (plain http) holding every test image under t/<name>:v1."""
    _need_registry()
    with RegistryServer(tmp_path_factory.mktemp("registry")) as reg:
        for name, path in layouts.items():
            if name == "dmulti":  # skopeo's oci: transport does not read Docker media types
                push_layout_raw(path, "v1", reg.host, f"t/{name}")
            else:
                skopeo_push(path, "v1", f"{reg.host}/t/{name}:v1", all_platforms=name == "multi")
        yield reg


@pytest.fixture(scope="session")
def layout_digests(tmp_path_factory: pytest.TempPathFactory, layouts: dict[str, Path]) -> dict[str, str]:
    """Manifest digest of each image indexed from its OCI layout (host platform)."""
    store = file_store(tmp_path_factory.mktemp("layout-store"))
    return {name: index_image(f"oci:{path}:v1", store).digest for name, path in layouts.items()}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return file_store(tmp_path / "store")


@pytest.fixture
def proxy(registry: RegistryServer) -> Iterator[FaultProxy]:
    with FaultProxy(registry.host) as p:
        yield p


def cli_index(ref: str, store: Store, *args: str, env: dict[str, str] | None = None):
    return run_cli("index", ref, "--store", store.url, *args, env=env, timeout=120)


def visible(store: Store) -> set[str]:
    return set().union(*(store_keys(store, p) for p in VISIBLE))


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("casfs: error: "), lines[0]
    assert proc.stdout == ""
    return lines[0]


def registry_manifest(reg_host: str, repo: str, ref: str) -> dict:
    client = RegistryClient(reg_host, repo, FAST)
    body, _, _ = client.get_manifest(ref, "test")
    return json.loads(body)


# --- references --------------------------------------------------------------------------


def test_parse_docker_refs() -> None:
    r = parse_image_ref("docker://127.0.0.1:5000/team/app:v1.2")
    assert (r.host, r.repository, r.tag, r.digest, r.reference) == (
        "127.0.0.1:5000", "team/app", "v1.2", None, "v1.2")
    d = "sha256:" + "ab" * 32
    r = parse_image_ref(f"docker://localhost:5000/app@{d}")
    assert (r.host, r.repository, r.tag, r.reference) == ("localhost:5000", "app", None, d)
    assert str(r) == f"docker://localhost:5000/app@{d}"
    r = parse_image_ref(f"docker://reg.example.com/a/b/c:t@{d}")
    assert (r.host, r.repository, r.tag, r.reference) == ("reg.example.com", "a/b/c", "t", d)
    r = parse_image_ref("docker://registry.example.com/app")
    assert r.reference == "latest"
    r = parse_image_ref("docker://ubuntu:22.04")
    assert (r.host, r.repository, r.tag) == ("docker.io", "library/ubuntu", "22.04")
    r = parse_image_ref("docker://myorg/app")
    assert (r.host, r.repository) == ("docker.io", "myorg/app")
    for bad in ("docker://", "docker:x/y", "docker://host.io/App:v1", "docker://host.io/app@sha256:12",
                "docker://host.io/app:bad/tag", "docker://host.io/app:"):
        with pytest.raises(BadImageRef):
            parse_image_ref(bad)


def test_www_authenticate_parsing() -> None:
    got = parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",'
        'scope="repository:a/b:pull,push repository:c:pull", Basic realm="x, y"')
    assert got == [
        ("bearer", {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                    "scope": "repository:a/b:pull,push repository:c:pull"}),
        ("basic", {"realm": "x, y"}),
    ]
    assert parse_www_authenticate('Basic realm=casfs') == [("basic", {"realm": "casfs"})]
    assert parse_www_authenticate("") == []


def test_credentials_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def auth(u: str, p: str) -> dict:
        return {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}

    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text(json.dumps({"auths": {
        "https://index.docker.io/v1/": auth("hubuser", "hubpw"),
        "reg.example.com": auth("docker", "dpw"),
    }}))
    monkeypatch.setenv("HOME", str(home))
    for var in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    opts = RegistryOptions()
    assert find_credentials("docker.io", "library/ubuntu", opts) == ("hubuser", "hubpw")
    assert find_credentials("reg.example.com", "a/b", opts) == ("docker", "dpw")
    assert find_credentials("other.example.com", "a", opts) is None
    # REGISTRY_AUTH_FILE is read before ~/.docker/config.json; a repo-scoped key wins.
    podman = tmp_path / "auth.json"
    podman.write_text(json.dumps({"auths": {
        "reg.example.com/team": auth("team", "tpw"), "reg.example.com": auth("podman", "ppw")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(podman))
    assert find_credentials("reg.example.com", "team/app", opts) == ("team", "tpw")
    assert find_credentials("reg.example.com", "other/app", opts) == ("podman", "ppw")
    # --authfile replaces the search; --creds beats everything.
    only = tmp_path / "only.json"
    only.write_text(json.dumps({"auths": {"reg.example.com": {"username": "u", "password": "p"}}}))
    assert find_credentials("reg.example.com", "x", RegistryOptions(authfile=str(only))) == ("u", "p")
    assert find_credentials("reg.example.com", "x", RegistryOptions(creds="me:a:b")) == ("me", "a:b")


# --- resolving ------------------------------------------------------------------------------


def test_tag_and_digest_refs(registry: RegistryServer, store: Store, layout_digests: dict[str, str]) -> None:
    """A tag and the manifest digest it names give the same casfs manifest, equal to the one
    indexed from the OCI layout (the image manifest digest names the image in both)."""
    proc = cli_index(f"docker://{registry.host}/t/gz:v1", store, "--tls-verify=false", "--tag", "gz")
    assert proc.returncode == 0, proc.stderr
    by_tag = proc.stdout.splitlines()[-1]
    assert by_tag == "blake3:" + layout_digests["gz"]
    client = RegistryClient(registry.host, "t/gz", FAST)
    body, media_type, mdigest = client.get_manifest("v1", "t")
    assert mdigest == "sha256:" + hashlib.sha256(body).hexdigest()
    assert json.loads(body)["mediaType"] == media_type
    proc = cli_index(f"docker://{registry.host}/t/gz@{mdigest}", store, "--tls-verify=false", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == by_tag
    # A tag beside a digest is informative only: the digest is what is fetched.
    proc = cli_index(f"docker://{registry.host}/t/gz:nope@{mdigest}", store, "--tls-verify=false", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == by_tag
    m = Manifest(store.get_manifest(by_tag[7:]), by_tag[7:])
    assert m.meta["image"] == mdigest
    assert store.get_tag("gz") == by_tag[7:]


@pytest.mark.parametrize("name", ["multi", "dmulti"])
def test_multi_platform(registry: RegistryServer, store: Store, name: str) -> None:
    """An OCI index / Docker manifest list: the host platform by default, --platform when told;
    an index digest works as a reference too."""
    top = registry_manifest(registry.host, f"t/{name}", "v1")
    assert len(top["manifests"]) == 2
    result, m = index(f"docker://{registry.host}/t/{name}:v1", store, registry=FAST)
    assert result.image.platform == host_platform_name() == "linux/amd64"
    assert file_content(m, store, m.resolve("/arch")) == b"amd64\n"
    arm, m_arm = index(f"docker://{registry.host}/t/{name}:v1", store, registry=FAST,
                       platform="linux/arm64")
    assert arm.image.platform == "linux/arm64"
    assert arm.digest != result.digest
    assert file_content(m_arm, store, m_arm.resolve("/arch")) == b"arm64\n"
    wanted = {d["platform"]["architecture"]: d["digest"] for d in top["manifests"]}
    assert arm.image.manifest_digest == wanted["arm64"]
    assert result.image.manifest_digest == wanted["amd64"]
    # By the index's own digest (the CLI, --platform spelled as users do).
    client = RegistryClient(registry.host, f"t/{name}", FAST)
    _, _, index_digest = client.get_manifest("v1", "t")
    proc = cli_index(f"docker://{registry.host}/t/{name}@{index_digest}", store,
                     "--tls-verify=false", "--platform", "linux/arm64", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == arm.ref
    err = one_error_line(cli_index(f"docker://{registry.host}/t/{name}:v1", store,
                                   "--tls-verify=false", "--platform", "linux/s390x"))
    assert "no image for platform linux/s390x" in err and "linux/arm64" in err


def test_gzip_zstd_and_plain_layers_match_layout(registry: RegistryServer, store: Store,
                                                 layout_digests: dict[str, str],
                                                 tmp_path: Path, layouts: dict[str, Path]) -> None:
    """What skopeo pushed kept its compression (checked on the registry's manifest), and
    the registry-indexed tree equals the layout-indexed one, for gzip, zstd, uncompressed
    and Docker schema2 manifests."""
    mixed = registry_manifest(registry.host, "t/mixed", "v1")
    assert [lay["mediaType"].rsplit(".", 1)[-1] for lay in mixed["layers"]] == [
        "tar+gzip", "tar+zstd", "tar"]
    zst = registry_manifest(registry.host, "t/zst", "v1")
    assert all(lay["mediaType"].endswith("+zstd") for lay in zst["layers"])
    for name in ("mixed", "gz", "zst", "dmulti"):
        result, m = index(f"docker://{registry.host}/t/{name}:v1", store, registry=FAST)
        assert result.digest == layout_digests[name], name
    # Same trees, checked independently of the manifest encoding too.
    layout_store = file_store(tmp_path / "layout")
    _, lm = index(f"oci:{layouts['mixed']}:v1", layout_store)
    _, rm = index(f"docker://{registry.host}/t/mixed:v1", store, registry=FAST)
    assert manifest_snapshot(rm, store) == manifest_snapshot(lm, layout_store)
    assert rm.meta["config"]["Cmd"] == ["/bin/sh"]


def test_missing_tag_and_repo(registry: RegistryServer, store: Store) -> None:
    before = visible(store)
    proc = cli_index(f"docker://{registry.host}/t/gz:nope", store, "--tls-verify=false")
    line = one_error_line(proc)
    assert proc.returncode == 4
    assert "not found" in line and "'nope'" in line
    proc = cli_index(f"docker://{registry.host}/t/absent:v1", store, "--tls-verify=false")
    assert "not found" in one_error_line(proc)
    proc = cli_index(f"docker://{registry.host}/t/gz@sha256:{'0' * 64}", store, "--tls-verify=false")
    assert "not found" in one_error_line(proc)
    with pytest.raises(ImageNotFound):
        index_image(f"docker://{registry.host}/t/gz:nope", store, registry=FAST)
    assert visible(store) == before


def test_transport_choice(registry: RegistryServer, store: Store, tmp_path: Path,
                          layouts: dict[str, Path]) -> None:
    """Default: https only (a plain-http registry is refused with a hint); --tls-verify=false:
    https without certificate checks (a self-signed registry), else plain http."""
    line = one_error_line(cli_index(f"docker://{registry.host}/t/gz:v1", store))
    assert "--tls-verify=false" in line
    assert RegistryClient(registry.host, "t/gz", FAST).base.startswith("http://")
    with RegistryServer(tmp_path / "tls", tls=True) as tls:
        skopeo_push(layouts["gz"], "v1", f"{tls.host}/t/gz:v1")
        client = RegistryClient(tls.host, "t/gz", FAST)
        assert client.base == f"https://{tls.host}"
        proc = cli_index(f"docker://{tls.host}/t/gz:v1", store, "--tls-verify=false", "-q")
        assert proc.returncode == 0, proc.stderr
        line = one_error_line(cli_index(f"docker://{tls.host}/t/gz:v1", store, "--tls-verify=true"))
        assert "certificate verify failed" in line and "--tls-verify=false" in line
    bad = run_cli("index", "docker://x.io/a:b", "--tls-verify=maybe", "--store", store.url)
    assert bad.returncode == 2 and "true or false" in bad.stderr


# --- authentication --------------------------------------------------------------------------


USER, PASSWORD = "alice", "s3cret-pw"


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory, layouts: dict[str, Path]) -> Iterator[RegistryServer]:
    _need_registry()
    with RegistryServer(tmp_path_factory.mktemp("basic"), htpasswd={USER: PASSWORD}) as reg:
        skopeo_push(layouts["gz"], "v1", f"{reg.host}/private/app:v1", creds=f"{USER}:{PASSWORD}")
        yield reg


def _clean_env(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": "", "DOCKER_CONFIG": ""}


def test_basic_auth(basic_registry: RegistryServer, store: Store, tmp_path: Path,
                    layout_digests: dict[str, str]) -> None:
    ref = f"docker://{basic_registry.host}/private/app:v1"
    env = _clean_env(tmp_path / "home")
    want = "blake3:" + layout_digests["gz"]
    line = one_error_line(cli_index(ref, store, "--tls-verify=false", env=env))
    assert "requires credentials" in line and "--creds" in line
    line = one_error_line(cli_index(ref, store, "--tls-verify=false", "--creds", f"{USER}:wrong", env=env))
    assert "rejected the credentials" in line
    proc = cli_index(ref, store, "--tls-verify=false", "--creds", f"{USER}:{PASSWORD}", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == want
    entry = {"auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    # $REGISTRY_AUTH_FILE (podman/skopeo's auth.json)
    authfile = tmp_path / "auth.json"
    authfile.write_text(json.dumps({"auths": {basic_registry.host: entry}}))
    proc = cli_index(ref, store, "--tls-verify=false", "-q", env={**env, "REGISTRY_AUTH_FILE": str(authfile)})
    assert proc.returncode == 0, proc.stderr
    # --authfile with a repository-scoped key
    scoped = tmp_path / "scoped.json"
    scoped.write_text(json.dumps({"auths": {f"{basic_registry.host}/private": entry}}))
    proc = cli_index(ref, store, "--tls-verify=false", "-q", "--authfile", str(scoped), env=env)
    assert proc.returncode == 0, proc.stderr
    # ~/.docker/config.json, as `docker login` writes it
    (tmp_path / "home" / ".docker").mkdir(parents=True)
    (tmp_path / "home" / ".docker" / "config.json").write_text(
        json.dumps({"auths": {f"http://{basic_registry.host}": entry}}))
    proc = cli_index(ref, store, "--tls-verify=false", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == want


def test_blob_redirects_drop_credentials(basic_registry: RegistryServer, store: Store,
                                          layout_digests: dict[str, str]) -> None:
    """Blob GETs answered 307 to another origin (as a registry on S3 sends clients to a
    presigned URL) are followed, without the registry's credentials."""
    creds = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    with FaultProxy(basic_registry.host) as presigned, FaultProxy(basic_registry.host) as front:
        presigned.upstream_auth = f"Basic {creds}"  # what a presigned URL carries itself
        front.redirect_blobs = presigned.host
        result = index_image(f"docker://{front.host}/private/app:v1", store,
                             registry=RegistryOptions(tls_verify=False, creds=f"{USER}:{PASSWORD}"))
        assert result.digest == layout_digests["gz"]
        assert [e for e in front.log if e[3] == 307]
        blob_requests = [auth for path, auth in presigned.client_auth if "/blobs/" in path]
        assert blob_requests and not any(blob_requests)
        assert any(auth for path, auth in front.client_auth if "/manifests/" in path)


@pytest.fixture(scope="module")
def token_setup(tmp_path_factory: pytest.TempPathFactory,
                layouts: dict[str, Path]) -> Iterator[tuple[RegistryServer, TokenServer]]:
    _need_registry()
    work = tmp_path_factory.mktemp("token")
    with TokenServer(work, users={"bob": "hunter2"}, public=("public/",)) as ts, \
            RegistryServer(work / "registry", token=ts) as reg:
        for repo in ("public/app", "private/app"):
            skopeo_push(layouts["gz"], "v1", f"{reg.host}/{repo}:v1", creds="bob:hunter2")
        ts.requests.clear()
        yield reg, ts


def test_bearer_token_anonymous(token_setup: tuple[RegistryServer, TokenServer], store: Store,
                                tmp_path: Path, layout_digests: dict[str, str]) -> None:
    """The registry challenges with Bearer; an anonymous token (no credentials sent to the
    token service) grants pull on a public repository and nothing on a private one."""
    reg, ts = token_setup
    env = _clean_env(tmp_path / "home")
    ts.requests.clear()
    proc = cli_index(f"docker://{reg.host}/public/app:v1", store, "--tls-verify=false", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blake3:" + layout_digests["gz"]
    assert ts.requests and all(r["user"] is None for r in ts.requests)
    assert "repository:public/app:pull" in ts.requests[0]["scopes"]
    assert ts.requests[0]["service"] == ts.service
    line = one_error_line(cli_index(f"docker://{reg.host}/private/app:v1", store,
                                    "--tls-verify=false", env=env))
    assert "denies access to private/app anonymously" in line and "--creds" in line


def test_bearer_token_with_credentials(token_setup: tuple[RegistryServer, TokenServer],
                                       store: Store, tmp_path: Path,
                                       layout_digests: dict[str, str]) -> None:
    reg, ts = token_setup
    env = _clean_env(tmp_path / "home")
    ts.requests.clear()
    proc = cli_index(f"docker://{reg.host}/private/app:v1", store, "--tls-verify=false", "-q",
                     "--creds", "bob:hunter2", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blake3:" + layout_digests["gz"]
    assert {r["user"] for r in ts.requests} == {"bob"}
    line = one_error_line(cli_index(f"docker://{reg.host}/private/app:v1", store,
                                    "--tls-verify=false", "--creds", "bob:nope", env=env))
    assert "refused the credentials of bob" in line
    # Token services answering with `access_token` instead of `token` work the same.
    ts.key_name = "access_token"
    try:
        result = index_image(f"docker://{reg.host}/private/app:v1", file_store(tmp_path / "s2"),
                             registry=RegistryOptions(tls_verify=False, creds="bob:hunter2"))
        assert result.digest == layout_digests["gz"]
    finally:
        ts.key_name = "token"
    empty = tmp_path / "empty.json"
    empty.write_text('{"auths": {}}')
    with pytest.raises(RegistryAuthError, match="anonymously"):
        index_image(f"docker://{reg.host}/private/app:v1", store,
                    registry=RegistryOptions(tls_verify=False, authfile=str(empty)))
    line = one_error_line(cli_index(f"docker://{reg.host}/private/app:v1", store, "--tls-verify=false",
                                    "--authfile", str(tmp_path / "missing.json"), env=env))
    assert "missing.json does not exist" in line


# --- integrity, faults and retries ----------------------------------------------------------


@pytest.mark.parametrize("which", [2, 0])
def test_layer_digest_mismatch(registry: RegistryServer, proxy: FaultProxy, store: Store,
                               which: int) -> None:
    """A proxy flips one byte in a layer blob. Layer 3 of t/mixed is an uncompressed tar (the
    tar still parses: the digest check at the end of the stream catches it); layer 1 is gzip
    (decompression fails first: the rest is read and the digest mismatch is reported as the
    cause). Either way: one error line, and no layer record, manifest or tag written, not even
    for the other, good layers."""
    digest = registry_manifest(registry.host, "t/mixed", "v1")["layers"][which]["digest"]
    proxy.corrupt = {digest}
    before = visible(store)
    proc = cli_index(f"docker://{proxy.host}/t/mixed:v1", store, "--tls-verify=false", "--tag", "bad")
    line = one_error_line(proc)
    assert proc.returncode == 6
    assert f"for {digest} do not match that digest" in line
    assert visible(store) == before
    with pytest.raises(LayerDigestMismatch):
        index_image(f"docker://{proxy.host}/t/mixed:v1", store, registry=FAST)
    assert visible(store) == before
    # The good registry indexes the image fine afterwards (nothing poisoned).
    result = index_image(f"docker://{registry.host}/t/mixed:v1", store, registry=FAST)
    assert result.layers_reused == 0


def test_dropped_connections_resume(registry: RegistryServer, proxy: FaultProxy, store: Store,
                                    layout_digests: dict[str, str], tmp_path: Path) -> None:
    """The first response for every blob is cut after 64 KiB: each download resumes with a
    Range request from where it broke, and the result equals the layout-indexed image."""
    proxy.cut_after = 64 << 10
    result = index_image(f"docker://{proxy.host}/t/gz:v1", store, registry=FAST)
    assert result.digest == layout_digests["gz"]
    big = [lay for lay in registry_manifest(registry.host, "t/gz", "v1")["layers"]
           if lay["size"] > 64 << 10]
    assert big
    for lay in big:
        gets = proxy.blob_gets(lay["digest"])
        assert [g[2] for g in gets] == [None, f"bytes={64 << 10}-"], gets
        assert gets[1][3] == 206
    # The CLI, through the same kind of proxy (fresh cuts for a fresh store).
    proxy.cut_after = 100_000
    proxy._cut_done.clear()
    other = file_store(tmp_path / "other")
    proc = cli_index(f"docker://{proxy.host}/t/mixed:v1", other, "--tls-verify=false", "-q")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "blake3:" + layout_digests["mixed"]


def test_retries_5xx_and_429(registry: RegistryServer, proxy: FaultProxy, store: Store,
                             layout_digests: dict[str, str]) -> None:
    proxy.faults = [
        ProxyFault(r"/v2/$", 502, 1),
        ProxyFault(r"/manifests/", 503, 2),
        ProxyFault(r"/blobs/", 429, 1, {"Retry-After": "1"}),
        ProxyFault(r"/blobs/", 500, 1),
    ]
    start = time.monotonic()
    result = index_image(f"docker://{proxy.host}/t/gz:v1", store, registry=FAST)
    assert time.monotonic() - start >= 1.0  # Retry-After honoured
    assert result.digest == layout_digests["gz"]
    statuses = [e[3] for e in proxy.log]
    assert statuses.count(503) == 2 and statuses.count(429) == 1 and statuses.count(500) == 1
    # Past the retry budget: a clear error (6 retries with FAST's short backoff).
    proxy.faults = [ProxyFault(r"/manifests/", 503, 100)]
    proxy.log.clear()
    with pytest.raises(RegistryError, match="HTTP 503"):
        index_image(f"docker://{proxy.host}/t/gz:v1", store, registry=FAST)
    assert [e[3] for e in proxy.log].count(503) == 1 + FAST.retries


def test_reindex_skips_download(registry: RegistryServer, proxy: FaultProxy, store: Store) -> None:
    ref = f"docker://{proxy.host}/t/mixed:v1"
    layers = [lay["digest"] for lay in registry_manifest(registry.host, "t/mixed", "v1")["layers"]]
    first = index_image(ref, store, registry=FAST)
    assert first.layers_reused == 0
    assert all(proxy.blob_gets(d) for d in layers)
    assert first.downloaded_bytes == sum(
        lay["size"] for lay in registry_manifest(registry.host, "t/mixed", "v1")["layers"])
    for d in layers:
        assert store.get_layer_record(d) is not None  # keyed by the descriptor digest
    proxy.log.clear()
    proc = cli_index(ref, store, "--tls-verify=false")
    assert proc.returncode == 0, proc.stderr
    assert "(3 already indexed)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == first.ref
    assert not any(proxy.blob_gets(d) for d in layers), proxy.log


def test_layout_records_reused_by_registry(registry: RegistryServer, proxy: FaultProxy,
                                           store: Store, layouts: dict[str, Path]) -> None:
    """Layer records are keyed by the layer digest wherever the layer came from: an image
    indexed from its OCI layout first is indexed from the registry without a layer download."""
    first = index_image(f"oci:{layouts['zst']}:v1", store)
    again = index_image(f"docker://{proxy.host}/t/zst:v1", store, registry=FAST)
    assert again.digest == first.digest
    assert again.layers_reused == len(again.image.layers) == 2
    assert again.downloaded_bytes == 0
    assert not [g for g in proxy.blob_gets() if g[1].split("/")[-1] != again.image.config_digest]


def test_layers_download_in_parallel(registry: RegistryServer, proxy: FaultProxy, store: Store,
                                     layout_digests: dict[str, str]) -> None:
    proxy.throttle = 0.01  # 10 ms per 64 KiB: each 1 MB layer takes ~0.2 s
    result = index_image(f"docker://{proxy.host}/t/wide:v1", store, registry=FAST)
    assert result.digest == layout_digests["wide"]
    assert proxy.max_blob_inflight >= 2


def test_unreachable_registry(store: Store) -> None:
    from casfs.testing.registry import free_port

    port = free_port()
    start = time.monotonic()
    with pytest.raises(RegistryError, match="unreachable"):
        index_image(f"docker://127.0.0.1:{port}/a:b", store, registry=FAST)
    assert time.monotonic() - start < 10


def test_progress_bars_per_layer(capsys: pytest.CaptureFixture[str]) -> None:
    p = Progress(enabled=True, interval=0)
    bars = [p.bar(f"layer {i}/2", 100) for i in (1, 2)]

    def run(b) -> None:
        for _ in range(10):
            b.advance(10)
        b.finish("done")

    threads = [threading.Thread(target=run, args=(b,)) for b in bars]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.done("indexed 2 layers")
    err = capsys.readouterr().err
    assert "[####################] 100 B/100 B" in err
    assert "layer 1/2 done\n" in err and "layer 2/2 done\n" in err
    assert err.endswith("indexed 2 layers\n")
