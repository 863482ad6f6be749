"""Image sources on local disk: an OCI image layout and a `docker save` archive (a
registry is indexer.registry; indexer.open picks the source for a reference).

A source resolves the reference to one image manifest (choosing a platform from
an image index), and hands out its config and its layers in order. Every JSON
document read is checked against the digest that names it; layer blobs are
checked by the caller while (or before) they are read.

A layout or an archive is untrusted input, like the layers in it. Every file read
must be a regular file, checked on the opened descriptor: a blob that is a symlink to
/dev/zero, a FIFO (opened without blocking, so it cannot hang the indexer), a device or
a directory is refused with an ImageError. Symlinks are followed (Bazel's rules_oci
links a layout's blobs into its output tree), since what they reach is then held to the
same rules and hashed against its digest. JSON documents are read to MAX_JSON (configs
to MAX_CONFIG), never further; a layer blob must be as long as its descriptor says. In
a docker archive, blobs and JSON documents must be regular (non-sparse) tar members.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import IO

from casfs.errors import ImageError, LayerDigestMismatch
from indexer.imageref import ImageRef
from indexer.mediatypes import INDEX_TYPES, MANIFEST_TYPES
from indexer.oci import (
    MAX_CONFIG,
    MAX_JSON,
    Image,
    Layer,
    check_digest,
    config_diff_ids,
    descriptor,
    host_platform_name,
    json_list,
    json_object,
    parse_json,
    parse_json_object,
    pick_platform,
)

__all__ = [
    # Re-exported for the callers that import them from here (indexer.index, tests):
    # they live in indexer.oci.
    "Image", "Layer", "host_platform_name", "json_object",
    "open_docker_archive", "open_oci_layout", "read_regular", "open_regular",
]

MAX_ARCHIVE_MEMBERS = 100_000
"""A docker archive holds a few members per layer; more than this is not one."""
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: Path, what: str) -> tuple[int, os.stat_result]:
    """(fd, fstat) of the regular file at path, symlinks followed. Anything else (a
    device, a FIFO, a directory, a socket) is an ImageError: refused from a stat before
    it is opened, and checked again on the opened descriptor (it may have been swapped
    in between); the open never blocks (O_NONBLOCK: a FIFO with no writer)."""
    try:
        before = os.stat(path)
    except FileNotFoundError:
        raise ImageError(f"{what} is missing ({path})") from None
    except OSError as exc:
        raise ImageError(f"cannot read {what} ({path}): {exc.strerror}") from exc
    if not stat.S_ISREG(before.st_mode):
        raise ImageError(f"{what} ({path}) is {_file_kind(before.st_mode)}, not a regular file")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise ImageError(f"{what} is missing ({path})") from None
    except OSError as exc:
        raise ImageError(f"cannot read {what} ({path}): {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(f"{what} ({path}) is {_file_kind(st.st_mode)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: Path, limit: int, what: str) -> bytes:
    """The whole regular file at path, of at most `limit` bytes (ImageError beyond:
    no more than limit + 1 bytes are read, whatever its size says)."""
    fd, st = open_regular(path, what)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise ImageError(f"{what} ({path}) is larger than {limit} bytes")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise ImageError(f"cannot read {what} ({path}): {exc.strerror}") from exc
    if len(data) > limit:
        raise ImageError(f"{what} ({path}) is larger than {limit} bytes")
    return data


def _open_blob(path: Path, size: int, what: str) -> IO[bytes]:
    """A layer blob, open for reading: a regular file of the descriptor's size."""
    fd, st = open_regular(path, what)
    if size >= 0 and st.st_size != size:
        os.close(fd)
        raise LayerDigestMismatch(f"{what} is {st.st_size} bytes, its descriptor says {size}")
    return os.fdopen(fd, "rb")


def _descriptor_blob_path(root: Path, digest: str) -> Path:
    algo, _, hex_ = digest.partition(":")
    if algo not in ("sha256", "sha512") or not hex_.isalnum() or not hex_.isascii():
        raise ImageError(f"bad digest {digest!r} in image layout {root}")
    return root / "blobs" / algo / hex_


