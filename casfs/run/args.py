"""The arguments of `casfs run`, `casfs ps` and `casfs rm`, and their handlers as the
CLI calls them. Light on purpose: the CLI builds its parser on every invocation (a
`casfs mount` included), so the implementations (casfs.run.command) are imported only
when one of these commands runs."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]


def cmd_run(args: argparse.Namespace) -> int:
    """`casfs run`: the container's exit code, or 125/126/127 (casfs.run.command)."""
    from casfs.run import command

    return command.cmd_run(args)


def cmd_ps(args: argparse.Namespace) -> int:
    from casfs.run import command

    return command.cmd_ps(args)


def cmd_rm(args: argparse.Namespace) -> int:
    from casfs.run import command

    return command.cmd_rm(args)


def _state_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--state-dir", help="container state, root-only (default: "
                    "$CASFS_STATE_DIR, else /var/lib/casfs)")


def add_arguments(add: AddCommand) -> None:
    """Register run, ps and rm with `add(name, handler, help) -> subparser`."""
    sp = add("run", cmd_run, "run a container from an indexed image (exit code: the "
             "container's; 125 casfs failed, 126 command not executable, 127 not found)")
    sp.add_argument("ref", help="manifest digest or tag")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="command",
                    help="command and arguments (default: the image's Entrypoint and Cmd)")
    sp.add_argument("--store", help="store URL (default: $CASFS_STORE, else the local default)")
    sp.add_argument("--cache-dir", help="node cache directory (as for casfs mount)")
    sp.add_argument("--cache-size", default=os.environ.get("CASFS_CACHE_SIZE", "10G"))
    sp.add_argument("--mode", choices=["auto", "kernel", "fuse"],
                    default=os.environ.get("CASFS_MODE", "auto"),
                    help="serving mode of the image's mount (as for casfs mount)")
    _state_arg(sp)
    sp.add_argument("--runtime", help="crun or runc, or a path (default: $CASFS_RUNTIME, "
                    "else crun, else runc)")
    sp.add_argument("--rm", action="store_true", help="remove the container when it exits")
    sp.add_argument("--name", help="the container's name (default casfs-<id>)")
    sp.add_argument("-e", "--env", action="append", metavar="KEY[=VALUE]",
                    help="set an environment variable (KEY alone: this process's value)")
    sp.add_argument("-w", "--workdir", help="working directory inside the container")
    sp.add_argument("-u", "--user", help="USER[:GROUP], names or numbers")
    sp.add_argument("--entrypoint", help="replace the image's entrypoint (a path, or a JSON "
                    "list); the image's Cmd is then dropped")
    sp.add_argument("-v", "--volume", action="append", metavar="SRC:DST[:ro]",
                    help="bind a node path into the container")
    sp.add_argument("--network", choices=["none", "host"], default="none",
                    help="none: a network namespace with only loopback (default); host: the "
                    "node's network")
    sp.add_argument("-t", "--tty", action="store_true", help="run under a pseudo-terminal")
    sp.add_argument("-i", "--interactive", action="store_true",
                    help="keep stdin attached (else the container reads /dev/null)")
    sp.add_argument("--read-only", action="store_true",
                    help="read-only root (tmpfs on /tmp, /var/tmp, /run)")
    sp.add_argument("--security-opt", action="append", metavar="no-new-privileges",
                    help="no-new-privileges: setuid programs and file capabilities grant "
                    "nothing (off by default, as in docker and podman)")

    sp = add("ps", cmd_ps, "list containers started by casfs run")
    sp.add_argument("-a", "--all", action="store_true", help="exited ones too")
    sp.add_argument("-q", "--quiet", action="store_true", help="ids only")
    sp.add_argument("--json", action="store_true")
    _state_arg(sp)

    sp = add("rm", cmd_rm, "remove containers and their writable layers")
    sp.add_argument("containers", nargs="+", metavar="CONTAINER", help="name or id (prefix)")
    sp.add_argument("-f", "--force", action="store_true", help="kill a running one first")
    _state_arg(sp)
