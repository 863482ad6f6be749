"""The node's EROFS images: for each manifest (and variant), the EROFS image of its tree
and its object table, built on the node from the verified manifest the first time a
kernel-mode mount needs them, then kept in the cache directory:

    erofs/<manifest>.v<layout>.<variant>.erofs    the image (variant: "rootfs" with
                                                  security.* xattrs, "plain" without)
    erofs/<manifest>.v<layout>.<variant>.b3       its BLAKE3, checked at every mount
    erofs/<manifest>.v<layout>.<variant>.nids     u32 per manifest inode: its nid (st_ino)
    erofs/<manifest>.objects                      object name -> inode (casfs.manifest.objects)

Built here rather than at `casfs index`: the image is a function of the manifest, so a
copy fetched from the store could only be trusted by rebuilding it; building takes
about 0.4 s for 100,000 entries on a small machine (docs/benchmarks.md), once per node.
Written as transactions (temp file, rename), so a crash leaves no half image.
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from casfs.digest import hash_bytes
from casfs.erofs import EROFS_LAYOUT_VERSION, build_erofs
from casfs.errors import CasfsError
from casfs.manifest import Manifest
from casfs.manifest.objects import ObjectTable, encode_table, object_names, object_path

log = logging.getLogger(__name__)


@dataclass
class NodeImage:
    erofs: Path
    table: ObjectTable
    nids: array  # manifest inode -> EROFS nid (st_ino on the mount); increasing
    built_seconds: float  # 0 when it was already on the node


def variant_name(security_xattrs: bool) -> str:
    return "rootfs" if security_xattrs else "plain"


def node_image(cache_root: Path, manifest: Manifest, *, security_xattrs: bool) -> NodeImage:
    """The EROFS image and object table of `manifest`, built unless the node has them
    (a damaged copy is rebuilt). Blocking."""
    d = cache_root / "erofs"
    d.mkdir(mode=0o700, exist_ok=True)
    stem = f"{manifest.digest}.v{EROFS_LAYOUT_VERSION}.{variant_name(security_xattrs)}"
    erofs, check, table_path = d / f"{stem}.erofs", d / f"{stem}.b3", \
        d / f"{manifest.digest}.objects"
    nids_path = d / f"{stem}.nids"
    table = _read_table(table_path)
    nids = _read_nids(nids_path, manifest.n_inodes)
    if table is not None and nids is not None and _intact(erofs, check):
        return NodeImage(erofs, table, nids, 0.0)
    t0 = time.monotonic()
    names = object_names(manifest)
    if table is None:
        raw = encode_table(names)
        _write(table_path, raw)
        table = ObjectTable(raw)
    info = build_erofs(manifest, erofs, object_path=lambda ino: object_path(names[ino].hex()),
                       drop_security_xattrs=not security_xattrs)
    _write(nids_path, info.nids.tobytes())
    _write(check, hash_bytes(erofs.read_bytes()).encode())
    seconds = time.monotonic() - t0
    log.info("built the EROFS image of %s (%s): %d bytes in %.3fs", manifest.digest,
             variant_name(security_xattrs), info.image_size, seconds)
    return NodeImage(erofs, table, info.nids, seconds)


def _intact(erofs: Path, check: Path) -> bool:
    try:
        want = check.read_text().strip()
        return hash_bytes(erofs.read_bytes()) == want
    except OSError:
        return False


def _read_nids(path: Path, n_inodes: int) -> array | None:
    nids = array("I")
    try:
        nids.frombytes(path.read_bytes())
    except (OSError, ValueError):
        return None
    return nids if len(nids) == n_inodes + 1 else None


def _read_table(path: Path) -> ObjectTable | None:
    try:
        return ObjectTable(path.read_bytes())
    except (OSError, CasfsError):  # missing, or damaged: rebuilt
        return None


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
