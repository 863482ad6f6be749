"""Layer rules: images built here, indexed by casfs, and the manifest's tree compared entry by
entry with an independent extraction (``umoci unpack``) of the same image.

umoci (Debian 12, 0.4.7) reads neither zstd layers nor Docker media types nor nested
indexes, so those inputs are compared against the umoci extraction of the equivalent
OCI/gzip image (see tests/reference.py for what umoci can and cannot be compared on).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from casfs.errors import ImageError
from casfs.testing import ocibuild as ob
from casfs.testing.ocibuild import (
    Layer,
    Member,
    directory,
    file,
    hardlink,
    opaque_whiteout,
    parent_dirs,
    symlink,
    whiteout,
)
from indexer.chunking import SMALL_CHUNK as CHUNK_SIZE
from indexer.source import host_platform_name
from tests.reference import CAP, diff_snapshots, needs_umoci, snapshot, umoci_unpack
from tests.treecheck import file_content, file_store, index, manifest_snapshot, run_cli


def reference(tmp_path: Path, layers: list[Any], name: str = "ref", **kw: Any) -> dict:
    """umoci's extraction of an OCI/gzip image of ``layers``, as a snapshot."""
    ob.write_oci_layout(tmp_path / name, layers, tag="t", **kw)
    return snapshot(umoci_unpack(tmp_path / name, "t", tmp_path / f"{name}-bundle"))


def casfs_tree(tmp_path: Path, ref: str, **kw: Any) -> tuple[dict, Any]:
    store = file_store(tmp_path / "store")
    result, m = index(ref, store, **kw)
    return manifest_snapshot(m, store), result


def assert_same(expected: dict, actual: dict, **kw: Any) -> None:
    kw.setdefault("ignore_paths", set())
    kw["ignore_paths"] = {"/", *kw["ignore_paths"]}  # umoci alters the rootfs dir itself
    diff = diff_snapshots(expected, actual, **kw)
    assert diff == [], "casfs differs from umoci:\n" + "\n".join(diff)
    assert len(expected) > 1


def check(tmp_path: Path, layers: list[Any], **kw: Any) -> dict:
    """Build an OCI image of ``layers``, compare casfs with umoci; returns casfs's snapshot."""
    expected = reference(tmp_path, layers, **kw)
    actual, _ = casfs_tree(tmp_path, f"oci:{tmp_path / 'ref'}:t")
    assert_same(expected, actual)
    return actual


def content(snap: dict, path: str) -> str:
    return snap[path]["hash"]


def h(data: bytes | str) -> str:
    import blake3

    return "blake3:" + blake3.blake3(data.encode() if isinstance(data, str) else data).hexdigest()


# --- layer rules ---------------------------------------------------------------------------

pytestmark = needs_umoci


def test_whiteouts(tmp_path: Path) -> None:
    base = [
        directory("a", mtime=100), file("a/x", "x"), file("a/y", "y"),
        file("b", "b"),
        directory("c"), directory("c/sub"), file("c/sub/deep", "deep"), file("c/f", "f"),
        symlink("link", "b"),
    ]
    upper = [
        whiteout("a/x"), whiteout("c"), whiteout("link"),
        whiteout("never-existed"), whiteout("a/nope"),
        file("new", "new"),
    ]
    snap = check(tmp_path, [base, upper])
    assert "/a/x" not in snap and "/link" not in snap
    assert not any(p.startswith("/c") for p in snap)
    assert content(snap, "/a/y") == h("y") and content(snap, "/new") == h("new")
    assert not any(".wh." in p for p in snap)


def test_whiteout_then_readd_in_same_layer(tmp_path: Path) -> None:
    base = [directory("d"), file("d/old", "old"), file("f", "lower")]
    # A whiteout hides only lower layers: the same layer may add the name again.
    upper = [file("f", "upper"), whiteout("f"), directory("d"), whiteout("d/old"),
             file("d/old", "again")]
    snap = check(tmp_path, [base, upper])
    assert content(snap, "/f") == h("upper")
    assert content(snap, "/d/old") == h("again")


