"""What a mount is asked to be: the settings `casfs mount` hands its daemon, whether
it forks one itself or asks the node agent (casfs.agent) to. Kept free of heavy
imports, so that the front end can build one without loading trio or pyfuse3."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MountConfig:
    ref: str
    mountpoint: str
    store_url: str | None
    cache_dir: str
    cache_size: int
    foreground: bool = False
    metrics_port: int | None = None
    allow_suid: bool = True
    allow_dev: bool = True
    fetch_concurrency: int = 32
    readahead_kb: int = 1024
    max_background: int = 64
    prefetch: bool = True
    trace: bool = True
    trace_idle: float = 10.0
    extra: dict = field(default_factory=dict)
