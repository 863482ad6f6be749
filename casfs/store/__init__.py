"""Stores: where blobs, manifests and tags live. `open_store(url)` is the entry point."""

from casfs.locations import default_store_url
from casfs.store.content import Store
from casfs.store.url import open_store

__all__ = ["Store", "open_store", "default_store_url"]