def test_opaque_whiteouts(tmp_path: Path) -> None:
    base = [
        directory("d", mode=0o750, mtime=111), file("d/a", "a"), file("d/b", "old b"),
        directory("d/sub"), file("d/sub/c", "c"),
        directory("e"), file("e/gone", "gone"),
        directory("keep"), file("keep/k", "k"),
    ]
    upper = [
        # opaque marker first, then re-added children of the same layer
        directory("d", mode=0o750, mtime=111), opaque_whiteout("d"),
        file("d/b", "new b"), directory("d/sub2"), file("d/sub2/n", "n"),
        # re-added children first, marker last: they must survive as well
        directory("e"), file("e/fresh", "fresh"), opaque_whiteout("e"),
    ]
    snap = check(tmp_path, [base, upper])
    assert {p for p in snap if p.startswith("/d/")} == {"/d/b", "/d/sub2", "/d/sub2/n"}
    assert content(snap, "/d/b") == h("new b")
    assert {p for p in snap if p.startswith("/e/")} == {"/e/fresh"}
    assert content(snap, "/keep/k") == h("k")


def test_file_replaced_by_directory_and_reverse(tmp_path: Path) -> None:
    base = [
        file("x", "a file"),
        directory("y"), directory("y/z"), file("y/z/f", "f"), file("y/g", "g"),
        symlink("s", "x"),
    ]
    upper = [
        directory("x", mode=0o711), file("x/child", "child"),
        file("y", "now a file", mode=0o600),
        directory("s"), file("s/in", "in"),
    ]
    snap = check(tmp_path, [base, upper])
    assert snap["/x"]["type"] == "dir" and snap["/x"]["mode"] == 0o711
    assert content(snap, "/x/child") == h("child")
    assert snap["/y"]["type"] == "file" and content(snap, "/y") == h("now a file")
    assert not any(p.startswith("/y/") for p in snap)
    assert snap["/s"]["type"] == "dir"


def test_hardlinks_within_and_across_layers(tmp_path: Path) -> None:
    base = [
        directory("bin"), file("bin/tool", "multi-call", mode=0o755),
        *[hardlink(f"bin/alias{i}", "bin/tool") for i in range(5)],
        directory("etc"), file("etc/single", "one"), hardlink("etc/pair", "etc/single"),
    ]
    upper = [
        directory("bin"),
        hardlink("bin/late", "bin/alias3"),  # a link to a lower layer's link
        directory("other"), hardlink("other/far", "bin/tool"),
    ]
    snap = check(tmp_path, [base, upper])
    group = ["/bin/tool", "/bin/late", "/other/far"] + [f"/bin/alias{i}" for i in range(5)]
    for p in group:
        assert snap[p]["nlink"] == 8 and snap[p]["hardlink"] == "/bin/alias0"
        assert content(snap, p) == h("multi-call")
    assert snap["/etc/pair"]["nlink"] == 2


def test_hardlink_survives_replacement_of_other_name(tmp_path: Path) -> None:
    base = [
        file("a", "shared"), hardlink("b", "a"), hardlink("c", "a"),
        file("p", "pair"), hardlink("q", "p"),
    ]
    upper = [file("a", "replaced"), whiteout("p")]
    snap = check(tmp_path, [base, upper])
    assert content(snap, "/a") == h("replaced") and snap["/a"]["nlink"] == 1
    assert content(snap, "/b") == content(snap, "/c") == h("shared")
    assert snap["/b"]["nlink"] == 2 and snap["/b"]["hardlink"] == "/b"
    assert snap["/q"]["nlink"] == 1 and snap["/q"]["hardlink"] is None
    assert content(snap, "/q") == h("pair")


