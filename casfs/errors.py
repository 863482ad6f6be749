"""Every error casfs reports: one class per condition, each with its exit code.

The CLI's main() turns any CasfsError into one line on stderr and its exit code;
anything else is a bug and gets a traceback. Exit codes are never shared by unrelated
conditions; the table (also in docs/operations.md):

    1   casfs failed (a condition with no code of its own)
    2   invalid arguments or a malformed reference (image ref, store URL, size)
    3   the store failed or cannot be reached (network, credentials, 5xx after retries)
    4   something named does not exist (tag, manifest, object, registry image)
    5   stored data is corrupt (a blob, manifest, pack index or trace that fails its checks)
    6   the image cannot be indexed (unreadable, hostile or corrupt layers, registry refusal)
    7   mounting or unmounting failed
    8   the node cache directory cannot be used
    9   the store is busy (another process holds a conflicting lock: gc against index)
    10  the node agent cannot be started, stopped or reached
    11  `casfs check` found problems in the store
    12  a setting is refused as unsafe (a cache directory another user owns, ...)
    125 `casfs run` failed around the container (126: the command cannot run, 127: it
        does not exist; otherwise `casfs run` exits with the container's own status)

Base floor: imports nothing of casfs.
"""

from __future__ import annotations

import os


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


class ObjectTooLarge(StoreError):
    """A store object is larger than its kind can be (damaged or hostile store)."""

    exit_code = 5


class RangeNotSatisfiable(StoreError):
    """A ranged GET started at or past the object's end."""


class ResponseTooLarge(ObjectTooLarge):
    """The store answered with a body longer than the object asked for can be (the
    backend contract's ObjectTooLarge: permanent, never retried)."""


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


class FetchFailed(StoreError):
    """A chunk could not be fetched from the store."""


class CheckFailed(CasfsError):
    """`casfs check` found problems in the store."""

    exit_code = 11


# --- formats -----------------------------------------------------------------


class ManifestError(CasfsError):
    """The manifest is malformed."""

    exit_code = 5


class PackIndexError(CasfsError):
    """A pack index object that is not one (damaged, truncated, hostile)."""

    exit_code = 5


class TraceError(CasfsError):
    """A trace object is malformed."""

    exit_code = 5


class LayerRecordError(CasfsError):
    """A layer record object is malformed."""

    exit_code = 5


class BadKey(UsageError):
    """A key, or a name for one, that is not part of the store's key layout."""


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


class DirPackError(ImageError):
    """A layer's directory packs could not be written."""


class RegistryError(ImageError):
    """The registry failed or refused a request (after retries where retrying may help)."""


class RegistryAuthError(RegistryError):
    """The registry (or its token service) refused the credentials, or demands some."""


class ImageNotFound(RegistryError):
    """The registry holds no such repository, tag or digest."""

    exit_code = 4


# --- the node: cache, mounts, agent -------------------------------------------------


class CacheError(CasfsError):
    """The local cache directory cannot be used."""

    exit_code = 8


class MountError(CasfsError):
    """Mounting failed."""

    exit_code = 7


class ErofsError(MountError):
    """The EROFS image for kernel serving cannot be written."""


class ErofsUnsupported(ErofsError):
    """The image holds something EROFS served through overlayfs cannot represent faithfully."""


class RunError(CasfsError):
    """`casfs run` failed before or around the container (exit 125; docs/containers.md:
    126 and 127 are a command that cannot run or does not exist)."""

    exit_code = 125


class CreateFailed(RunError):
    """The runtime could not create the container."""


class AgentError(CasfsError):
    """The agent cannot be started, stopped or reached as asked."""

    exit_code = 10


class ServiceUnavailable(Exception):  # noqa: N818 - a signal to fall back, not a failure
    """No casfs process of this user answers on that socket (none, a stale socket, or
    another user's): the caller starts one, or does the work itself."""


AgentUnavailable = ServiceUnavailable

class UnsafeSetting(CasfsError):
    """A setting is refused because it would hand something to another user."""

    exit_code = 12


# --- the filesystem model ----------------------------------------------------


class FsError(Exception):
    """A filesystem condition with its errno (ENOENT, ENOTDIR, EROFS...): what the
    model answers, which the FUSE adapter passes to the kernel as is."""

    def __init__(self, errno_: int) -> None:
        super().__init__(os.strerror(errno_))
        self.errno = errno_


EXIT_CODES: dict[int, str] = {
    1: "casfs failed (no code of its own)",
    2: "invalid arguments or reference",
    3: "the store failed or cannot be reached",
    4: "not found (tag, manifest, object, registry image)",
    5: "stored data is corrupt",
    6: "the image cannot be indexed",
    7: "mounting or unmounting failed",
    8: "the node cache cannot be used",
    9: "the store is busy (lock held)",
    10: "the node agent failed",
    11: "casfs check found problems",
    12: "a setting was refused as unsafe",
    125: "casfs run failed around the container (126: command not executable, "
         "127: not found; else the container's own status)",
}
