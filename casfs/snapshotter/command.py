"""`casfs snapshotter --address <socket> --root <dir>`: its arguments and handler. It
serves containerd's Snapshots API in the foreground (run it under the node's service
manager, beside containerd) until SIGTERM or SIGINT; casfs image mounts it made stay up
when it stops, so running containers keep their root filesystems."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from casfs.errors import CasfsError

Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]

DEFAULT_ADDRESS = "/run/casfs/snapshotter.sock"
DEFAULT_ROOT = "/var/lib/casfs/snapshotter"


def cmd_snapshotter(args: argparse.Namespace) -> int:
    import logging
    import signal
    import threading
    from pathlib import Path

    from casfs.locations import default_cache_dir, ensure_private_dir, resolve_store_url

    try:
        from casfs.snapshotter.service import Images, serve
    except ImportError as exc:
        raise CasfsError(f"the snapshotter needs grpcio and protobuf ({exc}): "
                         "pip install 'casfs[containers]'") from exc
    if os.geteuid() != 0:
        raise CasfsError("casfs snapshotter needs root (it mounts images and overlays)")
    # its own handler: the CLI configures the root logger for short-lived commands
    logger = logging.getLogger("casfs.snapshotter")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s casfs-snapshotter %(levelname)s: "
                                           "%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    logger.propagate = False
    root = Path(os.path.abspath(args.root))
    ensure_private_dir(root, "snapshotter root")
    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    ensure_private_dir(cache_dir)
    images = Images(root, resolve_store_url(args.store), cache_dir, args.mode, args.cache_size)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(os.path.abspath(args.address), root, images, stop=stop)
    return 0


def add_arguments(add: AddCommand) -> None:
    """Register `snapshotter` with `add(name, handler, help) -> subparser`."""
    sp = add("snapshotter", cmd_snapshotter, "serve containerd's snapshots API (a proxy "
             "plugin): images casfs indexed run without containerd pulling their layers")
    sp.add_argument("--address", default=DEFAULT_ADDRESS,
                    help=f"Unix socket to serve on (default {DEFAULT_ADDRESS})")
    sp.add_argument("--root", default=DEFAULT_ROOT,
                    help=f"snapshot state, root-only (default {DEFAULT_ROOT})")
    sp.add_argument("--store", help="store URL (default: $CASFS_STORE, else the local default)")
    sp.add_argument("--cache-dir", help="node cache directory (as for casfs mount)")
    sp.add_argument("--cache-size", default=os.environ.get("CASFS_CACHE_SIZE", "10G"))
    sp.add_argument("--mode", choices=["auto", "kernel", "fuse"],
                    default=os.environ.get("CASFS_MODE", "auto"),
                    help="serving mode of the image mounts (as for casfs mount)")
