"""Image sources on local disk: an OCI image layout and a `docker save` archive.

A source resolves the reference to one image manifest (choosing a platform from
an image index), and hands out its config and its layers in order. Every JSON
document read is checked against the digest that names it; layer blobs are
checked by the caller while (or before) they are read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform as host_platform
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from casfs.errors import ImageError, LayerDigestMismatch
from indexer.imageref import ImageRef
from indexer.mediatypes import INDEX_TYPES, LAYER_COMPRESSION, MANIFEST_TYPES

MAX_JSON = 16 << 20


@dataclass
class Layer:
    digest: str  # "sha256:<hex>" of the bytes open() returns
    media_type: str
    size: int  # -1 when unknown
    open: Callable[[], IO[bytes]]
    diff_id: str = ""  # sha256 of the uncompressed tar, from the config

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


def _check_digest(digest: str, data: bytes, what: str) -> None:
    algo, _, want = digest.partition(":")
    if algo not in ("sha256", "sha512"):
        raise ImageError(f"{what}: unsupported digest algorithm {algo!r}")
    if hashlib.new(algo, data).hexdigest() != want:
        raise LayerDigestMismatch(f"{what} does not match its digest {digest}")


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ImageError(f"{what} is not a JSON object")
    return doc


def _pick_platform(index: dict[str, Any], want: str | None, what: str) -> dict[str, Any]:
    manifests = index.get("manifests")
    if not isinstance(manifests, list) or not manifests:
        raise ImageError(f"{what} lists no manifests")
    target = want or host_platform_name()
    os_, _, rest = target.partition("/")
    arch, _, variant = rest.partition("/")
    offered = []
    for desc in manifests:
        plat = desc.get("platform") or {}
        offered.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if plat.get("os") == os_ and plat.get("architecture") == arch and (
            not variant or plat.get("variant") == variant
        ):
            return desc
    raise ImageError(f"{what} has no image for platform {target} (offers {', '.join(offered)})")


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
        _check_digest(digest, data, f"{what} {digest}")
        return data

    index = _json((root / "index.json").read_bytes(), f"{root}/index.json")
    manifests = index.get("manifests") or []
    if ref.tag:
        chosen = [m for m in manifests
                  if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == ref.tag]
        if not chosen:
            raise ImageError(f"tag {ref.tag!r} not found in OCI layout {root}")
    else:
        chosen = manifests
    if not chosen:
        raise ImageError(f"OCI layout {root} holds no image")
    if len(chosen) > 1 and all(m.get("mediaType") in MANIFEST_TYPES for m in chosen):
        # Several platform manifests straight in index.json.
        desc = _pick_platform({"manifests": chosen}, platform, f"{root}/index.json")
    elif len(chosen) > 1:
        raise ImageError(f"OCI layout {root} holds several images: name one with oci:{root}:<tag>")
    else:
        desc = chosen[0]
    seen = 0
    while True:
        media_type = desc.get("mediaType")
        data = read_blob(desc["digest"], "manifest")
        doc = _json(data, f"manifest {desc['digest']}")
        media_type = media_type or doc.get("mediaType")
        if media_type in INDEX_TYPES or "manifests" in doc:
            seen += 1
            if seen > 4:
                raise ImageError(f"image indexes nested too deep in {root}")
            desc = _pick_platform(doc, platform, f"image index {desc['digest']}")
            continue
        break
    manifest_digest = desc["digest"]
    config_desc = doc.get("config") or {}
    if "digest" not in config_desc:
        raise ImageError(f"manifest {manifest_digest} has no config")
    config = _json(read_blob(config_desc["digest"], "config"), "image config")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    layers = []
    for i, ld in enumerate(doc.get("layers") or []):
        path = _descriptor_blob_path(root, ld["digest"])
        if not path.is_file():
            raise ImageError(f"layer {ld['digest']} is missing from {root}")
        layers.append(Layer(
            digest=ld["digest"],
            media_type=ld.get("mediaType", ""),
            size=int(ld.get("size", -1)),
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
        members = {os.path.normpath(m.name): m for m in archive.getmembers() if m.isfile()}
    except (tarfile.TarError, OSError) as exc:
        raise ImageError(f"{path} is not a docker archive: {exc}") from exc

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
    if ref.tag:
        entries = [e for e in manifest if ref.tag in (e.get("RepoTags") or [])]
        if not entries:
            raise ImageError(f"{ref.tag!r} not found in docker archive {path}")
        entry = entries[0]
    elif len(manifest) == 1:
        entry = manifest[0]
    else:
        raise ImageError(f"docker archive {path} holds several images: name one")
    config_name = entry.get("Config", "")
    config_bytes = read(config_name)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    config = _json(config_bytes, f"config {config_name}")
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    layer_names = entry.get("Layers") or []
    if len(diff_ids) != len(layer_names):
        raise ImageError(f"docker archive {path}: {len(layer_names)} layers but "
                         f"{len(diff_ids)} diff_ids in its config")
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        m = members.get(os.path.normpath(name))
        if m is None:
            raise ImageError(f"layer {name} is missing from docker archive {path}")

        def opener(m: tarfile.TarInfo = m) -> IO[bytes]:
            f = tarfile.open(path, "r:").extractfile(m)
            assert f is not None
            return f

        # A docker-save layer may be stored compressed (newer engines keep the
        # registry's blob): its digest is then not the diff_id, so the layer is
        # named by the sha256 of its stored bytes, checked against the diff_id
        # only when it is uncompressed.
        layers.append(Layer(digest="", media_type="", size=m.size, open=opener, diff_id=diff_id))
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    return Image(str(ref), config, config_digest, config_digest, layers, plat)


def open_image(ref: ImageRef, platform: str | None = None) -> Image:
    if ref.transport == "oci":
        return open_oci_layout(ref, platform)
    if ref.transport == "docker-archive":
        return open_docker_archive(ref, platform)
    raise ImageError(f"{ref.transport} images are not supported yet (registry ingestion: issue 6)")