def test_symlinks(tmp_path: Path) -> None:
    base = [
        directory("d"), file("d/target", "t"),
        symlink("rel", "d/target"), symlink("abs", "/etc/passwd"),
        symlink("dangling", "../nowhere/at/all"), symlink("dirlink", "d"),
        symlink("d/up", "../rel", uid=7, gid=8, mtime=12345),
        symlink("replaced", "d"), symlink("long", "x" * 300),
    ]
    upper = [file("replaced", "now a file"), symlink("d/target", "elsewhere")]
    snap = check(tmp_path, [base, upper])
    assert snap["/abs"]["target"] == "/etc/passwd"
    assert snap["/d/up"]["target"] == "../rel" and snap["/d/up"]["uid"] == 7
    assert snap["/d/target"] == {**snap["/d/target"], "type": "symlink", "target": "elsewhere"}
    assert snap["/replaced"]["type"] == "file"
    assert snap["/long"]["target"] == "x" * 300


def test_entries_through_symlinked_parents(tmp_path: Path) -> None:
    """Parent paths are resolved through symlinks inside the root, as umoci and Docker do
    (usrmerge images: /lib -> usr/lib)."""
    base = [
        directory("usr"), directory("usr/lib"), file("usr/lib/w", "w"), file("usr/lib/keep", "k"),
        directory("usr/share"), file("usr/share/s", "s"),
        symlink("lib", "usr/lib"), symlink("up", "../../../usr"), symlink("abs", "/usr/share"),
        symlink("chain", "lib"), directory("etc"), symlink("usr/lib/to-etc", "/etc"),
    ]
    upper = [
        file("lib/added", "via relative link"),
        file("up/lib/deep", "via a link climbing above the root"),
        file("abs/new", "via an absolute link"),
        directory("chain/sub", mode=0o700), file("chain/sub/x", "x"),
        whiteout("lib/w"), opaque_whiteout("abs"),
        hardlink("hl", "lib/keep"),
        file("lib/to-etc/conf", "an absolute link restarts at the root"),
    ]
    snap = check(tmp_path, [base, upper])
    assert content(snap, "/usr/lib/added") == h("via relative link")
    assert content(snap, "/usr/lib/deep") == h("via a link climbing above the root")
    assert "/usr/lib/w" not in snap and "/usr/share/s" not in snap
    assert content(snap, "/usr/share/new") == h("via an absolute link")
    assert snap["/usr/lib/sub"]["mode"] == 0o700 and "/usr/lib/sub/x" in snap
    assert snap["/hl"]["hardlink"] == "/hl" and snap["/usr/lib/keep"]["nlink"] == 2
    assert snap["/lib"]["type"] == snap["/chain"]["type"] == "symlink"
    assert content(snap, "/etc/conf") == h("an absolute link restarts at the root")


def test_pax_xattrs(tmp_path: Path) -> None:
    layer = [
        directory("d", xattrs={"user.dir": "on a directory"}),
        file("d/f", "f", xattrs={"user.a": "1", "user.bin": b"\x00\xff\x80", "trusted.t": "tv",
                                 "security.capability": CAP}),
        file("d/many", "m", xattrs={f"user.k{i:02}": f"v{i}" * i for i in range(20)}),
        symlink("d/s", "f", xattrs={"trusted.sym": "s"}),
        Member("d/p", "fifo", xattrs={"trusted.fifo": "p"}),
        file("d/empty-value", "e", xattrs={"user.empty": ""}),
    ]
    snap = check(tmp_path, [parent_dirs("d/x"), layer])
    assert snap["/d"]["xattrs"] == {"user.dir": b"on a directory"}
    f = snap["/d/f"]["xattrs"]
    assert f["user.bin"] == b"\x00\xff\x80" and f["security.capability"] == CAP
    assert snap["/d/s"]["xattrs"] == {"trusted.sym": b"s"}
    assert len(snap["/d/many"]["xattrs"]) == 20


def test_xattrs_replaced_when_directory_respecified(tmp_path: Path) -> None:
    base = [directory("d", xattrs={"user.old": "o", "user.both": "1"}), file("d/f", "f")]
    upper = [directory("d", xattrs={"user.both": "2", "user.new": "n"})]
    snap = check(tmp_path, [base, upper])
    assert snap["/d"]["xattrs"] == {"user.both": b"2", "user.new": b"n"}