def open_oci_layout(ref: ImageRef, platform: str | None = None) -> Image:
    root = Path(ref.location)
    if not (root / "index.json").exists() or not (root / "oci-layout").exists():
        raise ImageError(f"{root} is not an OCI image layout (no index.json / oci-layout)")
    parse_json_object(read_regular(root / "oci-layout", MAX_JSON, f"{root}/oci-layout"),
                      f"{root}/oci-layout")

    def read_blob(digest: str, what: str, limit: int = MAX_JSON) -> bytes:
        path = _descriptor_blob_path(root, digest)
        data = read_regular(path, limit, f"{what} {digest}")
        check_digest(digest, data, f"{what} {digest}")
        return data

    what = f"{root}/index.json"
    index = parse_json_object(read_regular(root / "index.json", MAX_JSON, what), what)
    manifests = [descriptor(m, what) for m in json_list(index, "manifests", what)]
    if ref.tag:
        chosen = [m for m in manifests
                  if json_object(m.get("annotations")).get("org.opencontainers.image.ref.name") == ref.tag]
        if not chosen:
            raise ImageError(f"tag {ref.tag!r} not found in OCI layout {root}")
    else:
        chosen = manifests
    if not chosen:
        raise ImageError(f"OCI layout {root} holds no image")
    if len(chosen) > 1 and all(m.get("mediaType") in MANIFEST_TYPES for m in chosen):
        # Several platform manifests straight in index.json.
        desc = pick_platform({"manifests": chosen}, platform, f"{root}/index.json")
    elif len(chosen) > 1:
        raise ImageError(f"OCI layout {root} holds several images: name one with oci:{root}:<tag>")
    else:
        desc = chosen[0]
    seen = 0
    while True:
        desc = descriptor(desc, what)
        media_type = desc.get("mediaType")
        data = read_blob(desc["digest"], "manifest")
        doc = parse_json_object(data, f"manifest {desc['digest']}")
        media_type = media_type or doc.get("mediaType")
        if media_type in INDEX_TYPES or "manifests" in doc:
            seen += 1
            if seen > 4:
                raise ImageError(f"image indexes nested too deep in {root}")
            desc = pick_platform(doc, platform, f"image index {desc['digest']}")
            continue
        break
    manifest_digest = desc["digest"]
    what = f"manifest {manifest_digest}"
    if not isinstance(doc.get("config"), dict):
        raise ImageError(f"{what} has no config")
    config_desc = descriptor(doc["config"], what)
    config = parse_json_object(read_blob(config_desc["digest"], "config", MAX_CONFIG),
                               "image config")
    diff_ids = config_diff_ids(config, "image config")
    layers = []
    for i, ld in enumerate(json_list(doc, "layers", what)):
        ld = descriptor(ld, what)
        path = _descriptor_blob_path(root, ld["digest"])
        size = ld.get("size", -1)
        layer_what = f"layer {ld['digest']}"
        _open_blob(path, size, layer_what).close()  # there, regular, of its size
        layers.append(Layer(
            digest=ld["digest"],
            media_type=str(ld.get("mediaType", "")),
            size=size,
            open=functools.partial(_open_blob, path, size, layer_what),
            diff_id=diff_ids[i] if i < len(diff_ids) else "",
        ))
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return Image(str(ref), config, config_desc["digest"], manifest_digest, layers, plat)


def open_docker_archive(ref: ImageRef, platform: str | None = None) -> Image:
    path = Path(ref.location)
    if not path.exists():
        raise ImageError(f"docker archive {path} not found")
    fd, st = open_regular(path, "docker archive")
    with os.fdopen(fd, "rb") as f:
        try:
            archive = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{path} is not a docker archive: {exc}") from exc
        with archive:
            members: dict[str, tarfile.TarInfo] = {}
            try:
                for n, m in enumerate(archive):
                    if n >= MAX_ARCHIVE_MEMBERS:
                        raise ImageError(f"{path} is not a docker archive: more than "
                                         f"{MAX_ARCHIVE_MEMBERS} members")
                    members[os.path.normpath(m.name)] = m
            except (tarfile.TarError, OSError) as exc:
                raise ImageError(f"{path} is not a docker archive: {exc}") from exc
            return _docker_archive_image(ref, path, (st.st_dev, st.st_ino), archive, members)


