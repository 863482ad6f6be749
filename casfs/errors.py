"""Every error casfs reports to a user: one class per condition, with its exit code.

The CLI's main() turns any CasfsError into one line on stderr and its exit code;
anything else is a bug and gets a traceback.
"""

from __future__ import annotations


class CasfsError(Exception):
    """casfs failed."""

    exit_code = 1

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class UsageError(CasfsError):
    """Invalid arguments."""

    exit_code = 2


# --- store -----------------------------------------------------------------


class StoreError(CasfsError):
    """The store failed."""

    exit_code = 3


class StoreUnreachable(StoreError):
    """The store cannot be reached (network, endpoint, credentials or bucket)."""


class TransientStoreError(StoreError):
    """The store failed in a way that retrying may fix (timeouts, 5xx, throttling)."""


class ObjectNotFound(StoreError):
    """An object the store should hold is missing."""

    exit_code = 4


class BlobCorrupt(StoreError):
    """A blob's bytes do not match its digest."""

    exit_code = 5


class StoreBusy(StoreError):
    """Another process holds a conflicting lock on the store (gc against index)."""

    exit_code = 9


class TagNotFound(CasfsError):
    """No such tag in the store."""

    exit_code = 4


class BadStoreURL(UsageError):
    """The store URL is not file:///abs/path or s3://bucket/prefix."""


# --- manifests ---------------------------------------------------------------


class ManifestError(CasfsError):
    """The manifest is malformed."""

    exit_code = 5


# --- images ------------------------------------------------------------------


class ImageError(CasfsError):
    """The image cannot be read."""

    exit_code = 6


class BadImageRef(ImageError):
    """The image reference is not oci:<dir>[:<tag>], docker-archive:<file> or docker://..."""

    exit_code = 2


class LayerDigestMismatch(ImageError):
    """A layer's bytes do not match the digest its manifest gives."""


class CorruptLayer(ImageError):
    """A layer's compressed stream or tar archive is corrupt or truncated."""


class HostileLayer(ImageError):
    """A layer holds an entry that would escape the image root or is otherwise unsafe."""


class RegistryError(ImageError):
    """The registry failed or refused a request (after retries where retrying may help)."""


class RegistryAuthError(RegistryError):
    """The registry (or its token service) refused the credentials, or demands some."""


class ImageNotFound(RegistryError):
    """The registry holds no such repository, tag or digest."""

    exit_code = 4


# --- mounts ------------------------------------------------------------------


class MountError(CasfsError):
    """Mounting failed."""

    exit_code = 7
