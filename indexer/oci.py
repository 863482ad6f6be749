"""What every image source shares: the image and layer descriptions a source hands to
the indexer, and the checks on the OCI JSON documents it reads (digests, descriptors,
platform choice, the config's diff_ids, size bounds).

indexer.source (an OCI layout, a docker archive on disk) and indexer.registry (the
distribution API) both build on this module and on nothing of each other;
indexer.open picks one of them for an image reference.
"""

from __future__ import annotations

import hashlib
import json
import platform as host_platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from casfs.errors import ImageError, LayerDigestMismatch
from indexer.mediatypes import LAYER_COMPRESSION

MAX_JSON = 4 << 20
"""The largest manifest, image index, index.json, oci-layout or docker-archive
manifest.json read (the reference registry refuses manifests over 4 MiB too)."""
MAX_CONFIG = 16 << 20
"""The largest image config read (a long history makes configs bigger than manifests)."""


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


def parse_json(data: bytes, what: str) -> Any:
    """A JSON document (ImageError when it is not one, or nests too deep to parse)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise ImageError(f"{what} is not valid JSON: {exc}") from exc


def parse_json_object(data: bytes, what: str) -> dict[str, Any]:
    doc = parse_json(data, what)
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
