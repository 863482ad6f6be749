"""Deterministic container image builder (no Docker engine needed).

This module owns turning in-memory descriptions of layers (:class:`Member` lists) into
byte-reproducible layer tarballs, OCI image layouts (OCI or Docker schema2 media types,
single- or multi-platform) and classic ``docker save`` archives.  It also builds a layer
holding the running interpreter's prefix so tests can run a real ``python3`` from an image.

Same inputs always give byte-identical outputs: tar headers carry only the given fields
(no user/group names), gzip headers have mtime 0 and no file name, zstd is single-threaded
and JSON is written with sorted keys and compact separators.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zstandard

__all__ = [
    "Member",
    "Layer",
    "ManifestInfo",
    "BuiltImage",
    "file",
    "directory",
    "symlink",
    "hardlink",
    "whiteout",
    "opaque_whiteout",
    "parent_dirs",
    "layer_tar",
    "compress",
    "layer_from_directory",
    "python_prefix_layer",
    "write_oci_layout",
    "write_docker_archive",
    "DEFAULT_MTIME",
    "REF_NAME_ANNOTATION",
]

MemberType = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]
Compression = Literal["gzip", "zstd", "none"]
MediaTypes = Literal["oci", "docker"]

#: Default mtime for members (2023-11-14T22:13:20Z); any fixed value keeps output stable.
DEFAULT_MTIME = 1_700_000_000
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

LAYER_MEDIA_TYPES: dict[tuple[str, str], str] = {
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
}

_TAR_TYPES: dict[str, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES: dict[str, int] = {"dir": 0o755, "symlink": 0o777}


@dataclass
class Member:
    """One tar entry of a layer. ``name`` is relative ("usr/bin/x"); a leading "/" is dropped.

    ``mode`` holds permission bits including setuid/setgid/sticky (default 0o644 for files,
    0o755 for directories, 0o777 for symlinks).  ``linkname`` is the symlink target or, for
    hardlinks, the path of the earlier member.  ``xattrs`` become ``SCHILY.xattr.<name>`` PAX
    records; ``bytes`` values may be arbitrary binary.
    """

    name: str
    type: MemberType = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = DEFAULT_MTIME
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes | str] = field(default_factory=dict)

    def tarinfo(self) -> tarfile.TarInfo:
        if self.type not in _TAR_TYPES:
            raise ValueError(f"unknown member type {self.type!r} for {self.name!r}")
        info = tarfile.TarInfo(_norm(self.name))
        info.type = _TAR_TYPES[self.type]
        info.mode = self.mode if self.mode is not None else _DEFAULT_MODES.get(self.type, 0o644)
        info.uid, info.gid = self.uid, self.gid
        info.uname = info.gname = ""
        info.mtime = self.mtime
        info.size = len(self.data) if self.type == "file" else 0
        if self.type in ("symlink", "hardlink"):
            info.linkname = _norm(self.linkname) if self.type == "hardlink" else self.linkname
        if self.type in ("char", "block"):
            info.devmajor, info.devminor = self.devmajor, self.devminor
        for key, value in sorted(self.xattrs.items()):
            if isinstance(value, bytes):
                # tarfile writes str PAX values back with surrogateescape when they are not
                # valid UTF-8 (and marks the record hdrcharset=BINARY), so bytes survive.
                value = value.decode("utf-8", "surrogateescape")
            info.pax_headers = {**info.pax_headers, "SCHILY.xattr." + key: value}
        return info


def _norm(name: str) -> str:
    name = name.strip("/")
    if not name:
        raise ValueError("member name must not be empty or '/'")
    return name


def file(name: str, data: bytes | str = b"", mode: int = 0o644, **kw: object) -> Member:
    """Shorthand for a regular file member."""
    raw = data.encode() if isinstance(data, str) else data
    return Member(name, "file", raw, mode, **kw)  # type: ignore[arg-type]


def directory(name: str, mode: int = 0o755, **kw: object) -> Member:
    """Shorthand for a directory member."""
    return Member(name, "dir", b"", mode, **kw)  # type: ignore[arg-type]


def symlink(name: str, target: str, **kw: object) -> Member:
    """Shorthand for a symlink member (target kept verbatim, may be absolute)."""
    return Member(name, "symlink", linkname=target, **kw)  # type: ignore[arg-type]


def hardlink(name: str, target: str, **kw: object) -> Member:
    """Shorthand for a hardlink to an earlier member ``target``."""
    return Member(name, "hardlink", linkname=target, **kw)  # type: ignore[arg-type]


def whiteout(path: str, mtime: int = DEFAULT_MTIME) -> Member:
    """Whiteout deleting ``path`` from lower layers (``dir/.wh.name``)."""
    head, _, tail = _norm(path).rpartition("/")
    return Member(f"{head}/{WHITEOUT_PREFIX}{tail}" if head else WHITEOUT_PREFIX + tail,
                  "file", mode=0o644, mtime=mtime)


def opaque_whiteout(dirpath: str, mtime: int = DEFAULT_MTIME) -> Member:
    """Opaque whiteout hiding all lower-layer content of ``dirpath`` (``dir/.wh..wh..opq``)."""
    d = dirpath.strip("/")
    return Member(f"{d}/{OPAQUE_WHITEOUT}" if d else OPAQUE_WHITEOUT, "file", mode=0o644,
                  mtime=mtime)


def parent_dirs(path: str, mode: int = 0o755, mtime: int = DEFAULT_MTIME) -> list[Member]:
    """Directory members for every ancestor of ``path`` (outermost first), excluding it."""
    parts = _norm(path).split("/")[:-1]
    return [directory("/".join(parts[: i + 1]), mode, mtime=mtime) for i in range(len(parts))]


def layer_tar(members: Iterable[Member]) -> bytes:
    """Uncompressed PAX tar of ``members`` in the given order (order is significant)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT,
                      encoding="utf-8") as tar:
        for m in members:
            info = m.tarinfo()
            tar.addfile(info, io.BytesIO(m.data) if m.type == "file" else None)
    return buf.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    """Reproducibly compress a layer tar ("gzip" with mtime 0, "zstd" level 3, or "none")."""
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Layer:
    """A layer: its uncompressed tar plus how it is compressed in the image."""

    tar: bytes
    compression: Compression = "gzip"
    _blob: bytes | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_members(cls, members: Iterable[Member], compression: Compression = "gzip") -> Layer:
        return cls(layer_tar(members), compression)

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            self._blob = compress(self.tar, self.compression)
        return self._blob

    @property
    def diff_id(self) -> str:
        """sha256 of the uncompressed tar (goes into the config's rootfs.diff_ids)."""
        return _sha256(self.tar)

    @property
    def digest(self) -> str:
        """sha256 of the (compressed) blob."""
        return _sha256(self.blob)

    def media_type(self, media_types: MediaTypes = "oci") -> str:
        try:
            return LAYER_MEDIA_TYPES[(media_types, self.compression)]
        except KeyError:
            raise ValueError(
                f"no {media_types} media type for {self.compression} layers") from None


