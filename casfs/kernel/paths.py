"""Where the node view's files are: its control socket (in the user's private runtime
directory: a socket path must be short, a cache directory's may not be) and its log.
Light: the `casfs mount` front end and the service both use it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LOG_NAME = "view.log"


def socket_path(cache_dir: str) -> Path:
    """The control socket of the node view serving cache_dir."""
    from casfs.locations import runtime_dir

    key = hashlib.sha256(os.path.realpath(cache_dir).encode()).hexdigest()[:20]
    return runtime_dir() / f"view-{key}.sock"


def log_path(cache_dir: str) -> Path:
    return Path(cache_dir) / "logs" / LOG_NAME
