"""Hostile input: manifests and layers built to hurt. Every one is refused with a
casfs error (never another exception, never a wrong answer), and fuzzing the manifest
reader and the tar ingestion finds nothing else. Cases the fuzzers once found are kept
at the bottom as regression tests."""

from __future__ import annotations

import contextlib
import io
import struct
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casfs.errors import CasfsError, ManifestError
from casfs.manifest import Manifest
from casfs.manifest.layout import HEADER_SIZE
from casfs.store import Store, open_store
from casfs.testing.doubles import MemoryBackend
from casfs.testing.hostile import GOOD, patch_chunk, patch_dirent, patch_inode
from casfs.testing.hostile import SEED_TAR as TAR
from casfs.testing.hostile import exercise as _exercise
from casfs.testing.ocibuild import Layer, file, write_oci_layout
from indexer.index import index_image
from tests.treecheck import run_cli


def test_the_good_manifest_validates() -> None:
    Manifest(GOOD).validate()


@pytest.mark.parametrize("name,make,match", [
    ("cycle to root", lambda: patch_dirent(GOOD, 0, ino=1), "two parents"),
    ("dir with two parents", lambda: patch_dirent(GOOD, 1, ino=2), "two parents|sorted"),
    ("name with slash", lambda: patch_dirent(GOOD, 2, name=b"/"), "invalid entry name"),
    ("name with NUL", lambda: patch_dirent(GOOD, 2, name=b"\0"), "invalid entry name"),
    ("unsorted names", lambda: patch_dirent(GOOD, 4, name=b"0"), "sorted"),
    ("overlapping chunks", lambda: patch_chunk(GOOD, 1, offset=150), "overlap"),
    ("zero-length chunk", lambda: patch_chunk(GOOD, 1, length=0), "overlap"),
    ("size disagrees", lambda: patch_inode(GOOD, 4, size=301), "disagrees"),
    ("chunks out of range", lambda: patch_inode(GOOD, 4, count=99), "out of range"),
    ("dirents out of range", lambda: patch_inode(GOOD, 1, count=99), "out of range"),
    ("entry inode out of range", lambda: patch_dirent(GOOD, 0, ino=999), "out of range"),
    ("symlink target out of range", lambda: patch_inode(GOOD, 6, str_off=1 << 30), "out of range"),
    ("unknown file type", lambda: patch_inode(GOOD, 5, mode=0o170644), "unknown file type"),
    ("truncated", lambda: GOOD[:-3], "disagrees with its header"),
    ("bad magic", lambda: b"X" + GOOD[1:], "magic"),
])
def test_hostile_manifest_refused(name: str, make, match: str) -> None:
    with pytest.raises(ManifestError, match=match):
        Manifest(make()).validate()


def test_mounting_a_hostile_manifest_fails_cleanly(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"
    store = open_store(url, create=True)
    digest = store.put_manifest(patch_dirent(GOOD, 0, ino=1))
    store.set_tag("evil", digest)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", "evil", str(mnt), "--store", url, "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode != 0
    assert "two parents" in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "c" / "manifests" / digest).exists(), "never kept in the cache"


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_fuzz_manifest_reader(mutations: list[tuple[int, int]]) -> None:
    buf = bytearray(GOOD)
    for at, value in mutations:
        buf[at] = value
    with contextlib.suppress(ManifestError):
        _exercise(Manifest(bytes(buf)))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=HEADER_SIZE + 400))
def test_fuzz_manifest_reader_garbage(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        _exercise(Manifest(data))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(TAR) - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_tar_ingestion(tmp_path_factory: pytest.TempPathFactory,
                            mutations: list[tuple[int, int]]) -> None:
    """A mangled layer either indexes (and its manifest validates) or fails with a casfs
    error: never another exception."""
    tmp = tmp_path_factory.mktemp("fuzz")
    buf = bytearray(TAR)
    for at, value in mutations:
        buf[at] = value
    # Write the mangled tar as an uncompressed layer; the config's diff_id follows it, so
    # only the tar parsing and the layer rules are under test.
    write_oci_layout(tmp / "img", [Layer(bytes(buf), compression="none")], tag="v")
    store = open_store(f"file://{tmp / 'store'}", create=True)
    try:
        result = index_image(f"oci:{tmp / 'img'}:v", store)
    except CasfsError:
        return
    Manifest(store.get_manifest(result.digest)).validate()


# -- regressions: inputs the fuzzers or reviews found --------------------------

def test_regression_tar_member_with_huge_size_field() -> None:
    """A header claiming a 10 TB member over a short stream is a corrupt layer."""
    info = tarfile.TarInfo("big")
    info.size = 10 << 40
    raw = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    with pytest.raises(CasfsError):
        from indexer.layer import read_layer
        from indexer.upload import BlobUploader

        uploader = BlobUploader(Store(MemoryBackend()))
        read_layer(io.BytesIO(bytes(raw) + b"\0" * 1024), uploader, "layer")


def test_regression_manifest_header_counts_overflow() -> None:
    buf = bytearray(GOOD)
    struct.pack_into("<I", buf, 16, 0xFFFFFFFF)  # n_inodes
    with pytest.raises(ManifestError):
        Manifest(bytes(buf))


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_decompression_bomb_refused(tmp_path: Path, compression: str) -> None:
    """200 MB of zeros compresses to well under 1 MB: past the expansion cap, refused,
    nothing published."""
    zeros = b"\0" * (200 << 20)
    write_oci_layout(tmp_path / "bomb", [Layer.from_members([file("zeros", zeros)], compression=compression)],
                     tag="v")
    del zeros
    url = f"file://{tmp_path / 'store'}"
    proc = run_cli("index", f"oci:{tmp_path / 'bomb'}:v", "--store", url,
                   env={"CASFS_MAX_EXPANSION": "100"})
    assert proc.returncode == 6 and "decompression bomb" in proc.stderr
    assert proc.stderr.count("\n") == 1
    store = open_store(url)
    assert not list(store.backend.list("manifests/")) and not list(store.backend.list("layers/"))


def test_layer_size_cap(tmp_path: Path) -> None:
    write_oci_layout(tmp_path / "big", [[file("f", b"x" * (3 << 20))]], tag="v")
    proc = run_cli("index", f"oci:{tmp_path / 'big'}:v", "--store", f"file://{tmp_path / 's'}",
                   env={"CASFS_MAX_LAYER_BYTES": str(1 << 20)})
    assert proc.returncode == 6 and "CASFS_MAX_LAYER_BYTES" in proc.stderr
