"""The containerd proxy snapshotter: `command` (arguments, handler), `service` (the
Snapshots gRPC service, the remote-snapshot handshake, casfs image mounts), `store`
(snapshot records on disk), `containerd` (a small containerd client: pull with the
snapshot labels, run a task), `api/` (gRPC stubs generated from containerd 1.6's protos
by `generate`). Importing this package loads no gRPC."""

from __future__ import annotations

from casfs.snapshotter.command import add_arguments, cmd_snapshotter

__all__ = ["add_arguments", "cmd_snapshotter"]
