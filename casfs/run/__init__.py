"""`casfs run`, `casfs ps`, `casfs rm`: containers from casfs images on this node, with
crun or runc. `args` has the arguments and the handlers the CLI calls (light), `command`
their implementations, `spec` the OCI config.json, `runtime` the runtime driver (create,
console, signals, wait), `state` the root-only state directory (records, writable
layers, shared image mounts)."""

from __future__ import annotations

from casfs.run.args import add_arguments, cmd_ps, cmd_rm, cmd_run

__all__ = ["add_arguments", "cmd_ps", "cmd_rm", "cmd_run"]
