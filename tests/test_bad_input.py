"""Bad input to `casfs index`, `ls` and `inspect`: each case must end in one clear line on
stderr (``casfs: error: ...``, no traceback), a non-zero exit status, and a store that holds
no new manifest, tag or layer record. (Blobs of good files read before a failure may stay:
unreferenced content, never visible through a manifest.)"""

from __future__ import annotations

import gzip
import io
import json
import re
import socket
import tarfile
from pathlib import Path

import pytest

from casfs.store import Store
from casfs.testing import ocibuild as ob
from casfs.testing.ocibuild import Layer, directory, file, hardlink, symlink
from tests.treecheck import file_store, index, run_cli, store_keys

GOOD = [directory("etc"), file("etc/os-release", "ID=casfs\n"), file("bin", "x" * 5000)]
VISIBLE = ("manifests/", "tags/", "layers/")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """A store already holding one good image (indexed and tagged)."""
    s = file_store(tmp_path / "store")
    ob.write_oci_layout(tmp_path / "good", [GOOD], tag="t")
    index(f"oci:{tmp_path / 'good'}:t", s, tag="good")
    return s


def visible(store: Store) -> set[str]:
    return set().union(*(store_keys(store, p) for p in VISIBLE))


def fails(store: Store | None, *args: str, match: str, code: int | None = None,
          env: dict[str, str] | None = None) -> str:
    """Run casfs; assert one error line matching `match`, and nothing new visible."""
    before = visible(store) if store is not None else set()
    if store is not None and "--store" not in args:
        args = (*args, "--store", store.url)
    proc = run_cli(*args, env=env)
    assert proc.returncode != 0, proc.stdout
    if code is not None:
        assert proc.returncode == code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("casfs: error: "), lines[0]
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
    assert proc.stdout == ""
    if store is not None:
        assert visible(store) == before, "the failed command left records in the store"
    return lines[0]


def layout_with(tmp_path: Path, layers: list[Layer | list], name: str = "bad", **kw) -> str:
    ob.write_oci_layout(tmp_path / name, layers, tag="t", **kw)
    return f"oci:{tmp_path / name}:t"


