"""`python -m casfs.run run|ps|rm ...`: the commands of casfs.run on their own, until
casfs/cli.py wires them as `casfs run|ps|rm`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from casfs.run.args import Handler, add_arguments


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="casfs")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command_name", required=True)

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    add_arguments(add)
    args = parser.parse_args(argv)
    os.umask(0o077)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