LayerSpec = Layer | Sequence[Member]


def _as_layer(spec: LayerSpec, compression: Compression) -> Layer:
    return spec if isinstance(spec, Layer) else Layer.from_members(spec, compression)


@dataclass
class ManifestInfo:
    """What was written for one platform's image manifest."""

    digest: str
    size: int
    media_type: str
    config_digest: str
    os: str
    architecture: str
    layers: list[Layer]


@dataclass
class BuiltImage:
    """Result of :func:`write_oci_layout`; ``digest`` is the descriptor index.json tags."""

    path: Path
    tag: str
    digest: str
    size: int
    media_type: str
    manifests: list[ManifestInfo]


def make_config(layers: Sequence[Layer], config: dict | None = None, os_name: str = "linux",
                architecture: str = "amd64") -> dict:
    """Image config: ``config`` (a full config or just its ``config`` section) plus the
    platform, ``rootfs.diff_ids`` and one history entry per layer (unless given)."""
    cfg: dict = dict(config or {})
    if cfg and not ({"rootfs", "architecture", "os", "config", "history"} & cfg.keys()):
        cfg = {"config": cfg}  # caller passed only the runtime section (Env, Cmd, ...)
    cfg.setdefault("created", "1970-01-01T00:00:00Z")
    cfg.setdefault("architecture", architecture)
    cfg.setdefault("os", os_name)
    cfg.setdefault("config", {})
    cfg["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    cfg.setdefault("history", [
        {"created": "1970-01-01T00:00:00Z", "created_by": f"casfs.testing.ocibuild layer {i}"}
        for i in range(len(layers))
    ])
    return cfg


