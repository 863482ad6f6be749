"""The manifest: an image's flattened final tree, in a binary layout served by mmap."""

from casfs.manifest.reader import Manifest
from casfs.manifest.tree import Node
from casfs.manifest.writer import build_manifest

__all__ = ["Manifest", "Node", "build_manifest"]
