"""Hostile OCI layouts and docker archives on disk: blobs that are symlinks to
/dev/zero, FIFOs, directories, sparse giants, JSON documents too big or too deep, tar
members that are not regular files.

The dangerous cases run the source in a child process under a memory and CPU limit
and a timeout, so that a regression (reading /dev/zero until memory runs out, blocking
on a FIFO forever) fails the test instead of taking the test run down with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from casfs.errors import ImageError
from casfs.testing import ocibuild as ob
from indexer import source
from indexer.imageref import parse_image_ref
from indexer.oci import MAX_CONFIG, MAX_JSON
from tests.treecheck import file_store, run_cli

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [[ob.file("etc/os-release", "ID=casfs\n"), ob.file("bin/tool", b"\x7fELF" + b"x" * 5000)]]

CHILD = r"""
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
from indexer.imageref import parse_image_ref
from indexer.source import open_docker_archive, open_oci_layout

ref = parse_image_ref(sys.argv[1])
try:
    image = (open_oci_layout if ref.transport == "oci" else open_docker_archive)(ref)
    for layer in image.layers:
        layer.open().close()
    print(json.dumps({"ok": image.manifest_digest}))
except BaseException as exc:
    print(json.dumps({"error": type(exc).__name__, "mro": [c.__name__ for c in type(exc).__mro__],
                      "message": str(exc)}))
"""


def open_in_child(ref: str, timeout: float = 60) -> dict[str, object]:
    """What opening `ref` (and each of its layers) gives, in a child under limits."""
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, ref], capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening {ref} did not finish in {timeout} s (blocked?)")
    assert proc.stdout.strip(), proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refused(ref: str, match: str) -> str:
    got = open_in_child(ref)
    assert "ImageError" in got.get("mro", []), got  # type: ignore[operator]
    message = str(got["message"])
    assert match in message, message
    return message


@pytest.fixture
def layout(tmp_path: Path) -> ob.BuiltImage:
    return ob.write_oci_layout(tmp_path / "layout", LAYERS, tag="v1")


def blob(image: ob.BuiltImage, digest: str) -> Path:
    return image.path / "blobs" / "sha256" / digest.split(":", 1)[1]


def replace(path: Path, how: str, target: str = "/dev/zero", size: int = 0) -> None:
    path.unlink()
    if how == "symlink":
        path.symlink_to(target)
    elif how == "fifo":
        os.mkfifo(path)
    elif how == "dir":
        path.mkdir()
    elif how == "sparse":
        with open(path, "wb") as f:
            f.truncate(size)
    else:
        raise AssertionError(how)


def test_good_layout_still_opens(layout: ob.BuiltImage) -> None:
    got = open_in_child(f"oci:{layout.path}:v1")
    assert got == {"ok": layout.digest}


# --- the manifest, the config, index.json, oci-layout ------------------------------------


@pytest.mark.parametrize(("how", "match"), [
    ("symlink", "character device"),
    ("fifo", "a FIFO"),
    ("dir", "a directory"),
])
@pytest.mark.parametrize("which", ["manifest", "config"])
def test_json_blob_that_is_not_a_regular_file(layout: ob.BuiltImage, how: str, match: str,
                                              which: str) -> None:
    """A manifest or config blob that is a symlink to /dev/zero (read until memory ran
    out), a FIFO (blocked forever) or a directory (an uncaught IsADirectoryError)."""
    digest = layout.digest if which == "manifest" else layout.manifests[0].config_digest
    replace(blob(layout, digest), how)
    message = refused(f"oci:{layout.path}:v1", match)
    assert "not a regular file" in message and digest in message


def test_symlinked_blobs_to_regular_files_are_followed(layout: ob.BuiltImage, tmp_path: Path) -> None:
    """A layout whose blobs link elsewhere (as Bazel's rules_oci writes them) still opens:
    what a link reaches is held to the same rules."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (layout.path / "blobs" / "sha256").iterdir():
        moved = elsewhere / path.name
        path.rename(moved)
        path.symlink_to(moved)
    assert open_in_child(f"oci:{layout.path}:v1") == {"ok": layout.digest}


@pytest.mark.parametrize("name", ["index.json", "oci-layout"])
@pytest.mark.parametrize(("how", "match"), [("symlink", "character device"), ("fifo", "a FIFO"),
                                            ("dir", "a directory")])
def test_layout_files_that_are_not_regular_files(layout: ob.BuiltImage, name: str, how: str,
                                                 match: str) -> None:
    replace(layout.path / name, how)
    refused(f"oci:{layout.path}:v1", match)


def test_sparse_giant_index_json_is_refused_unread(layout: ob.BuiltImage) -> None:
    """An 8 GiB (sparse) index.json: refused from its size, nothing read."""
    replace(layout.path / "index.json", "sparse", size=8 << 30)
    refused(f"oci:{layout.path}:v1", f"larger than {MAX_JSON} bytes")


def test_index_json_over_the_bound(layout: ob.BuiltImage) -> None:
    doc = json.loads((layout.path / "index.json").read_bytes())
    doc["padding"] = "x" * MAX_JSON
    (layout.path / "index.json").write_text(json.dumps(doc))
    refused(f"oci:{layout.path}:v1", "larger than")


def test_manifest_over_the_bound(layout: ob.BuiltImage) -> None:
    """A manifest blob of more than MAX_JSON bytes (whose digest matches: the size is
    what is refused, before any hashing)."""
    doc = json.loads(blob(layout, layout.digest).read_bytes())
    doc["annotations"] = {"pad": "x" * MAX_JSON}
    data = json.dumps(doc).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob(layout, digest).write_bytes(data)
    index = json.loads((layout.path / "index.json").read_bytes())
    index["manifests"][0].update(digest=digest, size=len(data))
    (layout.path / "index.json").write_text(json.dumps(index))
    refused(f"oci:{layout.path}:v1", "larger than")


def test_deeply_nested_index_json(layout: ob.BuiltImage) -> None:
    (layout.path / "index.json").write_text("[" * 200_000 + "]" * 200_000)
    refused(f"oci:{layout.path}:v1", "not valid JSON")


def test_config_bound_is_larger_than_manifests() -> None:
    assert MAX_JSON == 4 << 20 and MAX_CONFIG >= MAX_JSON


# --- layers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "match"), [("symlink", "character device"), ("fifo", "a FIFO"),
                                            ("dir", "a directory")])