def test_devices_and_fifos(tmp_path: Path) -> None:
    layer = [
        directory("dev"),
        Member("dev/null", "char", devmajor=1, devminor=3, mode=0o666),
        Member("dev/sda1", "block", devmajor=8, devminor=1, mode=0o660, gid=6),
        Member("dev/big", "char", devmajor=4095, devminor=1048575, mode=0o600),
        Member("dev/fifo", "fifo", mode=0o620, uid=3),
    ]
    snap = check(tmp_path, [layer])
    assert snap["/dev/null"]["type"] == "char" and snap["/dev/null"]["rdev"] == (1, 3)
    assert snap["/dev/sda1"]["type"] == "block" and snap["/dev/sda1"]["rdev"] == (8, 1)
    assert snap["/dev/big"]["rdev"] == (4095, 1048575)
    assert snap["/dev/fifo"]["type"] == "fifo" and snap["/dev/fifo"]["mode"] == 0o620


def test_special_permission_bits(tmp_path: Path) -> None:
    layer = [
        directory("tmp", mode=0o1777), directory("shared", mode=0o2775, gid=50),
        file("suid", "s", mode=0o4755), file("sgid", "g", mode=0o2711),
        file("all", "a", mode=0o7777), file("none", "n", mode=0o000),
        file("shared/f", "f", uid=1000, gid=1000, mode=0o640),
    ]
    snap = check(tmp_path, [layer])
    assert snap["/tmp"]["mode"] == 0o1777 and snap["/shared"]["mode"] == 0o2775
    assert snap["/suid"]["mode"] == 0o4755 and snap["/sgid"]["mode"] == 0o2711
    assert snap["/all"]["mode"] == 0o7777 and snap["/none"]["mode"] == 0
    assert (snap["/shared/f"]["uid"], snap["/shared/f"]["gid"]) == (1000, 1000)


def test_directory_respecified_keeps_children(tmp_path: Path) -> None:
    base = [
        directory("opt", mode=0o755, mtime=1000), directory("opt/app", mode=0o755, mtime=1000),
        file("opt/app/run", "run"), directory("opt/app/lib"), file("opt/app/lib/x", "x"),
    ]
    upper = [
        directory("opt/app", mode=0o700, uid=1000, gid=100, mtime=2000),
        file("opt/app/added", "added"),
    ]
    snap = check(tmp_path, [base, upper])
    app = snap["/opt/app"]
    assert (app["mode"], app["uid"], app["gid"], app["mtime"]) == (0o700, 1000, 100, 2000)
    assert {"/opt/app/run", "/opt/app/lib/x", "/opt/app/added"} <= snap.keys()


def test_dot_slash_and_plain_names_mixed(tmp_path: Path) -> None:
    base = [
        directory("."), directory("./etc", mtime=10), file("./etc/a", "a"), file("etc/b", "b"),
        directory("usr"), directory("./usr/lib"), file("usr/lib/x", "x"),
        hardlink("./usr/lib/y", "usr/lib/x"),
    ]
    upper = [
        directory("./etc", mode=0o700, mtime=20), whiteout("./etc/a"), file("./etc/b", "b2"),
        hardlink("usr/lib/z", "./usr/lib/y"),
    ]
    snap = check(tmp_path, [base, upper])
    assert "/etc/a" not in snap and content(snap, "/etc/b") == h("b2")
    assert snap["/etc"]["mode"] == 0o700
    assert snap["/usr/lib/z"]["nlink"] == 3
    assert not any("/./" in p or p.startswith("/.") for p in snap)


