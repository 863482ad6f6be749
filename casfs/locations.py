"""Where things are when nobody says: the store URL (--store, else $CASFS_STORE, else
the embedded default local store) and the node cache directory (--cache-dir, else
$CASFS_CACHE_DIR, else a per-user or system default). Free of heavy imports: the
`casfs mount` front end resolves both before it knows whether it will load a daemon.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_store_url() -> str:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return f"file://{Path(base) / 'casfs' / 'store'}"


def resolve_store_url(url: str | None) -> str:
    return url or os.environ.get("CASFS_STORE") or default_store_url()


def default_cache_dir() -> str:
    env = os.environ.get("CASFS_CACHE_DIR")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/cache/casfs"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "casfs")
