"""`casfs index tree:<path>`: a plain directory becomes a manifest that mounts like an image.

The indexed tree is compared, entry by entry (type, mode, owner, time, xattrs, content,
hardlinks, symlink targets, devices), with the directory itself, read back from the store
and through real mounts in both serving modes; re-indexing after one file changed uploads
only that file's new chunks; symlinks are never followed.
"""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import pytest

from casfs.errors import BadImageRef, ImageError
from casfs.store import Store, open_store
from indexer.chunking import MIB, chunk_size_for
from indexer.imageref import parse_image_ref
from indexer.index import index_image
from indexer.tree import MEDIA_TYPE
from tests.mounthelp import cli, mounted
from tests.reference import diff_snapshots, snapshot
from tests.treecheck import index, manifest_snapshot, store_keys

T0 = 1_700_000_000


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def make_tree(root: Path) -> Path:
    """A directory with every kind of entry a tree keeps, odd modes, owners and times."""
    root.mkdir()
    (root / "weights").mkdir()
    big = root / "weights" / "model-00001-of-00002.safetensors"
    big.write_bytes(rnd(3 * MIB + 12345, 1))  # 256 KiB chunks: 13 of them
    (root / "weights" / "model-00002-of-00002.safetensors").write_bytes(rnd(70 * MIB, 2))
    (root / "weights" / "config.json").write_text('{"dim": 64}\n')
    (root / "tokenizer").mkdir(mode=0o750)
    for i in range(30):
        (root / "tokenizer" / f"vocab{i:02}.txt").write_bytes(rnd(1000 + i, 100 + i))
    (root / "empty").write_bytes(b"")
    os.link(root / "weights" / "config.json", root / "config-link.json")
    os.symlink("weights/config.json", root / "inside-link")
    os.symlink("/etc/passwd", root / "outside-link")
    os.symlink("../../../../../nowhere", root / "dangling-link")
    os.symlink("tokenizer", root / "dir-link")
    (root / "setuid-tool").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "setuid-tool", 0o4755)
    (root / "sticky").mkdir()
    os.chmod(root / "sticky", 0o1777)
    os.mkfifo(root / "fifo", 0o640)
    os.setxattr(root / "weights" / "config.json", "user.origin", b"synthetic")
    if os.geteuid() == 0:
        os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chown(root / "tokenizer", 1234, 5678)
        os.lchown(root / "outside-link", 42, 43)
    for path in [*root.rglob("*"), root]:
        os.utime(path, ns=(T0 * 10**9, T0 * 10**9 + 123), follow_symlinks=False)
    return root


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}", create=True)
    return open_store(request.getfixturevalue("s3_bucket_url"), create=True)


def test_tree_ref_parses() -> None:
    ref = parse_image_ref("tree:/data/models/llama:v2")
    assert (ref.transport, ref.location) == ("tree", "/data/models/llama:v2")
    assert str(ref) == "tree:/data/models/llama:v2"
    with pytest.raises(BadImageRef):
        parse_image_ref("tree:")


def test_tree_indexes_every_entry(store: Store, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "model")
    result, m = index(f"tree:{root}", store, tag="model-v1")
    assert store.get_tag("model-v1") == result.digest
    want = snapshot(root)
    got = manifest_snapshot(m, store)
    assert diff_snapshots(want, got) == []
    # The tree is one pseudo-layer, named by its record, with a record and directory packs.
    (layer,) = m.meta["layers"]
    assert layer["media_type"] == MEDIA_TYPE and layer["digest"].startswith("sha256:")
    assert m.meta["source"] == "tree" and str(root) not in str(m.meta)
    assert store.get_layer_record(layer["digest"]) is not None
    assert store.get_pack_index(layer["digest"], 1 << 30) is not None
    assert result.packs.files >= 30
    # Chunked like any image's files: a 70 MiB weights file in 4 MiB chunks (18 of them).
    ino = m.resolve("/weights/model-00002-of-00002.safetensors")
    assert len(m.chunks(ino)) == 18 and result.upload.chunks >= 18 + 13


def test_weight_files_get_big_chunks() -> None:
    """Files of 64 MiB to 1 GiB get 1 MiB chunks (a big library is paged through), but 4
    MiB when named like weights (read front to back, or a tensor at a time)."""
    assert chunk_size_for(70 * MIB, "libtorch_cpu.so") == MIB
    assert chunk_size_for(70 * MIB, "w/model-00001-of-00004.safetensors") == 4 * MIB
    assert chunk_size_for(70 * MIB, "consolidated.00.pth") == 4 * MIB
    assert chunk_size_for(70 * MIB, "data.bin") == MIB  # .bin is too common a name
    assert chunk_size_for(1 << 20, "tiny.safetensors") == 256 * 1024
    assert chunk_size_for(2 << 30, "anything") == 4 * MIB