class _BlobWriter:
    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes) -> tuple[str, int]:
        digest = _sha256(data)
        target = self.dir / digest.split(":", 1)[1]
        if not (target.exists() and target.stat().st_size == len(data)):
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return digest, len(data)


def _write_manifest(blobs: _BlobWriter, layers: list[Layer], config: dict | None,
                    media_types: MediaTypes, os_name: str, arch: str) -> ManifestInfo:
    cfg_bytes = _json(make_config(layers, config, os_name, arch))
    cfg_digest, cfg_size = blobs.put(cfg_bytes)
    docker = media_types == "docker"
    layer_descs = []
    for layer in layers:
        mt = layer.media_type(media_types)
        digest, size = blobs.put(layer.blob)
        layer_descs.append({"mediaType": mt, "digest": digest, "size": size})
    manifest_mt = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_mt,
        "config": {"mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                   "digest": cfg_digest, "size": cfg_size},
        "layers": layer_descs,
    }
    digest, size = blobs.put(_json(manifest))
    return ManifestInfo(digest, size, manifest_mt, cfg_digest, os_name, arch, layers)


def write_oci_layout(
    path: str | os.PathLike[str],
    layers: Sequence[LayerSpec] = (),
    config: dict | None = None,
    tag: str = "latest",
    media_types: MediaTypes = "oci",
    platforms: Sequence[tuple[str, str, Sequence[LayerSpec]]] | None = None,
    compression: Compression = "gzip",
    os_name: str = "linux",
    architecture: str = "amd64",
) -> BuiltImage:
    """Write an OCI image layout at ``path`` and return what was written.

    ``layers`` are :class:`Layer` objects or member lists (compressed with ``compression``).
    With ``platforms`` = [(os, arch, layers), ...] an image index (manifest list for
    ``media_types="docker"``) is stored as a blob and index.json tags that instead.
    index.json is rewritten (one tagged entry); existing blobs are kept.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    blobs = _BlobWriter(root)
    (root / "oci-layout").write_bytes(_json({"imageLayoutVersion": OCI_LAYOUT_VERSION}))
    if platforms is None:
        info = _write_manifest(blobs, [_as_layer(s, compression) for s in layers], config,
                               media_types, os_name, architecture)
        top_digest, top_size, top_mt, infos = info.digest, info.size, info.media_type, [info]
    else:
        if layers:
            raise ValueError("pass either layers or platforms, not both")
        infos = [
            _write_manifest(blobs, [_as_layer(s, compression) for s in plat_layers], config,
                            media_types, plat_os, plat_arch)
            for plat_os, plat_arch, plat_layers in platforms
        ]
        top_mt = DOCKER_MANIFEST_LIST if media_types == "docker" else OCI_INDEX
        nested = {
            "schemaVersion": 2,
            "mediaType": top_mt,
            "manifests": [
                {"mediaType": i.media_type, "digest": i.digest, "size": i.size,
                 "platform": {"os": i.os, "architecture": i.architecture}}
                for i in infos
            ],
        }
        top_digest, top_size = blobs.put(_json(nested))
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": top_mt, "digest": top_digest, "size": top_size,
                       "annotations": {REF_NAME_ANNOTATION: tag}}],
    }
    (root / "index.json").write_bytes(_json(index))
    return BuiltImage(root, tag, top_digest, top_size, top_mt, infos)


def _archive_add(tar: tarfile.TarFile, name: str, data: bytes | None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 0
    info.uname = info.gname = ""
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
    else:
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))


def write_docker_archive(
    path: str | os.PathLike[str],
    layers: Sequence[LayerSpec],
    config: dict | None = None,
    repo_tag: str = "sample:latest",
    os_name: str = "linux",
    architecture: str = "amd64",
) -> str:
    """Write a classic ``docker save`` tarball (``<id>/layer.tar``, ``<config>.json``,
    ``manifest.json``, ``repositories``) with uncompressed layers; returns the config digest.
    """
    lays = [_as_layer(s, "none") for s in layers]
    cfg_bytes = _json(make_config(lays, config, os_name, architecture))
    cfg_hex = hashlib.sha256(cfg_bytes).hexdigest()
    entries: list[tuple[str, bytes | None]] = []
    layer_paths = []
    parent = ""
    for layer in lays:
        # v1-style layer id: a chain over the diff ids, so repeated layers stay distinct.
        layer_id = hashlib.sha256(f"{parent}\n{layer.diff_id}".encode()).hexdigest()
        v1 = {"id": layer_id, "created": "1970-01-01T00:00:00Z"}
        if parent:
            v1["parent"] = parent
        entries += [(layer_id, None), (f"{layer_id}/VERSION", b"1.0"),
                    (f"{layer_id}/json", _json(v1)), (f"{layer_id}/layer.tar", layer.tar)]
        layer_paths.append(f"{layer_id}/layer.tar")
        parent = layer_id
    entries.append((f"{cfg_hex}.json", cfg_bytes))
    entries.append(("manifest.json", _json(
        [{"Config": f"{cfg_hex}.json", "RepoTags": [repo_tag], "Layers": layer_paths}])))
    repo, _, tagname = repo_tag.rpartition(":")
    if repo and parent:
        entries.append(("repositories", _json({repo: {tagname: parent}})))
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in entries:
            _archive_add(tar, name, data)
    return "sha256:" + cfg_hex


def _read_xattrs(path: str) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in sorted(names):
        if name == "security.selinux":
            continue
        with contextlib.suppress(OSError):
            out[name] = os.getxattr(path, name, follow_symlinks=False)
    return out


def layer_from_directory(
    src: str | os.PathLike[str],
    prefix: str = "",
    mtime: int | None = None,
    exclude: Callable[[str], bool] | None = None,
    xattrs: bool = False,
    keep_owner: bool = False,
) -> list[Member]:
    """Members for the tree under ``src`` (not ``src`` itself), placed under ``prefix``.

    Walks in sorted order; keeps modes, symlinks, hardlinks (the first path in walk order
    holds the data, later ones link to it), devices and fifos.  ``mtime`` fixes every
    timestamp (else on-disk mtimes, truncated to seconds); owners are 0:0 unless
    ``keep_owner``.  ``exclude(rel)`` gets paths relative to ``src`` ("a/b"); an excluded
    directory is skipped entirely.  ``xattrs`` copies extended attributes.
    """
    base = Path(src)
    pre = prefix.strip("/")
    members: list[Member] = []
    seen: dict[tuple[int, int], str] = {}

    def walk(rel: str) -> None:
        with os.scandir(base / rel if rel else base) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            r = f"{rel}/{entry.name}" if rel else entry.name
            if exclude is not None and exclude(r):
                continue
            st = entry.stat(follow_symlinks=False)
            name = f"{pre}/{r}" if pre else r
            m = Member(name, mode=stat.S_IMODE(st.st_mode),
                       uid=st.st_uid if keep_owner else 0, gid=st.st_gid if keep_owner else 0,
                       mtime=int(st.st_mtime) if mtime is None else mtime)
            if xattrs:
                m.xattrs = _read_xattrs(entry.path)
            fmt = stat.S_IFMT(st.st_mode)
            if fmt == stat.S_IFDIR:
                m.type = "dir"
                members.append(m)
                walk(r)
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                m.type, m.linkname = "hardlink", seen[key]
            elif fmt == stat.S_IFLNK:
                m.type, m.linkname = "symlink", os.readlink(entry.path)
            elif fmt == stat.S_IFREG:
                m.type, m.data = "file", Path(entry.path).read_bytes()
            elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
                m.type = "char" if fmt == stat.S_IFCHR else "block"
                m.devmajor, m.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
            elif fmt == stat.S_IFIFO:
                m.type = "fifo"
            else:
                continue  # sockets and the like cannot go in a layer
            if st.st_nlink > 1:
                seen.setdefault(key, name)
            members.append(m)

    walk("")
    return members


_PY_SKIP_DIRS = {"site-packages", "test", "idlelib", "tkinter", "ensurepip", "turtledemo"}


def python_prefix_layer(
    prefix: str | None = None,
    include_pycache: bool = False,
    include_config_dir: bool = False,
    mtime: int | None = DEFAULT_MTIME,
) -> list[Member]:
    """Members holding the interpreter prefix (default ``sys.base_prefix``) at its own path.

    Includes ``bin/python3*`` (not ``*-config``/gdb helpers), ``lib/libpython3.X*.so*`` and
    the stdlib ``lib/python3.X`` minus site-packages, test, idlelib, tkinter, ensurepip,
    turtledemo, ``__pycache__`` (unless ``include_pycache``) and the 40 MB
    ``config-3.X-*`` static-lib dir (unless ``include_config_dir``).  An empty
    ``site-packages`` dir is kept.  To run it from an extracted root ``R``:
    ``PYTHONHOME=<prefix> LD_LIBRARY_PATH=R<prefix>/lib R<prefix>/bin/python3`` (the binary's
    RUNPATH is absolute, so without LD_LIBRARY_PATH the host's libpython is used), or chroot.
    """
    pfx = Path(prefix or sys.base_prefix)
    ver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    rel_pfx = str(pfx).strip("/")
    members = parent_dirs(rel_pfx + "/x", mtime=DEFAULT_MTIME if mtime is None else mtime)

    def only(names: set[str]) -> Callable[[str], bool]:
        return lambda rel: rel.split("/", 1)[0] not in names

    bin_names = {p.name for p in (pfx / "bin").glob("python3*")
                 if not p.name.endswith(("-config", ".py"))}
    lib_names = {p.name for p in (pfx / "lib").glob(f"lib{ver}*.so*")}

    def stdlib_exclude(rel: str) -> bool:
        parts = rel.split("/")
        if parts[0] != ver:
            return rel not in lib_names
        if len(parts) == 1:
            return False
        if len(parts) >= 3 and parts[1] == "site-packages":
            return True
        if len(parts) == 2 and (parts[1] in _PY_SKIP_DIRS - {"site-packages"}
                                or (not include_config_dir
                                    and parts[1].startswith("config-"))):
            return True
        return not include_pycache and "__pycache__" in parts

    for sub, excl in (("bin", only(bin_names)), ("lib", stdlib_exclude)):
        members.append(_dir_member(pfx / sub, f"{rel_pfx}/{sub}", mtime))
        members += layer_from_directory(pfx / sub, f"{rel_pfx}/{sub}", mtime, excl)
    return members


def _dir_member(path: Path, name: str, mtime: int | None) -> Member:
    st = path.stat()
    return directory(name, stat.S_IMODE(st.st_mode),
                     mtime=int(st.st_mtime) if mtime is None else mtime)
