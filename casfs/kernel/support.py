"""Whether this node can serve a mount in kernel mode, and why not: root, EROFS that
mounts straight from a file (Linux 6.12+), overlayfs with data-only lower layers (6.5+).
Light: the `casfs mount` front end asks before it loads anything heavy."""

from __future__ import annotations

import os

MODES = ("auto", "kernel", "fuse")
FILE_BACKED_EROFS = (6, 12)
DATA_ONLY_LAYERS = (6, 5)


def kernel_release() -> tuple[int, int]:
    release = os.uname().release
    parts = release.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return 0, 0


def filesystems() -> set[str]:
    try:
        with open("/proc/filesystems") as f:
            return {line.split()[-1] for line in f if line.strip()}
    except OSError:
        return set()


def unsupported_reason() -> str | None:
    """Why kernel mode cannot run here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "kernel mode mounts EROFS and overlayfs, which needs root"
    have = filesystems()
    missing = [fs for fs in ("erofs", "overlay") if fs not in have]
    if missing:
        return f"this kernel has no {' or '.join(missing)} (modprobe {' '.join(missing)}?)"
    release = kernel_release()
    if release < DATA_ONLY_LAYERS:
        return (f"Linux {release[0]}.{release[1]} lacks overlayfs data-only layers "
                f"(needs {DATA_ONLY_LAYERS[0]}.{DATA_ONLY_LAYERS[1]}+)")
    if release < FILE_BACKED_EROFS:
        return (f"Linux {release[0]}.{release[1]} cannot mount EROFS from a file "
                f"(needs {FILE_BACKED_EROFS[0]}.{FILE_BACKED_EROFS[1]}+)")
    return None