def test_same_tree_elsewhere_same_manifest(store: Store, tmp_path: Path) -> None:
    a = make_tree(tmp_path / "a")
    first, _ = index(f"tree:{a}", store)
    b = tmp_path / "elsewhere" / "b"
    b.parent.mkdir()
    os.rename(a, b)
    again, _ = index(f"tree:{b}", store)
    assert again.digest == first.digest
    assert again.upload.new_blobs == 0 and again.upload.uploaded_bytes == 0
    assert again.layers_reused == 1 and again.packs.packs == 0


def test_reindex_after_one_change_uploads_only_its_chunks(store: Store, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "model")
    first, m1 = index(f"tree:{root}", store)
    blobs = store_keys(store, "blobs/")
    # One tensor re-saved: bytes changed inside the second chunk of a 70 MiB shard.
    shard = root / "weights" / "model-00002-of-00002.safetensors"
    with open(shard, "r+b") as f:
        f.seek(4 * MIB + 17)
        f.write(b"changed tensor")
    second, m2 = index(f"tree:{root}", store)
    assert second.digest != first.digest
    new = store_keys(store, "blobs/") - blobs
    assert len(new) == 1 == second.upload.new_blobs
    assert second.upload.new_bytes == 4 * MIB
    assert second.packs.packs == 0 or second.packs.bytes < 1 * MIB  # packs hold small files
    assert diff_snapshots(snapshot(root), manifest_snapshot(m2, store)) == []


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_bytes(b"do not index me")
    root = tmp_path / "tree"
    root.mkdir()
    os.symlink(secret, root / "dir")
    os.symlink(secret / "key", root / "file")
    os.symlink("loop", root / "loop")
    _, m = index(f"tree:{root}", store)
    assert m.readlink(m.resolve("/dir")) == os.fsencode(secret)
    assert m.readlink(m.resolve("/file")) == os.fsencode(secret / "key")
    assert m.readlink(m.resolve("/loop")) == b"loop"
    assert sorted(name for _, name, _ in m.entries(1)) == [b"dir", b"file", b"loop"]
    assert store_keys(store, "blobs/") == set()  # nothing behind a link was read


def test_root_symlink_given_on_the_command_line_is_resolved(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    root = tmp_path / "real"
    root.mkdir()
    (root / "a").write_text("x")
    os.symlink(root, tmp_path / "current")
    _, m = index(f"tree:{tmp_path / 'current'}", store)
    assert m.resolve("/a")


def test_not_a_directory(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ImageError, match="not a directory"):
        index_image(f"tree:{tmp_path / 'f'}", store)
    with pytest.raises(ImageError, match="does not exist"):
        index_image(f"tree:{tmp_path / 'missing'}", store)
    assert store_keys(store, "manifests/") == set()
    assert store_keys(store, "locks/") == set()


def test_unreadable_file_fails_and_publishes_nothing(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    store = open_store(f"file://{tmp_path / 'store'}", create=True)
    root = tmp_path / "tree"
    root.mkdir()
    (root / "secret").write_text("x")
    os.chmod(root / "secret", 0)
    with pytest.raises(ImageError, match="cannot open"):
        index_image(f"tree:{root}", store, tag="t")
    assert store_keys(store, "manifests/") == set() and store_keys(store, "tags/") == set()


def test_cli_index_tree_prints_ref_last(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "model")
    store_url = f"file://{tmp_path / 'store'}"
    proc = cli("index", f"tree:{root}", "--store", store_url, "--tag", "m1")
    assert proc.returncode == 0, proc.stderr
    ref = proc.stdout.strip().splitlines()[-1]
    assert ref.startswith("blake3:")
    store = open_store(store_url)
    assert "blake3:" + store.get_tag("m1") == ref


def test_tree_mounts_in_every_mode(mode: str, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "model")
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url, create=True)
    result = index_image(f"tree:{root}", store, tag="model")
    with mounted("model", tmp_path / "mnt", store_url, tmp_path / "cache", mode=mode) as mnt:
        got = snapshot(mnt.mountpoint)
    want = snapshot(root)
    # The mountpoint's own entry is the manifest's root (mode, owner, time): compared too.
    assert diff_snapshots(want, got) == [], result.ref
