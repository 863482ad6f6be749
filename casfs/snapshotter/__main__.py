"""`python -m casfs.snapshotter --address S --root D ...`: `casfs snapshotter` on its
own, until casfs/cli.py wires it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from casfs.errors import CasfsError
from casfs.snapshotter.command import Handler, add_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="casfs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command_name", required=True)

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    add_arguments(add)
    args = parser.parse_args(["snapshotter", *(sys.argv[1:] if argv is None else argv)])
    os.umask(0o077)
    try:
        return int(args.handler(args))
    except CasfsError as exc:
        print(f"casfs: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
