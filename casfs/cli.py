"""The `casfs` command line: parses arguments, wires the parts, and is the one place
that turns a CasfsError into a one-line message and an exit status."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from casfs.errors import CasfsError, UsageError

Handler = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace, create: bool = False):  # noqa: ANN202
    from casfs.store import open_store

    return open_store(args.store, create=create)


def cmd_index(args: argparse.Namespace) -> int:
    from casfs.progress import Progress
    from indexer.index import index_image

    store = _store(args, create=True)
    progress = Progress(enabled=False if args.quiet else None)
    result = index_image(args.image, store, tag=args.tag, platform=args.platform, progress=progress)
    if not args.quiet:
        up = result.upload
        print(
            f"indexed {result.image.ref} ({result.image.platform}): {len(result.image.layers)} layers "
            f"({result.layers_reused} already indexed), {result.uncompressed_bytes} bytes, "
            f"{up.new_blobs} new blobs ({up.uploaded_bytes} bytes stored) in {result.seconds:.2f}s"
        )
        if args.tag:
            print(f"tagged {args.tag}")
    print(result.ref)
    return 0


def _load(args: argparse.Namespace):  # noqa: ANN202
    from casfs.manifest import Manifest
    from casfs.refs import resolve_ref

    store = _store(args)
    digest = resolve_ref(store, args.ref)
    return Manifest(store.get_manifest(digest), digest)


def cmd_ls(args: argparse.Namespace) -> int:
    import stat

    from casfs.inspect import ls_line

    m = _load(args)
    ino = m.resolve(args.path)
    if not ino:
        raise CasfsError(f"{args.path}: no such file or directory in the image")
    node = m.inode(ino)
    base = os.fsencode(args.path.rstrip("/"))
    if stat.S_ISDIR(node.mode) and not args.directory:
        if args.recursive:
            items = list(m.walk(ino, base))
        else:
            items = [(base + b"/" + name, child) for _, name, child in m.entries(ino)]
    else:
        items = [(base or b"/", ino)]
    out = sys.stdout
    for path, child in items:
        out.write(ls_line(m, path, child, m.inode(child)) + "\n")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from casfs.inspect import summarize
    from casfs.progress import human_bytes

    m = _load(args)
    s = summarize(m)
    if args.json:
        print(json.dumps({"digest": m.digest, "meta": m.meta, **s.as_dict()}, indent=2))
        return 0
    meta = m.meta
    print(f"manifest      blake3:{m.digest}")
    print(f"image         {meta.get('image')} ({meta.get('platform')})")
    print(f"layers        {len(meta.get('layers', []))}, {human_bytes(s.layer_bytes)} uncompressed")
    kinds = ", ".join(f"{k}:{v}" for k, v in sorted(s.by_type.items()))
    print(f"entries       {s.entries} ({kinds})")
    print(f"file bytes    {human_bytes(s.file_bytes)} in {s.chunks} chunks")
    print(f"unique        {human_bytes(s.unique_bytes)} in {s.unique_chunks} chunks")
    saved = s.layer_bytes - s.unique_bytes
    pct = 100.0 * saved / s.layer_bytes if s.layer_bytes else 0.0
    print(f"dedup saved   {human_bytes(saved)} against the layers ({pct:.1f}%)")
    print(f"chunk size    {meta.get('chunk_size')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casfs", description="Content-addressed lazy container filesystem")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    def store_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", help="store URL: file:///abs/path or s3://bucket/prefix "
                        "(default: $CASFS_STORE, else the local default store)")

    sp = add("index", cmd_index, "index an image into the store; prints its manifest reference last")
    sp.add_argument("image", help="oci:<dir>[:<tag>] | docker-archive:<file.tar> | docker://host/repo:tag")
    store_arg(sp)
    sp.add_argument("--tag", help="also name the manifest with this tag")
    sp.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")
    sp.add_argument("-q", "--quiet", action="store_true", help="print only the manifest reference")

    sp = add("ls", cmd_ls, "list a path inside an indexed image")
    sp.add_argument("ref", help="manifest digest or tag")
    sp.add_argument("path", nargs="?", default="/")
    sp.add_argument("-R", "--recursive", action="store_true")
    sp.add_argument("-d", "--directory", action="store_true", help="list the directory itself")
    store_arg(sp)

    sp = add("inspect", cmd_inspect, "summarise an indexed image: entries, bytes, chunks, dedup")
    sp.add_argument("ref", help="manifest digest or tag")
    sp.add_argument("--json", action="store_true")
    store_arg(sp)

    _add_more_commands(add, store_arg)
    return p


def _add_more_commands(add: Callable[..., argparse.ArgumentParser], store_arg: Callable) -> None:
    """Commands owned by other modules register here (mount, tags, ...)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="casfs: %(levelname)s: %(message)s",
    )
    try:
        return args.handler(args)
    except CasfsError as exc:
        print(f"casfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("casfs: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:  # pragma: no cover - UsageError is a CasfsError
        print(f"casfs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
