"""What a mount is asked to be: the settings `casfs mount` hands its daemon, whether
it forks one itself or asks the node agent (casfs.agent) to. Kept free of heavy
imports (not even dataclasses), so that the front end can build one without loading
trio or pyfuse3."""

from __future__ import annotations

from typing import Any


class MountConfig:
    """Keyword settings with defaults; `as_dict()` round-trips through MountConfig(**d).

    allow_suid: honour setuid/setgid bits and file capabilities (security.* xattrs are
    shown); allow_dev: device nodes open devices. Both off unless asked for: a mount
    that other users can reach must not make them root or hand them a host disk."""

    __slots__ = ("ref", "mountpoint", "store_url", "cache_dir", "cache_size", "foreground",
                 "metrics_port", "allow_suid", "allow_dev", "fetch_concurrency", "readahead_kb",
                 "max_background", "prefetch", "trace", "trace_idle", "mode", "extra")

    def __init__(self, ref: str, mountpoint: str, store_url: str | None, cache_dir: str,
                 cache_size: int, foreground: bool = False, metrics_port: int | None = None,
                 allow_suid: bool = False, allow_dev: bool = False, fetch_concurrency: int = 32,
                 readahead_kb: int = 1024, max_background: int = 64, prefetch: bool = True,
                 trace: bool = True, trace_idle: float = 10.0, mode: str = "fuse",
                 extra: dict[str, Any] | None = None) -> None:
        self.ref = ref
        self.mountpoint = mountpoint
        self.store_url = store_url
        self.cache_dir = cache_dir
        self.cache_size = cache_size
        self.foreground = foreground
        self.metrics_port = metrics_port
        self.allow_suid = allow_suid
        self.allow_dev = allow_dev
        self.fetch_concurrency = fetch_concurrency
        self.readahead_kb = readahead_kb
        self.max_background = max_background
        self.prefetch = prefetch
        self.trace = trace
        self.trace_idle = trace_idle
        self.mode = mode  # "kernel", "fuse" or "auto" (kernel where the node supports it)
        self.extra = {} if extra is None else extra

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"MountConfig({self.as_dict()!r})"
