"""What a mount's background fetch may do (prefetch.stream): its policy, read from a
mount's settings and the node's environment. Kept free of heavy imports (no trio, not
even dataclasses) so that `casfs mount`'s front end can check the flags before it forks.

    mode       off | likely | all | auto          --background-fetch, CASFS_BACKGROUND_FETCH
    cap        bytes the mount may fetch in all  --background-cap, CASFS_BACKGROUND_CAP
    rate       bytes per second of the stream    --background-rate, CASFS_BACKGROUND_RATE
    idle_cpus  CPUs that must be idle for a request to start (a node setting)
                                                  CASFS_BACKGROUND_IDLE_CPUS

`auto` is `likely` for images and `off` for directories indexed as trees (`casfs index
tree:`, model weights): docs/operations.md, "Prefetch knobs".
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

OFF, LIKELY, ALL, AUTO = "off", "likely", "all", "auto"
MODES = (OFF, LIKELY, ALL, AUTO)
DEFAULT_FOR_IMAGES = LIKELY  # measured (issue 18): `all` slows a first boot on 2 cores
DEFAULT_FOR_TREES = OFF  # a reader of weights streams what it reads, and may read part
ENV_MODE = "CASFS_BACKGROUND_FETCH"
ENV_CAP = "CASFS_BACKGROUND_CAP"
ENV_RATE = "CASFS_BACKGROUND_RATE"
ENV_IDLE_CPUS = "CASFS_BACKGROUND_IDLE_CPUS"
IDLE_CPUS = 1.0
TREE_MEDIA_TYPE = "application/vnd.casfs.tree.v1"  # indexer.tree's pseudo-layer
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str | int | None) -> int | None:
    """'512M', '2G', '1.5T', '50M/s', '4096' -> bytes (powers of 1024); None or '' ->
    None. ValueError for anything else."""
    if text is None or isinstance(text, int):
        if isinstance(text, int) and text < 0:
            raise ValueError(f"bad size {text!r}: negative")
        return text
    t = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    if not t:
        return None
    num, unit = (t[:-1], t[-1]) if t[-1] in _UNITS else (t, "")
    try:
        value = int(float(num) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"bad size {text!r}: use e.g. 512M, 10G") from None
    if value < 0:
        raise ValueError(f"bad size {text!r}: negative")
    return value


class StreamPolicy:
    """mode: off | likely | all | auto. cap: bytes the mount may fetch in all before the
    stream stops (None: the image's stored size). rate: bytes per second of the
    stream's own requests (None: no limit). idle_cpus: a request starts only while at
    least this many of the node's CPUs are idle (0: whatever the load). ValueError for
    a setting that makes no sense."""

    __slots__ = ("mode", "cap", "rate", "idle_cpus")

    def __init__(self, mode: str = AUTO, cap: int | None = None, rate: int | None = None,
                 idle_cpus: float = IDLE_CPUS) -> None:
        if mode not in MODES:
            raise ValueError(f"background fetch {mode!r}: one of {', '.join(MODES)}")
        if cap is not None and cap < 0:
            raise ValueError("a background fetch cap cannot be negative")
        if rate is not None and rate <= 0:
            raise ValueError("a background fetch rate must be positive")
        if not 0 <= idle_cpus <= 4096:
            raise ValueError(f"idle CPUs {idle_cpus!r}: between 0 and the node's CPUs")
        self.mode = mode
        self.cap = cap
        self.rate = rate
        self.idle_cpus = float(idle_cpus)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any] | None = None,
                      env: Mapping[str, str] | None = None) -> StreamPolicy:
        """A policy from a mount's settings (keys `background_fetch`, `background_cap`,
        `background_rate`, `background_idle_cpus`: MountConfig fields, or its `extra`),
        each unset one from the environment (CASFS_BACKGROUND_FETCH, _CAP, _RATE,
        _IDLE_CPUS; the process's own unless `env` is given), else the default."""
        settings = settings or {}
        env = os.environ if env is None else env

        def pick(key: str, var: str) -> Any:
            value = settings.get(key)
            return (env.get(var) or None) if value is None or value == "" else value

        mode = pick("background_fetch", ENV_MODE)
        idle = pick("background_idle_cpus", ENV_IDLE_CPUS)
        try:
            idle_cpus = IDLE_CPUS if idle is None else float(idle)
        except ValueError:
            raise ValueError(f"idle CPUs {idle!r}: a number") from None
        return cls(mode=str(mode).strip().lower() if mode is not None else AUTO,
                   cap=parse_bytes(pick("background_cap", ENV_CAP)),
                   rate=parse_bytes(pick("background_rate", ENV_RATE)), idle_cpus=idle_cpus)

    def settings(self) -> dict[str, Any]:
        """The MountConfig fields that give this policy back (from_settings)."""
        return {"background_fetch": self.mode, "background_cap": self.cap,
                "background_rate": self.rate, "background_idle_cpus": self.idle_cpus}

    def mode_for(self, meta: Mapping[str, Any]) -> str:
        """The mode for an image with this manifest meta (`auto` resolved)."""
        if self.mode != AUTO:
            return self.mode
        return DEFAULT_FOR_TREES if is_tree(meta) else DEFAULT_FOR_IMAGES

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StreamPolicy) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, k) for k in self.__slots__))

    def __repr__(self) -> str:
        return "StreamPolicy(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) \
            + ")"


def is_tree(meta: Mapping[str, Any]) -> bool:
    """Whether a manifest was indexed from a directory (`casfs index tree:`: its meta
    says `"source": "tree"` and its one layer has the tree media type) rather than from
    an image (whose meta names the image and its platform)."""
    if meta.get("source") == "tree" or meta.get("casfs") == "tree" or meta.get("kind") == "tree":
        return True
    layers = meta.get("layers")
    if isinstance(layers, list) and any(isinstance(ly, dict) and
                                        ly.get("media_type") == TREE_MEDIA_TYPE
                                        for ly in layers):
        return True
    return not meta.get("image") and not meta.get("platform")
