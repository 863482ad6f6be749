"""From an image reference to its source: an OCI layout or a docker archive on disk
(indexer.source), a registry (indexer.registry), or a plain directory (indexer.tree).
The one module that knows them all, so that none has to know the others."""

from __future__ import annotations

from casfs.errors import ImageError
from indexer.imageref import ImageRef
from indexer.oci import Image
from indexer.registry import RegistryOptions, open_registry_image
from indexer.source import open_docker_archive, open_oci_layout
from indexer.tree import TreeSource
from indexer.tree import open_tree as _open_tree

__all__ = ["open_image", "open_tree"]


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
    if ref.transport == "tree":
        raise ImageError(f"{ref} is a directory, not an image: index it with indexer.index")
    raise ImageError(f"{ref.transport} images are not supported")


def open_tree(ref: ImageRef) -> TreeSource:
    """The directory a `tree:<path>` reference names."""
    if ref.transport != "tree":
        raise ImageError(f"{ref} is not a tree: reference")
    return _open_tree(ref)