def test_layer_blob_that_is_not_a_regular_file(layout: ob.BuiltImage, how: str, match: str) -> None:
    digest = json.loads(blob(layout, layout.digest).read_bytes())["layers"][0]["digest"]
    replace(blob(layout, digest), how)
    refused(f"oci:{layout.path}:v1", match)


def test_layer_blob_longer_than_its_descriptor(layout: ob.BuiltImage) -> None:
    """A 1 TiB sparse file in place of a layer would be hashed for hours: its size is not
    the descriptor's, so it is refused at once."""
    digest = json.loads(blob(layout, layout.digest).read_bytes())["layers"][0]["digest"]
    replace(blob(layout, digest), "sparse", size=1 << 40)
    refused(f"oci:{layout.path}:v1", "its descriptor says")


def test_cli_reports_a_directory_blob_in_one_line(layout: ob.BuiltImage, tmp_path: Path) -> None:
    replace(blob(layout, layout.digest), "dir")
    store = file_store(tmp_path / "store")
    proc = run_cli("index", f"oci:{layout.path}:v1", "--store", store.url, timeout=120)
    assert proc.returncode == ImageError.exit_code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("casfs: error: "), proc.stderr
    assert "is a directory, not a regular file" in lines[0]


# --- docker archives -----------------------------------------------------------------------


def rewrite_archive(src: Path, dst: Path, *, replace_member: dict[str, tarfile.TarInfo | bytes]
                    | None = None, extra: int = 0) -> None:
    """Copy a tar archive, replacing members by name (a TarInfo: a non-file member; bytes:
    new content), adding `extra` empty files."""
    replace_member = replace_member or {}
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for m in tin:
            new = replace_member.get(m.name)
            if isinstance(new, tarfile.TarInfo):
                tout.addfile(new)
            elif isinstance(new, bytes):
                info = tarfile.TarInfo(m.name)
                info.size = len(new)
                tout.addfile(info, io.BytesIO(new))
            else:
                tout.addfile(m, tin.extractfile(m) if m.isfile() else None)
        for i in range(extra):
            tout.addfile(tarfile.TarInfo(f"extra/{i}"), io.BytesIO(b""))


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    path = tmp_path / "image.tar"
    ob.write_docker_archive(path, LAYERS)
    return path


def _manifest_json(archive: Path) -> list[dict[str, object]]:
    with tarfile.open(archive) as t:
        f = t.extractfile("manifest.json")
        assert f is not None
        return json.loads(f.read())


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def test_good_archive_still_opens(archive: Path) -> None:
    assert "ok" in open_in_child(f"docker-archive:{archive}")


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_archive_manifest_json_must_be_a_regular_member(archive: Path, tmp_path: Path,
                                                         kind: bytes) -> None:
    bad = tmp_path / "bad.tar"
    rewrite_archive(archive, bad, replace_member={"manifest.json": _link("manifest.json", "/dev/zero", kind)})
    refused(f"docker-archive:{bad}", "not a regular file")


def test_archive_layer_must_be_a_regular_member(archive: Path, tmp_path: Path) -> None:
    layer = str(_manifest_json(archive)[0]["Layers"][0])  # type: ignore[index]
    bad = tmp_path / "bad.tar"
    rewrite_archive(archive, bad, replace_member={layer: _link(layer, "/dev/zero")})
    refused(f"docker-archive:{bad}", "not a regular file")


def test_archive_manifest_json_over_the_bound(archive: Path, tmp_path: Path) -> None:
    doc = _manifest_json(archive)
    doc[0]["pad"] = "x" * MAX_JSON
    bad = tmp_path / "bad.tar"
    rewrite_archive(archive, bad, replace_member={"manifest.json": json.dumps(doc).encode()})
    refused(f"docker-archive:{bad}", "larger than")


@pytest.mark.parametrize(("how", "match"), [("symlink", "character device"), ("fifo", "a FIFO")])
def test_archive_path_that_is_not_a_regular_file(tmp_path: Path, how: str, match: str) -> None:
    path = tmp_path / "image.tar"
    path.write_bytes(b"")
    replace(path, how)
    refused(f"docker-archive:{path}", match)


def test_archive_with_too_many_members(archive: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "MAX_ARCHIVE_MEMBERS", 50)
    bad = tmp_path / "bad.tar"
    rewrite_archive(archive, bad, extra=100)
    with pytest.raises(ImageError, match="more than 50 members"):
        source.open_docker_archive(parse_image_ref(f"docker-archive:{bad}"))


def test_archive_replaced_after_it_was_listed(archive: Path, tmp_path: Path) -> None:
    image = source.open_docker_archive(parse_image_ref(f"docker-archive:{archive}"))
    other = tmp_path / "other.tar"
    other.write_bytes(archive.read_bytes())
    other.rename(archive)
    with pytest.raises(ImageError, match="replaced"):
        image.layers[0].open()
