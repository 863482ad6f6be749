"""casfs's own EROFS image writer: an image's metadata tree as an EROFS image that the
kernel mounts read-only, under overlayfs whose data-only layers hold the content.

    build_erofs(manifest, out, object_path=..., drop_security_xattrs=False) -> ErofsInfo
    kernel_mode_obstacle(manifest) -> str | None     (why kernel serving would be wrong)
    EROFS_LAYOUT_VERSION                             (key for cached images)

Layout: docs/format.md, "EROFS image". Modules: format (on-disk structures), checks
(what can be represented), writer (the build).
"""

from casfs.erofs.checks import kernel_mode_obstacle
from casfs.erofs.writer import EROFS_LAYOUT_VERSION, ErofsInfo, build_erofs, render_erofs
from casfs.errors import ErofsError, ErofsUnsupported

__all__ = [
    "EROFS_LAYOUT_VERSION",
    "ErofsError",
    "ErofsInfo",
    "ErofsUnsupported",
    "build_erofs",
    "kernel_mode_obstacle",
    "render_erofs",
]
