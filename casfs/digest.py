"""Content digests: BLAKE3-256, written as 64 lowercase hex characters.

References shown to users carry the algorithm (`blake3:<hex>`); inside the store
the bare hex names objects. Hashing a big buffer releases the GIL in the blake3
binding, so callers on the trio loop still send big buffers to a thread.
"""

from __future__ import annotations

import re

import blake3

ALGORITHM = "blake3"
DIGEST_SIZE = 32
_HEX = re.compile(r"^[0-9a-f]{64}$")


def hash_bytes(data: bytes | memoryview) -> str:
    """The hex BLAKE3-256 of data."""
    if len(data) > 1 << 20:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


def hash_raw(data: bytes | memoryview) -> bytes:
    """The 32-byte BLAKE3-256 of data."""
    return blake3.blake3(data).digest()


def is_digest(text: str) -> bool:
    return bool(_HEX.match(text))


def to_ref(hex_digest: str) -> str:
    """The user-facing reference of a manifest digest."""
    return f"{ALGORITHM}:{hex_digest}"


def parse_ref(text: str) -> str | None:
    """The bare hex digest of `blake3:<hex>` or `<hex>`; None when text is no digest."""
    if text.startswith(ALGORITHM + ":"):
        text = text[len(ALGORITHM) + 1 :]
    return text if is_digest(text) else None