def test_large_file_chunks(tmp_path: Path) -> None:
    big = os.urandom(CHUNK_SIZE * 3 + 12345)
    repeated = os.urandom(CHUNK_SIZE) * 3  # three identical chunks
    layer = [file("big", big), file("repeated", repeated), file("exact", big[: CHUNK_SIZE * 2]),
             file("empty", b"")]
    expected = reference(tmp_path, [layer])
    store = file_store(tmp_path / "store")
    _, m = index(f"oci:{tmp_path / 'ref'}:t", store)
    assert_same(expected, manifest_snapshot(m, store))
    ino = m.resolve("/big")
    chunks = m.chunks(ino)
    assert CHUNK_SIZE == 256 * 1024
    assert [c.length for c in chunks] == [CHUNK_SIZE] * 3 + [12345]
    assert [c.offset for c in chunks] == [i * CHUNK_SIZE for i in range(4)]
    assert file_content(m, store, ino) == big
    assert len({c.digest for c in m.chunks(m.resolve("/repeated"))}) == 1
    assert [c.length for c in m.chunks(m.resolve("/exact"))] == [CHUNK_SIZE] * 2
    # the first two chunks of /exact are those of /big: stored once
    assert m.chunks(m.resolve("/exact"))[1].digest == chunks[1].digest
    assert m.chunks(m.resolve("/empty")) == []
    # a range inside the third chunk needs only that chunk
    part = m.chunks_for_range(ino, CHUNK_SIZE * 2 + 10, 100)
    assert [c.offset for c in part] == [CHUNK_SIZE * 2]


# --- image formats -------------------------------------------------------------------------


def rich_layers() -> list[list[Member]]:
    base = [
        directory("d", mode=0o1777, mtime=1000, uid=5, gid=6, xattrs={"user.dx": "dv"}),
        file("d/f", "hello", mode=0o4755, xattrs={"user.bin": b"\x00\xff", "trusted.t": "tv"}),
        hardlink("d/h", "d/f"), symlink("d/s", "f"),
        Member("c", "char", devmajor=1, devminor=3, mode=0o666),
        Member("p", "fifo", mode=0o600),
        file("gone", "gone"), file("big", bytes(range(256)) * 3000),
    ]
    upper = [whiteout("gone"), file("d/new", "new"), directory("d", mode=0o755)]
    return [base, upper]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_layer_compressions(tmp_path: Path, compression: str) -> None:
    expected = reference(tmp_path, rich_layers())  # gzip: umoci cannot read zstd
    ob.write_oci_layout(tmp_path / "img", [Layer.from_members(m, compression)
                                           for m in rich_layers()], tag="t")
    actual, result = casfs_tree(tmp_path, f"oci:{tmp_path / 'img'}:t")
    assert_same(expected, actual)
    suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    assert [x.media_type for x in result.image.layers] == [
        f"application/vnd.oci.image.layer.v1.tar{suffix}"] * 2


def test_docker_media_types(tmp_path: Path) -> None:
    expected = reference(tmp_path, rich_layers())
    built = ob.write_oci_layout(tmp_path / "docker", rich_layers(), tag="t", media_types="docker")
    assert built.media_type == ob.DOCKER_MANIFEST
    actual, result = casfs_tree(tmp_path, f"oci:{tmp_path / 'docker'}:t")
    assert_same(expected, actual)
    assert {x.media_type for x in result.image.layers} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"}


def test_docker_archive(tmp_path: Path) -> None:
    expected = reference(tmp_path, rich_layers())
    ob.write_docker_archive(tmp_path / "image.tar", rich_layers(), repo_tag="sample:v1")
    actual, result = casfs_tree(tmp_path, f"docker-archive:{tmp_path / 'image.tar'}")
    assert_same(expected, actual)
    named, _ = casfs_tree(tmp_path, f"docker-archive:{tmp_path / 'image.tar'}:sample:v1")
    assert named == actual
    assert len(result.image.layers) == 2


