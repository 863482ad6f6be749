"""From an image reference to its source: an OCI layout or a docker archive on disk
(indexer.source) or a registry (indexer.registry). The one module that knows both, so
that neither has to know the other."""

from __future__ import annotations

from casfs.errors import ImageError
from indexer.imageref import ImageRef
from indexer.oci import Image
from indexer.registry import RegistryOptions, open_registry_image
from indexer.source import open_docker_archive, open_oci_layout


def open_image(ref: ImageRef, platform: str | None = None,
               registry: RegistryOptions | None = None) -> Image:
    """The image a reference names, on the host platform unless `platform` (os/arch[/variant])
    says otherwise; `registry`: how to reach a registry (docker:// references)."""
    if ref.transport == "oci":
        return open_oci_layout(ref, platform)
    if ref.transport == "docker-archive":
        return open_docker_archive(ref, platform)
    if ref.transport == "docker":
        return open_registry_image(ref, platform, registry)
    raise ImageError(f"{ref.transport} images are not supported")