def raw_tar(*entries: tuple[str, bytes, str]) -> bytes:
    """A tar written with tarfile directly, names kept verbatim: (name, type, data/link)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mode = 0o644
            data = None
            if kind == tarfile.REGTYPE:
                data = io.BytesIO(payload.encode())
                info.size = len(payload)
            else:
                info.linkname = payload
            tar.addfile(info, data)
    return buf.getvalue()


def layer_blob(tmp_path: Path, name: str = "bad") -> Path:
    """The path of the (single) layer blob of layout `name`."""
    root = tmp_path / name
    index_doc = json.loads((root / "index.json").read_text())
    manifest = json.loads((root / "blobs" / "sha256" /
                           index_doc["manifests"][0]["digest"].split(":")[1]).read_text())
    return root / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":")[1]


def corrupt_layer(members: list, compression: str, damage) -> Layer:
    """A layer whose blob is damaged *before* its digest is taken: the digest matches."""
    layer = Layer.from_members(members, compression)  # type: ignore[arg-type]
    layer._blob = damage(layer.blob)
    return layer


# --- images that cannot be read ------------------------------------------------------------


def test_missing_image_directory(store: Store, tmp_path: Path) -> None:
    fails(store, "index", f"oci:{tmp_path / 'nowhere'}", match="not an OCI image layout",
          code=6)
    fails(store, "index", f"docker-archive:{tmp_path / 'nowhere.tar'}", match="not found")


@pytest.mark.parametrize("content,match", [
    (b"{not json", "index.json is not valid JSON"),
    (b"[1, 2]", "index.json is not a JSON object"),
    (b'{"manifests": {"a": 1}}', "index.json"),
    (b'{"manifests": [{"mediaType": "x"}]}', "index.json.*digest"),
    (b'{"manifests": ["str"]}', "index.json"),
    (b'{"manifests": []}', "holds no image"),
    (b'{"manifests": [{"digest": "md5:abc", "size": 3}]}', "md5"),
    (b'{"manifests": [{"digest": "sha256:../../../etc/passwd"}]}', "digest"),
])
def test_malformed_index_json(store: Store, tmp_path: Path, content: bytes, match: str) -> None:
    ref = layout_with(tmp_path, [GOOD])
    (tmp_path / "bad" / "index.json").write_bytes(content)
    fails(store, "index", ref.rsplit(":", 1)[0], match=match)


def test_malformed_manifest_and_config(store: Store, tmp_path: Path) -> None:
    built = ob.write_oci_layout(tmp_path / "bad", [GOOD], tag="t")
    blobs = tmp_path / "bad" / "blobs" / "sha256"
    manifest = json.loads((blobs / built.digest.split(":")[1]).read_bytes())

    def rewrite(doc: dict) -> None:
        data = json.dumps(doc).encode()
        digest = ob._sha256(data)
        (blobs / digest.split(":")[1]).write_bytes(data)
        index_doc = json.loads((tmp_path / "bad" / "index.json").read_text())
        index_doc["manifests"][0]["digest"] = digest
        index_doc["manifests"][0]["size"] = len(data)
        (tmp_path / "bad" / "index.json").write_text(json.dumps(index_doc))

    rewrite({**manifest, "layers": [{"mediaType": "x"}]})
    fails(store, "index", f"oci:{tmp_path / 'bad'}:t", match="digest")
    rewrite({**manifest, "layers": "nope"})
    fails(store, "index", f"oci:{tmp_path / 'bad'}:t", match="layers")
    rewrite({k: v for k, v in manifest.items() if k != "config"})
    fails(store, "index", f"oci:{tmp_path / 'bad'}:t", match="no config")


def test_missing_blobs(store: Store, tmp_path: Path) -> None:
    built = ob.write_oci_layout(tmp_path / "bad", [GOOD, [file("more", "m")]], tag="t")
    ref = f"oci:{tmp_path / 'bad'}:t"
    blobs = tmp_path / "bad" / "blobs" / "sha256"
    layer = built.manifests[0].layers[1]
    (blobs / layer.digest.split(":")[1]).unlink()
    fails(store, "index", ref, match=f"layer {layer.digest} is missing")
    (blobs / built.manifests[0].config_digest.split(":")[1]).unlink()
    fails(store, "index", ref, match="config .* is missing")
    (blobs / built.digest.split(":")[1]).unlink()
    fails(store, "index", ref, match="manifest .* is missing")


def test_layer_not_matching_its_digest(store: Store, tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD, [file("second", "x" * 3000)]])
    path = layer_blob(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    fails(store, "index", ref, match="does not match its digest")


def test_manifest_not_matching_its_digest(store: Store, tmp_path: Path) -> None:
    built = ob.write_oci_layout(tmp_path / "bad", [GOOD], tag="t")
    path = tmp_path / "bad" / "blobs" / "sha256" / built.digest.split(":")[1]
    path.write_bytes(path.read_bytes().replace(b'"schemaVersion":2', b'"schemaVersion":3'))
    fails(store, "index", f"oci:{tmp_path / 'bad'}:t", match="does not match its digest")


def test_unknown_tag_in_layout(store: Store, tmp_path: Path) -> None:
    ob.write_oci_layout(tmp_path / "bad", [GOOD], tag="t")
    fails(store, "index", f"oci:{tmp_path / 'bad'}:other", match="tag 'other' not found")


# --- corrupt streams ----------------------------------------------------------------------------

GOOD_THEN_MORE = [file("first", "content before the damage " * 50),
                  *[file(f"f{i}", bytes(range(256)) * 100) for i in range(6)]]


@pytest.mark.parametrize("compression,damage,match", [
    ("gzip", lambda b: b[: len(b) // 2], "corrupt or truncated"),
    ("gzip", lambda b: b[:-4], "corrupt or truncated"),  # just the trailer cut short
    ("gzip", lambda b: b[:100] + bytes(x ^ 0x5A for x in b[100:200]) + b[200:],
     "corrupt or truncated"),
    ("zstd", lambda b: b[: len(b) // 2], "corrupt or truncated"),
    # zstd frames carry no checksum here: the diff_id catches damaged content
    ("zstd", lambda b: b[:60] + bytes(x ^ 0x5A for x in b[60:120]) + b[120:],
     "corrupt or truncated|does not match its diff_id"),
    ("zstd", lambda b: b"\x28\xb5\x2f\xfd" + b"\xff" * 64, "corrupt or truncated"),
    ("none", lambda b: b[: len(b) // 2 + 7], "truncated"),
    ("gzip", lambda b: gzip.compress(b"this is not a tar archive at all" * 20, mtime=0),
     "tar archive"),
])
def test_corrupt_layer_stream(store: Store, tmp_path: Path, compression: str, damage,
                              match: str) -> None:
    layer = corrupt_layer(GOOD_THEN_MORE, compression, damage)
    ref = layout_with(tmp_path, [GOOD, layer])
    line = fails(store, "index", ref, match=match)
    assert "layer 2/2" in line


def test_docker_archive_layer_not_matching_diff_id(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "image.tar"
    ob.write_docker_archive(path, [GOOD, [file("second", "abc" * 1000)]])
    data = path.read_bytes()
    # flip one content byte of the second layer's file (the diff_id no longer matches)
    pos = data.index(b"abcabcabc") + 100
    path.write_bytes(data[:pos] + b"X" + data[pos + 1:])
    fails(store, "index", f"docker-archive:{path}", match="diff_id")


def test_not_a_docker_archive(store: Store, tmp_path: Path) -> None:
    (tmp_path / "junk.tar").write_bytes(b"\x00junk" * 1000)
    fails(store, "index", f"docker-archive:{tmp_path / 'junk.tar'}", match="docker archive")
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    fails(store, "index", f"docker-archive:{tmp_path / 'empty.tar'}", match="manifest.json")


# --- hostile entries ---------------------------------------------------------------------------


@pytest.mark.parametrize("entries,match", [
    ([("/etc/passwd", tarfile.REGTYPE, "root::0:0")], "absolute path"),
    ([("ok", tarfile.REGTYPE, "fine"), ("a/../../etc/x", tarfile.REGTYPE, "x")], r"'\.\.'"),
    ([("../escape", tarfile.SYMTYPE, "/")], r"'\.\.'"),
    ([("ok", tarfile.REGTYPE, "x"), ("link", tarfile.LNKTYPE, "../../ok")], r"'\.\.'"),
    ([("link", tarfile.LNKTYPE, "/etc/shadow")], "absolute path"),
    ([("dir/.wh...", tarfile.REGTYPE, "")], "whiteout 'dir/.wh...' names no entry"),
    ([("etc/.wh.", tarfile.REGTYPE, "")], "whiteout 'etc/.wh.' names no entry"),
])
def test_hostile_paths(store: Store, tmp_path: Path, entries: list, match: str) -> None:
    ref = layout_with(tmp_path, [GOOD, Layer(raw_tar(*entries), "gzip")])
    fails(store, "index", ref, match=match)


def test_hardlink_to_missing_name(store: Store, tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD, [file("a", "a"), hardlink("b", "does/not/exist")]])
    fails(store, "index", ref, match="hardlink 'b' to missing name 'does/not/exist'")
    # a name removed by an earlier layer is missing too
    ref = layout_with(tmp_path, [GOOD, [ob.whiteout("bin")], [hardlink("b", "bin")]], name="b2")
    fails(store, "index", ref, match="missing name 'bin'")


def test_hardlink_to_directory(store: Store, tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD, [hardlink("d", "etc")]])
    fails(store, "index", ref, match="hardlink 'd' to directory 'etc'")


def test_symlink_loop_and_file_as_parent(store: Store, tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD, [symlink("a", "b"), symlink("b", "a")], [file("a/x", "x")]])
    fails(store, "index", ref, match="too many levels of symbolic links")
    ref = layout_with(tmp_path, [GOOD, [file("bin/x", "x")]], name="p2")
    fails(store, "index", ref, match="'bin' on its path is not a directory")


@pytest.mark.parametrize("member,match", [
    (file("f", "x", uid=2**32 + 5), "entry 'f' has an out-of-range uid 4294967301"),
    (file("f", "x", gid=2**40), "entry 'f' has an out-of-range gid"),
    (file("f", "x", mtime=2**62), "entry 'f' has an out-of-range mtime"),
])
def test_out_of_range_fields(store: Store, tmp_path: Path, member, match: str) -> None:
    ref = layout_with(tmp_path, [GOOD, [member]])
    fails(store, "index", ref, match=match)


# --- stores, references and arguments ----------------------------------------------------------


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_s3_store(tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD])
    port = closed_port()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    line = fails(None, "index", ref, "--store", "s3://bucket/prefix", env=env,
                 match=f"cannot reach store s3://bucket/prefix at http://127.0.0.1:{port}")
    assert "gave up after" in line


@pytest.mark.s3
def test_s3_bucket_that_does_not_exist(s3_bucket_url: str, tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD])
    fails(None, "index", ref, "--store", "s3://no-such-bucket-here/prefix",
          match="store s3://no-such-bucket-here/prefix refused access \\(NoSuchBucket")


@pytest.mark.parametrize("url", ["relative/dir", "file://host/x", "s3://", "ftp://x/y"])
def test_bad_store_url(tmp_path: Path, url: str) -> None:
    ref = layout_with(tmp_path, [GOOD])
    fails(None, "index", ref, "--store", url, match="bad store URL", code=2)
    fails(None, "ls", "sometag", "--store", url, match="bad store URL", code=2)


def test_store_path_is_a_file(tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD])
    (tmp_path / "plain").write_text("x")
    fails(None, "index", ref, "--store", f"file://{tmp_path / 'plain'}",
          match="cannot create store directory")


def test_missing_tag_and_digest(store: Store, tmp_path: Path) -> None:
    fails(store, "ls", "no-such-tag", match="tag 'no-such-tag' not found", code=4)
    fails(store, "inspect", "no-such-tag", match="tag 'no-such-tag' not found", code=4)
    fails(store, "ls", "blake3:" + "0" * 64, match=f"manifest {'0' * 64} not found")
    fails(store, "ls", "good", "/etc/nope", match="no such file or directory")
    fails(None, "ls", "good", "--store", f"file://{tmp_path / 'no-store'}",
          match="does not exist")


def test_unknown_transport_and_bad_refs(store: Store, tmp_path: Path) -> None:
    fails(store, "index", "bogus:whatever", match="unknown transport 'bogus'", code=2)
    fails(store, "index", "no-transport-at-all", match="bad image reference", code=2)
    fails(store, "index", "docker:x/y", match="bad image reference")


def test_bad_tag_name_refused_before_work(store: Store, tmp_path: Path) -> None:
    ref = layout_with(tmp_path, [GOOD, [file("new", "new content, not uploaded")]])
    blobs = store_keys(store, "blobs/")
    fails(store, "index", ref, "--tag", "bad/tag name", match="invalid tag name")
    assert store_keys(store, "blobs/") == blobs


def test_exit_codes_are_documented() -> None:
    """docs/operations.md's error table lists exactly the exit statuses casfs uses, and
    every error class's status is one of them."""
    import inspect

    from casfs import errors

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    table = doc.split("## Errors", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == set(errors.EXIT_CODES), (documented, set(errors.EXIT_CODES))
    used = {cls.exit_code for _, cls in inspect.getmembers(errors, inspect.isclass)
            if issubclass(cls, errors.CasfsError)}
    assert used <= set(errors.EXIT_CODES), used - set(errors.EXIT_CODES)
