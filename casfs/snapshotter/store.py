"""The snapshotter's records: every snapshot containerd asked for, kept on disk under
the snapshotter's root so that active and committed snapshots survive a restart of the
snapshotter and of containerd.

    <root>/                       0700
      snapshots.json              the records (below), replaced atomically on each change
      snapshots/<id>/fs           an ordinary snapshot's directory (overlayfs upper)
      snapshots/<id>/work         its overlayfs work dir
      images/<manifest hex>/      a casfs image's mount (--suid --dev, root-only)

A record: name (the backend key containerd gives), parent name, kind (view, active,
committed), created/updated times, labels, id (its directory), and for a snapshot casfs
serves ("remote"): the casfs manifest, the layer's index in the image and the image's
layer count. Of an indexed image's layer snapshots only the top one has content (the
whole flattened image, the casfs mount); the ones below it are placeholders that exist
so that containerd's chain of layer snapshots is complete.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

VIEW, ACTIVE, COMMITTED = 1, 2, 3  # containerd.services.snapshots.v1.Kind


class SnapshotError(Exception):
    """A request containerd must be refused; `code` names the gRPC status."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def not_found(what: str) -> SnapshotError:
    return SnapshotError("NOT_FOUND", f"snapshot {what}: not found")


@dataclass
class Record:
    name: str
    parent: str
    kind: int
    id: str
    created: float
    updated: float
    labels: dict[str, str] = field(default_factory=dict)
    manifest: str = ""  # casfs manifest hex, for a remote snapshot
    layer: int = -1  # its index among the image's layers
    layers: int = 0  # the image's layer count

    @property
    def remote(self) -> bool:
        return bool(self.manifest)

    @property
    def top(self) -> bool:
        """The image's last layer: the one whose content is the whole image."""
        return self.remote and self.layer == self.layers - 1


class Records:
    """The records, in memory and on disk; one lock serialises every change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "snapshots.json"
        self.lock = threading.RLock()
        self.items: dict[str, Record] = {}
        self.next_id = 1
        (root / "snapshots").mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists():
            data = json.loads(self.path.read_text())
            self.next_id = int(data.get("next_id", 1))
            for raw in data.get("snapshots", []):
                r = Record(**raw)
                self.items[r.name] = r

    def save(self) -> None:
        data = {"version": 1, "next_id": self.next_id,
                "snapshots": [asdict(r) for r in self.items.values()]}
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def get(self, name: str) -> Record:
        r = self.items.get(name)
        if r is None:
            raise not_found(name)
        return r

    def new_id(self) -> str:
        n = self.next_id
        self.next_id += 1
        return str(n)

    def add(self, name: str, parent: str, kind: int, labels: dict[str, str],
            **remote: Any) -> Record:
        if name in self.items:
            raise SnapshotError("ALREADY_EXISTS", f"snapshot {name}: already exists")
        if parent:
            p = self.get(parent)
            if p.kind != COMMITTED:
                raise SnapshotError("FAILED_PRECONDITION",
                                    f"parent {parent} is not a committed snapshot")
        now = time.time()
        r = Record(name, parent, kind, self.new_id(), now, now, dict(labels), **remote)
        self.items[name] = r
        return r

    def children(self, name: str) -> list[Record]:
        return [r for r in self.items.values() if r.parent == name]

    def chain(self, name: str) -> list[Record]:
        """The record and its ancestors, nearest first."""
        out = []
        seen = set()
        while name:
            if name in seen:
                raise SnapshotError("INTERNAL", f"snapshot {name}: parent loop")
            seen.add(name)
            r = self.get(name)
            out.append(r)
            name = r.parent
        return out
