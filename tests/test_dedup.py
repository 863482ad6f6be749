"""Deduplication: content already in the store is never uploaded again, across layers,
images and runs, on both backends."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from casfs.store import Store, open_store
from casfs.testing import ocibuild as ob
from casfs.testing.ocibuild import directory, file, whiteout
from indexer.chunking import SMALL_CHUNK as CHUNK_SIZE
from tests.treecheck import file_content, index, store_keys


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}", create=True)
    return open_store(request.getfixturevalue("s3_bucket_url"), create=True)


def rnd(n: int, seed: int) -> bytes:
    import random

    return random.Random(seed).randbytes(n)


BASE = [directory("usr"), directory("usr/lib"),
        *[file(f"usr/lib/lib{i}.so", rnd(3000 + i, i)) for i in range(20)],
        file("usr/lib/big.so", rnd(CHUNK_SIZE * 2 + 100, 99))]
APP_A = [directory("app"), file("app/main.py", "print('a')"), file("app/data", rnd(5000, 1000))]
APP_B = [directory("app"), file("app/main.py", "print('b')"), file("app/data", rnd(5000, 1000)),
         file("app/extra", rnd(7000, 2000))]


def test_shared_layers_upload_only_new_blobs(store: Store, tmp_path: Path) -> None:
    ob.write_oci_layout(tmp_path / "a", [BASE, APP_A], tag="t")
    ob.write_oci_layout(tmp_path / "b", [BASE, APP_B], tag="t")
    assert store_keys(store, "blobs/") == set()

    first, ma = index(f"oci:{tmp_path / 'a'}:t", store)
    blobs_a = store_keys(store, "blobs/")
    # 20 libs + 3 chunks of big.so + main.py + data
    assert first.upload.new_blobs == len(blobs_a) == 25
    assert first.upload.chunks == 25 and first.layers_reused == 0
    assert len(store_keys(store, "layers/")) == 2

    second, mb = index(f"oci:{tmp_path / 'b'}:t", store)
    new = store_keys(store, "blobs/") - blobs_a
    # only main.py (changed) and extra (new): the base layer is not read again, and
    # app/data's content is already stored
    assert len(new) == 2 == second.upload.new_blobs
    assert second.layers_reused == 1
    assert second.upload.chunks == 3  # only the new layer's files were chunked
    assert second.upload.new_bytes == len("print('b')") + 7000
    assert second.upload.uploaded_bytes > 0
    assert len(store_keys(store, "layers/")) == 3
    # the shared file's chunks are the same blobs in both manifests
    lib = "/usr/lib/big.so"
    assert ma.chunks(ma.resolve(lib)) == mb.chunks(mb.resolve(lib))
    assert file_content(mb, store, mb.resolve("/app/extra")) == rnd(7000, 2000)
    assert ma.digest != mb.digest


def test_same_image_twice_uploads_nothing(store: Store, tmp_path: Path) -> None:
    ob.write_oci_layout(tmp_path / "a", [BASE, APP_A], tag="t")
    first, _ = index(f"oci:{tmp_path / 'a'}:t", store, tag="app")
    before = store_keys(store, "")
    again, _ = index(f"oci:{tmp_path / 'a'}:t", store, tag="app")
    assert again.digest == first.digest
    assert again.upload.new_blobs == 0 and again.upload.uploaded_bytes == 0
    assert again.layers_reused == 2 and again.upload.chunks == 0
    assert store_keys(store, "") == before
    # without the layer records every layer is read again, and still nothing is uploaded
    fresh = open_store(store.url)
    third, _ = index(f"oci:{tmp_path / 'a'}:t", fresh, reuse_layers=False)
    assert third.digest == first.digest
    assert third.upload.chunks == 25 and third.upload.new_blobs == 0
    assert third.upload.uploaded_bytes == 0
    assert store_keys(store, "") == before


def test_changed_byte_in_big_file_reuses_other_chunks(store: Store, tmp_path: Path) -> None:
    big = bytearray(rnd(CHUNK_SIZE * 8, 5))
    ob.write_oci_layout(tmp_path / "v1", [[file("model.bin", bytes(big))]], tag="t")
    big[CHUNK_SIZE * 5 + 1234] ^= 0xFF
    ob.write_oci_layout(tmp_path / "v2", [[file("model.bin", bytes(big))]], tag="t")
    first, m1 = index(f"oci:{tmp_path / 'v1'}:t", store)
    assert first.upload.new_blobs == 8
    second, m2 = index(f"oci:{tmp_path / 'v2'}:t", store)
    assert second.upload.new_blobs == 1 and second.upload.new_bytes == CHUNK_SIZE
    c1, c2 = m1.chunks(m1.resolve("/model.bin")), m2.chunks(m2.resolve("/model.bin"))
    assert [a.digest == b.digest for a, b in zip(c1, c2, strict=True)] == [
        i != 5 for i in range(8)]
    assert file_content(m2, store, m2.resolve("/model.bin")) == bytes(big)
    assert len(store_keys(store, "blobs/")) == 9


def test_identical_content_within_an_image_stored_once(store: Store, tmp_path: Path) -> None:
    same = rnd(10_000, 42)
    layers = [
        [file("a", same), file("b", same), file("twice", same + same)],
        [file("c", same), whiteout("a"), file("d", os.urandom(0))],
    ]
    ob.write_oci_layout(tmp_path / "img", layers, tag="t")
    result, m = index(f"oci:{tmp_path / 'img'}:t", store)
    assert result.upload.chunks == 4 and result.upload.new_blobs == 2
    assert len(store_keys(store, "blobs/")) == 2
    assert m.chunks(m.resolve("/b")) == m.chunks(m.resolve("/c"))
    assert m.resolve("/a") == 0


def test_chunk_size_grows_with_file_size(tmp_path: Path) -> None:
    """Big files are cut into bigger chunks (fewer requests for a cold sequential read);
    the cut points stay fixed offsets, so an edit still shares the other chunks."""
    from indexer.chunking import GIB, MIB, chunk_size_for

    assert chunk_size_for(0) == chunk_size_for(64 * MIB - 1) == CHUNK_SIZE
    assert chunk_size_for(64 * MIB) == chunk_size_for(GIB - 1) == MIB
    assert chunk_size_for(GIB) == chunk_size_for(100 * GIB) == 4 * MIB

    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    block = rnd(MIB, 7)
    weights = bytearray(b"".join(i.to_bytes(8, "little") + block[8:] for i in range(64)) + b"tail")
    just_under = rnd(2 * CHUNK_SIZE, 8)
    ob.write_oci_layout(tmp_path / "v1", [[file("w.bin", bytes(weights)),
                                           file("small.bin", just_under)]], tag="t")
    first, m1 = index(f"oci:{tmp_path / 'v1'}:t", store)
    chunks = m1.chunks(m1.resolve("/w.bin"))
    assert [c.length for c in chunks] == [MIB] * 64 + [4]
    assert [c.offset for c in chunks] == [i * MIB for i in range(65)]
    assert [c.length for c in m1.chunks(m1.resolve("/small.bin"))] == [CHUNK_SIZE] * 2
    assert m1.meta["chunking"].startswith("tiered-1")
    assert file_content(m1, store, m1.resolve("/w.bin")) == bytes(weights)

    weights[40 * MIB + 99] ^= 0xFF
    ob.write_oci_layout(tmp_path / "v2", [[file("w.bin", bytes(weights))]], tag="t")
    second, m2 = index(f"oci:{tmp_path / 'v2'}:t", store)
    assert second.upload.new_blobs == 1 and second.upload.new_bytes == MIB
    assert file_content(m2, store, m2.resolve("/w.bin")) == bytes(weights)
