"""Resolve what a user names (a manifest digest, `blake3:<digest>`, or a tag) to a digest."""

from __future__ import annotations

from casfs.digest import parse_ref
from casfs.errors import ObjectNotFound
from casfs.store import Store


def resolve_ref(store: Store, ref: str) -> str:
    digest = parse_ref(ref)
    if digest is None:
        return store.get_tag(ref)
    if not store.has_manifest(digest):
        raise ObjectNotFound(f"manifest {digest} not found in {store.url}")
    return digest
