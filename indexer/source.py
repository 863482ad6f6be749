"""Image sources on local disk: an OCI image layout and a `docker save` archive (a
registry is indexer.registry; open_image dispatches on the transport).

A source resolves the reference to one image manifest (choosing a platform from
an image index), and hands out its config and its layers in order. Every JSON
document read is checked against the digest that names it; layer blobs are
checked by the caller while (or before) they are read.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform as host_platform
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from casfs.errors import ImageError, LayerDigestMismatch
from indexer.imageref import ImageRef
from indexer.mediatypes import INDEX_TYPES, LAYER_COMPRESSION, MANIFEST_TYPES

if TYPE_CHECKING:
    from indexer.registry import RegistryOptions

MAX_JSON = 16 << 20


@dataclass
class Layer:
    digest: str  # "sha256:<hex>" of the bytes open() returns
    media_type: str
    size: int  # -1 when unknown
    open: Callable[[], IO[bytes]]
    diff_id: str = ""  # sha256 of the uncompressed tar, from the config
    # True when open() checks the bytes against `digest` itself while they stream (a
    # registry blob: raises LayerDigestMismatch at the end of the stream), so the digest
    # can name the layer before a byte is read; False for a local file, which the
    # indexer hashes first.
    verifies_digest: bool = False

    @property
    def compression(self) -> str:
        """gzip, zstd, none, or "detect" (sniff the magic bytes)."""
        return LAYER_COMPRESSION.get(self.media_type, "detect")


@dataclass
class Image:
    ref: str
    config: dict[str, Any]
    config_digest: str
    manifest_digest: str
    layers: list[Layer]
    platform: str


def host_platform_name() -> str:
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        host_platform.machine(), host_platform.machine()
    )
    return f"linux/{arch}"


def check_digest(digest: str, data: bytes, what: str) -> None:
    algo, _, want = digest.partition(":")
    if algo not in ("sha256", "sha512"):
        raise ImageError(f"{what}: unsupported digest algorithm {algo!r}")
    if hashlib.new(algo, data).hexdigest() != want:
        raise LayerDigestMismatch(f"{what} does not match its digest {digest}")


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def json_list(doc: dict[str, Any], key: str, what: str) -> list[Any]:
    """doc[key] as a list ([] when absent)."""
    value = doc.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ImageError(f"{what}: {key!r} is not a list")
    return value


def json_object(value: Any) -> dict[str, Any]:
    """A JSON value that should be an object, or {} when it is anything else."""
    return value if isinstance(value, dict) else {}


def descriptor(desc: Any, what: str) -> dict[str, Any]:
    """A content descriptor, checked to carry a digest (and a sane size when it has one)."""
    if not isinstance(desc, dict) or not isinstance(desc.get("digest"), str):
        raise ImageError(f"{what}: a descriptor has no digest")
    size = desc.get("size", -1)
    if not isinstance(size, int) or isinstance(size, bool):
        raise ImageError(f"{what}: descriptor {desc['digest']} has a bad size {size!r}")
    return desc


def pick_platform(index: dict[str, Any], want: str | None, what: str) -> dict[str, Any]:
    manifests = [descriptor(d, what) for d in json_list(index, "manifests", what)]
    if not manifests:
        raise ImageError(f"{what} lists no manifests")
    target = want or host_platform_name()
    os_, _, rest = target.partition("/")
    arch, _, variant = rest.partition("/")
    offered = []
    for desc in manifests:
        plat = json_object(desc.get("platform"))
        offered.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if plat.get("os") == os_ and plat.get("architecture") == arch and (
            not variant or plat.get("variant") == variant
        ):
            return desc
    raise ImageError(f"{what} has no image for platform {target} (offers {', '.join(offered)})")


def config_diff_ids(config: dict[str, Any], what: str) -> list[str]:
    diff_ids = json_list(json_object(config.get("rootfs")), "diff_ids", what)
    if not all(isinstance(d, str) for d in diff_ids):
        raise ImageError(f"{what}: rootfs.diff_ids holds something other than digests")
    return diff_ids


def _descriptor_blob_path(root: Path, digest: str) -> Path:
    algo, _, hex_ = digest.partition(":")
    if algo not in ("sha256", "sha512") or not hex_.isalnum():
        raise ImageError(f"bad digest {digest!r} in image layout {root}")
    return root / "blobs" / algo / hex_


def open_oci_layout(ref: ImageRef, platform: str | None = None) -> Image:
    root = Path(ref.location)
    if not (root / "index.json").is_file() or not (root / "oci-layout").is_file():
        raise ImageError(f"{root} is not an OCI image layout (no index.json / oci-layout)")

    def read_blob(digest: str, what: str) -> bytes:
        path = _descriptor_blob_path(root, digest)
        try:
            if path.stat().st_size > MAX_JSON:
                raise ImageError(f"{what} {digest} is too large")
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"{what} {digest} is missing from {root}") from None
        check_digest(digest, data, f"{what} {digest}")
        return data

    try:
        index_bytes = (root / "index.json").read_bytes()
    except OSError as exc:
        raise ImageError(f"cannot read {root}/index.json: {exc.strerror}") from exc
    what = f"{root}/index.json"
    index = parse_json_object(index_bytes, what)
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
    config = parse_json_object(read_blob(config_desc["digest"], "config"), "image config")
    diff_ids = config_diff_ids(config, "image config")
    layers = []
    for i, ld in enumerate(json_list(doc, "layers", what)):
        ld = descriptor(ld, what)
        path = _descriptor_blob_path(root, ld["digest"])
        if not path.is_file():
            raise ImageError(f"layer {ld['digest']} is missing from {root}")
        layers.append(Layer(
            digest=ld["digest"],
            media_type=str(ld.get("mediaType", "")),
            size=ld.get("size", -1),
            open=lambda p=path: open(p, "rb"),
            diff_id=diff_ids[i] if i < len(diff_ids) else "",
        ))
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return Image(str(ref), config, config_desc["digest"], manifest_digest, layers, plat)


def open_docker_archive(ref: ImageRef, platform: str | None = None) -> Image:
    path = Path(ref.location)
    if not path.is_file():
        raise ImageError(f"docker archive {path} not found")
    try:
        archive = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{path} is not a docker archive: {exc}") from exc
    with archive:
        try:
            members = {os.path.normpath(m.name): m for m in archive.getmembers() if m.isfile()}
        except (tarfile.TarError, OSError) as exc:
            raise ImageError(f"{path} is not a docker archive: {exc}") from exc
        return _docker_archive_image(ref, path, archive, members)


def _docker_archive_image(
    ref: ImageRef, path: Path, archive: tarfile.TarFile, members: dict[str, tarfile.TarInfo],
) -> Image:

    def read(name: str, limit: int = MAX_JSON) -> bytes:
        m = members.get(os.path.normpath(name))
        if m is None:
            raise ImageError(f"{name} is missing from docker archive {path}")
        if m.size > limit:
            raise ImageError(f"{name} in {path} is too large")
        f = archive.extractfile(m)
        assert f is not None
        return f.read()

    try:
        manifest = json.loads(read("manifest.json"))
    except ValueError as exc:
        raise ImageError(f"manifest.json in {path} is not valid JSON") from exc
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
    config_bytes = read(config_name)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = parse_json_object(config_bytes, f"config {config_name}")
    diff_ids = config_diff_ids(config, f"config {config_name}")
    if len(diff_ids) != len(layer_names):
        raise ImageError(f"docker archive {path}: {len(layer_names)} layers but "
                         f"{len(diff_ids)} diff_ids in its config")
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        m = members.get(os.path.normpath(name))
        if m is None:
            raise ImageError(f"layer {name} is missing from docker archive {path}")

        def opener(m: tarfile.TarInfo = m) -> IO[bytes]:
            return io.BufferedReader(_FileSlice(path, m.offset_data, m.size))

        # A docker-save layer may be stored compressed (newer engines keep the
        # registry's blob): its digest is then not the diff_id, so the layer is
        # named by the sha256 of its stored bytes; its uncompressed bytes are
        # checked against the diff_id while it is read.
        layers.append(Layer(digest="", media_type="", size=m.size, open=opener, diff_id=diff_id))
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return Image(str(ref), config, config_digest, config_digest, layers, plat)


class _FileSlice(io.RawIOBase):
    """Bytes [offset, offset+size) of a file: a member of an uncompressed tar archive,
    read with its own file handle (closed with the reader)."""

    def __init__(self, path: Path, offset: int, size: int) -> None:
        self._f = open(path, "rb")
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


def open_image(ref: ImageRef, platform: str | None = None,
               registry: RegistryOptions | None = None) -> Image:
    if ref.transport == "oci":
        return open_oci_layout(ref, platform)
    if ref.transport == "docker-archive":
        return open_docker_archive(ref, platform)
    if ref.transport == "docker":
        from indexer.registry import open_registry_image

        return open_registry_image(ref, platform, registry)
    raise ImageError(f"{ref.transport} images are not supported")