def test_multi_platform_index(tmp_path: Path) -> None:
    plats = [
        ("linux", "amd64", [[file("arch", "amd64"), file("common", "c")]]),
        ("linux", "arm64", [[file("arch", "arm64"), file("common", "c")], [file("extra", "x")]]),
        ("linux", "riscv64", [[file("arch", "riscv64")]]),
    ]
    ob.write_oci_layout(tmp_path / "multi", platforms=plats, tag="t")
    store = file_store(tmp_path / "store")
    host = host_platform_name()
    if host in ("linux/amd64", "linux/arm64"):
        _, m = index(f"oci:{tmp_path / 'multi'}:t", store)
        assert file_content(m, store, m.resolve("/arch")).decode() == host.split("/")[1]
    result, m = index(f"oci:{tmp_path / 'multi'}:t", store, platform="linux/arm64")
    assert file_content(m, store, m.resolve("/arch")) == b"arm64"
    assert m.resolve("/extra") and result.image.platform == "linux/arm64"
    assert m.meta["platform"] == "linux/arm64"
    _, m = index(f"oci:{tmp_path / 'multi'}:t", store, platform="linux/riscv64")
    assert file_content(m, store, m.resolve("/arch")) == b"riscv64"
    with pytest.raises(ImageError, match="s390x"):
        index(f"oci:{tmp_path / 'multi'}:t", store, platform="linux/s390x")


def test_same_image_anywhere_same_digest(tmp_path: Path) -> None:
    """The manifest digest depends on the image, not on where its layout was read from."""
    ob.write_oci_layout(tmp_path / "one", rich_layers(), tag="t")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    store = file_store(tmp_path / "store")
    a, _ = index(f"oci:{tmp_path / 'one'}:t", store)
    b, _ = index(f"oci:{tmp_path / 'two'}", store)
    assert a.digest == b.digest


# --- the command line ------------------------------------------------------------------------


def test_cli_index_ls_inspect(tmp_path: Path) -> None:
    ob.write_oci_layout(tmp_path / "img", rich_layers(), tag="t")
    store_url = f"file://{tmp_path / 'store'}"
    proc = run_cli("index", f"oci:{tmp_path / 'img'}:t", "--store", store_url, "--tag", "app:v1")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"blake3:[0-9a-f]{64}", last), proc.stdout
    digest = last.split(":", 1)[1]
    assert (tmp_path / "store" / "manifests" / digest).is_file()
    assert (tmp_path / "store" / "tags" / "app:v1").read_text().strip() == digest

    quiet = run_cli("index", f"oci:{tmp_path / 'img'}:t", "--store", store_url, "-q")
    assert quiet.returncode == 0 and quiet.stdout.strip() == last

    ls = run_cli("ls", "app:v1", "/d", "--store", store_url)
    assert ls.returncode == 0, ls.stderr
    lines = ls.stdout.splitlines()
    names = [line.split()[-1] for line in lines if " -> " not in line]
    assert names == ["/d/f", "/d/h", "/d/new"]
    assert any(line.startswith("-rwsr-xr-x") and line.endswith("/d/f") for line in lines)
    assert any(line.startswith("l") and line.endswith("/d/s -> f") for line in lines)
    root = run_cli("ls", last, "--store", store_url)
    assert root.returncode == 0
    assert {line.split()[-1] for line in root.stdout.splitlines()} >= {"/big", "/c", "/p", "/d"}
    assert "/gone" not in root.stdout
    assert any(line.startswith("c") and " 1,   3 " in line for line in root.stdout.splitlines())

    insp = run_cli("inspect", "app:v1", "--store", store_url)
    assert insp.returncode == 0, insp.stderr
    assert digest in insp.stdout
    assert re.search(r"entries\s+9\b", insp.stdout), insp.stdout
    assert "linux/amd64" in insp.stdout
    as_json = run_cli("inspect", digest, "--json", "--store", store_url)
    info = json.loads(as_json.stdout)
    assert info["digest"] == digest and info["entries"] == 9
    assert info["chunks"] == 5  # f (with its link h), new, and big's 768000 bytes in 3
    assert info["by_type"] == {"d": 2, "-": 4, "l": 1, "c": 1, "p": 1}
    # f and new are small (packed); big (768000 bytes, 3 chunks) is not.
    packs = info["dir_packs"]
    assert packs["layers_packed"] == packs["layers"] and packs["chunks"] == 2, packs
    assert re.search(r"dir packs\s+2 small-file blobs in \d+ packs", insp.stdout), insp.stdout
