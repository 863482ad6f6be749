"""The image a mount serves, made local: its store opened, its reference resolved, its
manifest verified and kept in the node cache (fetched once per node, then mmapped).
Used by every serving mode."""

from __future__ import annotations

import logging
import os

from casfs.cache import ChunkCache
from casfs.digest import hash_bytes, parse_ref
from casfs.manifest import Manifest
from casfs.refs import resolve_ref
from casfs.store import Store, open_store

log = logging.getLogger(__name__)


def open_image(ref: str, store_url: str | None,
               cache: ChunkCache) -> tuple[Store, Manifest]:
    """The store and the verified, local manifest a mount of `ref` serves."""
    digest = parse_ref(ref)
    if digest is not None and (cache.root / "manifests" / digest).exists():
        # Fast path: a digest whose manifest this node already holds needs no request
        # before serving; the store is first asked when a chunk is missing.
        store = open_store(store_url, probe=False)
    else:
        store = open_store(store_url)
        digest = resolve_ref(store, ref)
    return store, local_manifest(store, cache, digest)


def local_manifest(store: Store, cache: ChunkCache, digest: str) -> Manifest:
    """The manifest, from the node's cache when there (verified), else from the store."""
    path = cache.root / "manifests" / digest
    try:
        data = path.read_bytes()
        if hash_bytes(data) == digest:
            return Manifest.open(path, digest)
        log.warning("cached manifest %s is corrupt; fetching it again", digest)
    except FileNotFoundError:
        pass
    data = store.get_manifest(digest)
    # The full structural check runs once per node, before the manifest is kept;
    # later mounts re-hash the cached copy, which proves it is this same manifest.
    Manifest(data, digest).validate()
    tmp = cache.root / "tmp" / f"manifest.{digest}.{os.getpid()}"
    try:
        tmp.write_bytes(data)
        os.rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot keep manifest %s in the cache (%s); serving it from memory",
                    digest, exc.strerror)
        return Manifest(data, digest)
    return Manifest.open(path, digest)