def _docker_archive_image(
    ref: ImageRef, path: Path, identity: tuple[int, int], archive: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
) -> Image:

    def member(name: str, what: str) -> tarfile.TarInfo:
        m = members.get(os.path.normpath(name))
        if m is None:
            raise ImageError(f"{what} {name} is missing from docker archive {path}")
        if not m.isfile() or m.sparse is not None or m.type == tarfile.GNUTYPE_SPARSE:
            raise ImageError(f"{what} {name} in docker archive {path} is not a regular file")
        return m

    def read(name: str, what: str, limit: int = MAX_JSON) -> bytes:
        m = member(name, what)
        if m.size > limit:
            raise ImageError(f"{what} {name} in {path} is larger than {limit} bytes")
        f = archive.extractfile(m)
        assert f is not None
        try:
            data = f.read(limit + 1)
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"cannot read {name} from docker archive {path}: {exc}") from exc
        if len(data) != m.size:
            raise ImageError(f"{what} {name} in docker archive {path} is truncated")
        return data

    manifest = parse_json(read("manifest.json", "the image list"), f"manifest.json in {path}")
    if not isinstance(manifest, list) or not manifest:
        raise ImageError(f"manifest.json in {path} lists no image")
    if not all(isinstance(e, dict) for e in manifest):
        raise ImageError(f"manifest.json in {path} is not a list of images")
    if ref.tag:
        entries = [e for e in manifest if ref.tag in (e.get("RepoTags") or [])]
        if not entries:
            raise ImageError(f"{ref.tag!r} not found in docker archive {path}")
        entry = entries[0]
    elif len(manifest) == 1:
        entry = manifest[0]
    else:
        raise ImageError(f"docker archive {path} holds several images: name one")
    config_name = entry.get("Config")
    layer_names = json_list(entry, "Layers", f"manifest.json in {path}")
    if not isinstance(config_name, str) or not all(isinstance(n, str) for n in layer_names):
        raise ImageError(f"manifest.json in {path} names no config or bad layers")
    config_bytes = read(config_name, "config", MAX_CONFIG)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = parse_json_object(config_bytes, f"config {config_name}")
    diff_ids = config_diff_ids(config, f"config {config_name}")
    if len(diff_ids) != len(layer_names):
        raise ImageError(f"docker archive {path}: {len(layer_names)} layers but "
                         f"{len(diff_ids)} diff_ids in its config")
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        m = member(name, "layer")

        def opener(m: tarfile.TarInfo = m) -> IO[bytes]:
            return io.BufferedReader(_FileSlice(path, identity, m.offset_data, m.size))

        # A docker-save layer may be stored compressed (newer engines keep the
        # registry's blob): its digest is then not the diff_id, so the layer is
        # named by the sha256 of its stored bytes; its uncompressed bytes are
        # checked against the diff_id while it is read.
        layers.append(Layer(digest="", media_type="", size=m.size, open=opener, diff_id=diff_id))
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return Image(str(ref), config, config_digest, config_digest, layers, plat)


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset+size) of a file: a member of an uncompressed tar archive,
    read with its own file handle (closed with the reader), which must still be the
    regular file the archive was read from."""

    def __init__(self, path: Path, identity: tuple[int, int], offset: int, size: int) -> None:
        fd, st = open_regular(path, "docker archive")
        if (st.st_dev, st.st_ino) != identity:
            os.close(fd)
            raise ImageError(f"docker archive {path} was replaced while it was read")
        self._f = os.fdopen(fd, "rb")
        self._f.seek(offset)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self._left)
        if n <= 0:
            return 0
        data = self._f.read(n)
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def close(self) -> None:
        self._f.close()
        super().close()
