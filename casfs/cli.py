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
from casfs.process import DAEMON_LOG_FORMAT

Handler = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace, create: bool = False):  # noqa: ANN202
    from casfs.store import open_store

    return open_store(args.store, create=create)


def cmd_index(args: argparse.Namespace) -> int:
    from casfs.progress import Progress, human_bytes
    from indexer.index import index_image
    from indexer.registry import registry_options

    registry = registry_options(creds=args.creds, username=args.username,
                                password_stdin=args.password_stdin, authfile=args.authfile,
                                tls_verify=args.tls_verify)
    store = _store(args, create=True)
    progress = Progress(enabled=False if args.quiet else None)
    result = index_image(args.image, store, tag=args.tag, platform=args.platform, progress=progress,
                         registry=registry, layer_workers=args.layer_jobs)
    if not args.quiet:
        up = result.upload
        print(
            f"indexed {result.image.ref} ({result.image.platform}): "
            f"{plural(len(result.image.layers), 'layer')} ({result.layers_reused} already "
            f"indexed), {human_bytes(result.uncompressed_bytes)}, "
            f"{plural(up.new_blobs, 'new blob')} ({human_bytes(up.uploaded_bytes)} stored) "
            f"in {result.seconds:.2f}s"
        )
        if args.tag:
            print(f"tagged {args.tag}")
    print(result.ref)
    return 0


def _load(args: argparse.Namespace, store=None):  # noqa: ANN001, ANN202
    """The manifest args.ref names, from args.store (or the store given)."""
    from casfs.manifest import Manifest
    from casfs.refs import resolve_ref

    store = store or _store(args)
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
    from casfs.inspect import pack_summary, summarize
    from casfs.progress import human_bytes

    store = _store(args)
    m = _load(args, store)
    s = summarize(m)
    packs = pack_summary(store, m)
    if args.json:
        print(json.dumps({"digest": m.digest, "meta": m.meta, **s.as_dict(),
                          "dir_packs": packs}, indent=2))
        return 0
    meta = m.meta
    print(f"manifest      blake3:{m.digest}")
    print(f"image         {meta.get('image')} ({meta.get('platform')})")
    print(f"layers        {plural(len(meta.get('layers', [])), 'layer')}, "
          f"{human_bytes(s.layer_bytes)} uncompressed")
    kinds = ", ".join(f"{k}:{v}" for k, v in sorted(s.by_type.items()))
    print(f"entries       {s.entries} ({kinds})")
    print(f"file bytes    {human_bytes(s.file_bytes)} in {s.chunks} chunks")
    print(f"unique        {human_bytes(s.unique_bytes)} in {s.unique_chunks} chunks")
    saved = s.layer_bytes - s.unique_bytes
    pct = 100.0 * saved / s.layer_bytes if s.layer_bytes else 0.0
    print(f"dedup saved   {human_bytes(saved)} against the layers ({pct:.1f}%)")
    print(f"chunking      {meta.get('chunking') or meta.get('chunk_size')}")
    print(f"dir packs     {plural(packs['chunks'], 'small-file blob')} in "
          f"{plural(packs['packs'], 'pack')} ({human_bytes(packs['stored_bytes'])} stored), "
          f"{packs['layers_packed']} of {plural(packs['layers'], 'layer')} packed"
          + (f", {packs['rejected']} pack indexes damaged" if packs["rejected"] else ""))
    return 0


class _VersionAction(argparse.Action):
    """--version, looked up only when asked (importlib.metadata costs every command ~8 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"casfs {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("casfs")
    except PackageNotFoundError:
        from casfs import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="casfs", description="Content-addressed lazy container filesystem")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details to stderr")
    p.add_argument("--version", action=_VersionAction, nargs=0,
                   help="show casfs's version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(handler=handler)
        return sp

    def store_arg(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--store", help="store URL: file:///abs/path or s3://bucket/prefix "
                        "(default: $CASFS_STORE, else the local default store)")

    sp = add("index", cmd_index, "index an image or a directory (tree:<path>) into the store; "
             "prints its manifest reference last")
    sp.add_argument("image", help="oci:<dir>[:<tag>] | docker-archive:<file.tar> | "
                    "docker://host/repo:tag | tree:<directory>")
    store_arg(sp)
    sp.add_argument("--tag", help="also name the manifest with this tag")
    sp.add_argument("--platform", help="OS/ARCH[/VARIANT] to pick from a multi-platform image")
    sp.add_argument("-q", "--quiet", action="store_true", help="print only the manifest reference")
    sp.add_argument("--creds", metavar="USER:PASS",
                    help="registry credentials, visible to every user in ps: prefer "
                    "--username with --password-stdin (default: --authfile, "
                    "$REGISTRY_AUTH_FILE, containers auth.json, ~/.docker/config.json)")
    sp.add_argument("-u", "--username", metavar="USER",
                    help="registry user; the password comes from stdin (--password-stdin) "
                    "or $CASFS_REGISTRY_PASSWORD")
    sp.add_argument("--password-stdin", action="store_true",
                    help="read the registry password from stdin (needs --username)")
    sp.add_argument("--authfile", metavar="PATH",
                    help="auth file in docker/podman format ({\"auths\": {HOST: {\"auth\": ...}}})")

    def tls_bool(text: str) -> bool:
        value = text.strip().lower()
        if value in ("true", "1", "yes", "on"):
            return True
        if value in ("false", "0", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")

    sp.add_argument("--layer-jobs", type=int, metavar="N",
                    help="layers read at once (default 3 from a registry, 1 from local files)")
    sp.add_argument("--tls-verify", type=tls_bool, nargs="?", const=True, default=True,
                    metavar="BOOL", help="require https with a verified certificate (default "
                    "true); --tls-verify=false also accepts plain http, as skopeo does")

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
    from casfs.run import add_arguments as add_run_commands
    from casfs.snapshotter import add_arguments as add_snapshotter_command

    add_run_commands(add)
    add_snapshotter_command(add)
    return p


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5T', '4096' -> bytes (powers of 1024; prefetch.policy's parser,
    light to import); a UsageError for anything else."""
    from prefetch.policy import parse_bytes

    try:
        size = parse_bytes(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if size is None:
        raise UsageError(f"bad size {text!r}: use e.g. 512M, 10G")
    return size


def _background_settings(args: argparse.Namespace) -> dict[str, object]:
    """The mount's background-fetch policy (flags, else CASFS_BACKGROUND_* here), checked
    before anything forks and resolved here: the daemon an agent starts does not see this
    shell's environment."""
    from prefetch.policy import StreamPolicy

    try:
        policy = StreamPolicy.from_settings({"background_fetch": args.background_fetch,
                                             "background_cap": args.background_cap,
                                             "background_rate": args.background_rate})
    except ValueError as exc:
        raise UsageError(f"background fetch: {exc}") from None
    return policy.settings()


def cmd_mount(args: argparse.Namespace) -> int:
    from casfs.locations import (
        default_cache_dir,
        ensure_private_dir,
        mount_log_path,
        resolve_store_url,
    )
    from casfs.mountconfig import MountConfig

    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    ensure_private_dir(cache_dir)
    cfg = MountConfig(
        ref=args.ref, mountpoint=args.mountpoint, store_url=resolve_store_url(args.store),
        cache_dir=cache_dir, cache_size=parse_size(args.cache_size),
        foreground=args.foreground, metrics_port=args.metrics_port,
        allow_suid=args.suid, allow_dev=args.dev,
        prefetch=not args.no_prefetch, trace=not args.no_trace, trace_idle=args.trace_idle,
        readahead_kb=args.readahead_kb, extra=_background_settings(args),
    )
    mode, why = _choose_mode(args.mode, metrics_port=args.metrics_port)
    if mode == "kernel":
        return _mount_kernel(args, cfg, mode_asked=args.mode)
    if args.foreground:
        from casfs.daemon import run_foreground

        return run_foreground(cfg, args.ready_fd)
    log_path = mount_log_path(cache_dir, args.mountpoint)
    cfg.mountpoint = os.path.abspath(args.mountpoint)
    pid = None
    if not args.no_agent:
        from casfs.agent import AgentUnavailable, mount_via_agent

        try:
            pid = mount_via_agent(cfg, verbose=args.verbose)
            via = " by the node agent"
        except AgentUnavailable:
            pid = None  # no agent on this cache dir: fork the daemon here
    if pid is None:
        from casfs.cache import ChunkCache
        from casfs.daemon import spawn_background

        ChunkCache(cache_dir, cfg.cache_size).close()  # fail early on a bad cache dir
        pid = spawn_background(cfg, log_path, verbose=args.verbose)
        via = ""
    print(f"mounted {args.ref} at {args.mountpoint}{via} (fuse mode{why}: daemon pid {pid}, "
          f"log {log_path})")
    _note_stock_pyfuse3(cfg.mountpoint)
    print(f"casfs: {allowances(cfg.allow_suid, cfg.allow_dev)}", file=sys.stderr)
    return 0


def _note_stock_pyfuse3(mountpoint: str) -> None:
    """Say so on the terminal when the daemon runs a stock pyfuse3: every open and
    directory listing then reaches it (scripts/install.sh builds the patched one)."""
    try:  # the name casfs.vfs.STATS_XATTR, without importing the model here
        mount = json.loads(os.getxattr(mountpoint, "user.casfs.stats")).get("mount", {})
    except (OSError, ValueError):
        return
    if mount.get("kernel_no_open") is False:
        print("casfs: note: pyfuse3 lacks casfs's patch, so every open and directory listing "
              "reaches the daemon (slower); scripts/install_pyfuse3.sh builds the patched one "
              "(third_party/pyfuse3)", file=sys.stderr)


def _choose_mode(asked: str, metrics_port: int | None = None) -> tuple[str, str]:
    """The serving mode for `--mode asked` and, for FUSE in auto mode, why (", ..."). """
    if asked == "fuse":
        return "fuse", ""
    if metrics_port is not None:
        if asked == "kernel":
            raise UsageError("--metrics-port is served by a FUSE-mode daemon; a kernel-mode "
                             "mount reports through `casfs stats`")
        return "fuse", ", as --metrics-port asks for a daemon of its own"
    from casfs.kernel.support import unsupported_reason

    reason = unsupported_reason()
    if reason is None:
        return "kernel", ""
    if asked == "kernel":
        from casfs.errors import MountError

        raise MountError(f"kernel mode is not available: {reason}")
    return "fuse", f", as {reason}"


def _mount_kernel(args: argparse.Namespace, cfg: object, mode_asked: str) -> int:
    from casfs.kernel import client
    from casfs.mountconfig import MountConfig

    assert isinstance(cfg, MountConfig)
    cfg.mode = "kernel"
    cfg.mountpoint = os.path.abspath(args.mountpoint)
    if args.foreground:
        raise UsageError("--foreground is for FUSE mode: kernel-mode mounts are served by "
                         "the node view (--mode fuse --foreground to debug a daemon)")
    try:
        pid = client.mount(cfg, verbose=args.verbose)
    except client.KernelFallback as fb:
        if mode_asked == "kernel":
            from casfs.errors import MountError

            raise MountError(f"this image cannot be served in kernel mode: {fb}") from None
        args.mode = "fuse"
        print(f"casfs: serving in fuse mode: {fb}", file=sys.stderr)
        return cmd_mount(args)
    print(f"mounted {args.ref} at {args.mountpoint} (kernel mode: daemon pid {pid}, "
          f"log {client.log_path(cfg.cache_dir)})")
    print(f"casfs: {allowances(cfg.allow_suid, cfg.allow_dev)}", file=sys.stderr)
    return 0


def allowances(suid: bool, dev: bool) -> str:
    """What a mount lets its users do beyond reading, in words."""
    said = ["setuid bits and file capabilities honoured" if suid else
            "nosuid: setuid bits and file capabilities ignored (--suid to honour them)",
            "device nodes usable" if dev else "nodev: device nodes unusable (--dev to allow)"]
    return "; ".join(said)


def cmd_agent(args: argparse.Namespace) -> int:
    from casfs.agent import (
        agent_report,
        agent_status_code,
        restart_agent,
        start_agent,
        stop_agent,
    )
    from casfs.locations import default_cache_dir

    cache_dir = os.path.abspath(args.cache_dir or default_cache_dir())
    if args.action == "start":
        pid = start_agent(cache_dir, foreground=args.foreground, verbose=args.verbose,
                          metrics=args.metrics_port)
        if not args.foreground:
            print(f"agent serving {cache_dir} (pid {pid}, log {cache_dir}/logs/agent.log)")
        return 0
    if args.action == "stop":
        stopped = stop_agent(cache_dir)
        print(f"agent (pid {stopped}) stopped; its mounts keep serving (without failover "
              "until an agent runs again)" if stopped else f"no agent serves {cache_dir}")
        return 0
    if args.action == "restart":
        done = restart_agent(cache_dir, verbose=args.verbose, metrics=args.metrics_port)
        if done.started_fresh:
            print(f"no agent was running: agent serving {cache_dir} (pid {done.pid})")
            return 0
        print(f"agent restarted (pid {done.pid}): {plural(len(done.replaced), 'daemon')} "
              "replaced, nothing unmounted")
        for key, old, new, stall in done.replaced:
            print(f"  {key}: pid {old} -> {new}, {stall * 1000:.0f} ms")
        for key, why in sorted(done.not_replaced.items()):
            print(f"  {key}: not replaced: {why}")
        return 1 if done.not_replaced else 0
    code = agent_status_code(cache_dir)  # as systemctl: 0, 1 (died), 3 (not running), 4
    report = agent_report(cache_dir) if code == 0 else None
    if args.json:
        print(json.dumps({"status": code, "agent": report}, indent=2))
        return code
    if report is None:
        print({1: f"no agent serves {cache_dir} (its pid file remains: it was killed)",
               4: f"cannot tell whether an agent serves {cache_dir}"}.get(
                   code, f"no agent serves {cache_dir}"))
        return code
    metrics = f", metrics on {report['metrics']}" if report.get("metrics") else ""
    print(f"agent serving {cache_dir} (pid {report['pid']}, casfs {report['version']} "
          f"code {report['code']}{metrics})")
    for held in report["held"]:
        restarts = ", ".join(f"{k} {v}" for k, v in sorted(held["restarts"].items()))
        what = (f"{plural(len(held['mounts']), 'kernel-mode mount')}" if held["kind"] == "view"
                else held["image"])
        print(f"  {held['kind']:<5} {held['key']}  pid {held['pid']} {held['state']}"
              f"{'' if held['linked'] else ' (not linked)'}: {what}"
              f"{'; restarts: ' + restarts if restarts else ''}")
    return code


def cmd_umount(args: argparse.Namespace) -> int:
    from casfs.mounts import kernel_record, unmount

    record = kernel_record(args.mountpoint)
    if record is not None:
        from casfs.kernel import client

        client.unmount(os.path.realpath(args.mountpoint), record)
    else:
        unmount(args.mountpoint)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    import errno

    from casfs.errors import ServiceUnavailable
    from casfs.mounts import find_record
    from casfs.vfs import STATS_XATTR

    record = find_record(os.path.realpath(args.mountpoint))
    try:
        if record and record.get("mode") == "kernel":
            from casfs.kernel import client

            try:
                answer = client.stats(str(record["cache_dir"]), args.mountpoint)
            except ServiceUnavailable:
                raise CasfsError(f"the node view serving {args.mountpoint} is gone (a stale "
                                 f"mount): run `casfs umount {args.mountpoint}`") from None
            raw = json.dumps(answer).encode()
        else:
            raw = os.getxattr(args.mountpoint, STATS_XATTR)
    except OSError as exc:
        if exc.errno in (errno.ENOTCONN, errno.ECONNABORTED):
            raise CasfsError(f"the daemon of {args.mountpoint} is gone (a stale mount): "
                             f"run `casfs umount {args.mountpoint}`") from exc
        raise CasfsError(f"{args.mountpoint} is not a casfs mount ({exc.strerror})") from exc
    stats = json.loads(raw)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    from casfs.statstext import stats_lines

    print("\n".join(stats_lines(stats)))
    return 0


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    from casfs.statstext import plural as _plural

    return _plural(n, noun, nouns)


def cmd_cache(args: argparse.Namespace) -> int:
    from casfs.cache import ChunkCache, default_cache_dir
    from casfs.progress import human_bytes

    cache = ChunkCache(args.cache_dir or default_cache_dir(), parse_size(args.cache_size))
    if args.action == "stats":
        usage = cache.usage()
        held = cache.total_bytes()
        if args.json:
            print(json.dumps({"dir": str(cache.root), "bytes": held,
                              "max_bytes": cache.max_bytes, **usage}, indent=2))
            return 0
        print(f"cache dir   {cache.root}")
        print(f"held        {human_bytes(held)} of {human_bytes(cache.max_bytes)}"
              f" ({100 * held / max(cache.max_bytes, 1):.1f}%)")
        print(f"chunks      {plural(usage['chunks'], 'chunk')}, "
              f"{human_bytes(usage['chunk_bytes'])}")
        print(f"objects     {plural(usage['objects'], 'whole file')} (kernel mode), "
              f"{human_bytes(usage['object_bytes'])}")
    elif args.action == "verify":
        checked, dropped = cache.verify_all()
        print(f"checked {plural(checked, 'file')}: {plural(dropped, 'damaged file')} dropped "
              "(fetched again when next needed)")
        return 5 if dropped else 0
    elif args.action == "prune":
        removed, freed = cache.prune()
        evicted = cache.evict()
        print(f"removed {removed} orphaned files ({freed} bytes); evicted {evicted} bytes")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from casfs.check import cmd_check as check

    return check(args)


def cmd_tag(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action == "ls":
        for name in store.list_tags():
            print(f"{name}\tblake3:{store.get_tag(name)}")
    elif args.action == "rm":
        for name in args.names:
            store.get_tag(name)
            store.delete_tag(name)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from casfs.gc import collect, parse_duration
    from casfs.progress import Progress, human_bytes

    store = _store(args)
    progress = Progress()
    report = collect(store, grace=parse_duration(args.grace), dry_run=args.dry_run,
                     progress=lambda s: progress.update(s, force=True))
    progress.done()
    verb = "would delete" if args.dry_run else "deleted"
    swept = ", ".join(f"{n} {k}" for k, n in sorted(report.swept.items())) or "nothing"
    kept = ", ".join(f"{n} {k}" for k, n in sorted(report.kept.items())) or "nothing"
    print(f"live manifests: {report.live_manifests}")
    print(f"{verb}: {swept} ({human_bytes(report.swept_bytes)})")
    print(f"kept: {kept} ({report.young_kept} only for being younger than the grace period)")
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from casfs.progress import human_bytes
    from prefetch.replay import PrefetchStatus, load_traces
    from prefetch.trace import merge

    store = _store(args)
    m = _load(args, store)
    status = PrefetchStatus()
    traces = load_traces(store, m, status, max_traces=args.max_traces)
    if not traces:
        print(f"no traces for {m.digest}" + (f" ({status.rejected_traces} rejected)"
                                                 if status.rejected_traces else ""))
        return 0
    plan = merge(traces)
    print(f"manifest      blake3:{m.digest}")
    print(f"traces        {len(traces)} boots merged (from {status.source}); "
          f"{status.rejected_traces} rejected")
    for t in traces:
        size = sum(c.length for c in t.chunks)
        print(f"  {t.trace_id}  {len(t.chunks)} chunks, {human_bytes(size)}, boot {t.boot_seconds:.1f}s,"
              f" pack {t.pack[:16] + '...' if t.pack else 'none'}")
    print(f"prefetch plan {len(plan)} chunks, {human_bytes(sum(p.length for p in plan))}")
    files: dict[str, tuple[float, int]] = {}
    for t in traces:
        for c in t.chunks:
            first, total = files.get(c.path, (c.t_ms, 0))
            files[c.path] = (min(first, c.t_ms), total + c.length)
    ordered = sorted(files.items(), key=lambda kv: kv[1][0])
    print(f"files         {len(ordered)}, in first-access order:")
    for path, (t_ms, size) in ordered[: args.limit]:
        print(f"  {t_ms:>8.0f} ms  {human_bytes(size):>10}  {path}")
    if len(ordered) > args.limit:
        print(f"  ... {len(ordered) - args.limit} more (--limit)")
    return 0


def _add_more_commands(add: Callable[..., argparse.ArgumentParser], store_arg: Callable) -> None:
    sp = add("mount", cmd_mount, "mount an indexed image read-only (returns once it serves)")
    sp.add_argument("ref", help="manifest digest or tag")
    sp.add_argument("mountpoint")
    store_arg(sp)
    sp.add_argument("--cache-dir", help="node cache directory (default: $CASFS_CACHE_DIR, "
                    "else /var/cache/casfs as root, else ~/.cache/casfs)")
    sp.add_argument("--cache-size", default=os.environ.get("CASFS_CACHE_SIZE", "10G"),
                    help="cache size cap, e.g. 20G (default 10G or $CASFS_CACHE_SIZE)")
    sp.add_argument("--foreground", action="store_true", help="stay attached, log to stderr")
    sp.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    sp.add_argument("--suid", action="store_true",
                    help="honour setuid/setgid bits and file capabilities (security.* xattrs); "
                    "off by default: every user of the node can reach a root mount")
    sp.add_argument("--dev", action="store_true",
                    help="let device nodes open devices (off by default)")
    sp.add_argument("--nosuid", action="store_true", help=argparse.SUPPRESS)  # the default now
    sp.add_argument("--nodev", action="store_true", help=argparse.SUPPRESS)  # the default now
    sp.add_argument("--no-prefetch", action="store_true",
                    help="do not replay earlier boots' traces nor guess ahead")
    sp.add_argument("--no-trace", action="store_true", help="do not record this boot's trace")
    sp.add_argument("--trace-idle", type=float, default=10.0, metavar="SECONDS",
                    help="the boot ends after this long with no new first access and no read "
                    "in flight (default 10)")
    sp.add_argument("--background-fetch", choices=["auto", "off", "likely", "all"],
                    help="with no trace for the image, stream into the cache behind the boot: "
                    "off, likely (what a boot is likely to read), all (the whole image); auto "
                    "(default, or $CASFS_BACKGROUND_FETCH): likely for images, off for trees")
    sp.add_argument("--background-cap", metavar="SIZE",
                    help="bytes the background fetch may bring in all, e.g. 500M (default, or "
                    "$CASFS_BACKGROUND_CAP: the image's stored size)")
    sp.add_argument("--background-rate", metavar="RATE",
                    help="bandwidth cap of the background fetch, e.g. 50M/s (default, or "
                    "$CASFS_BACKGROUND_RATE: none)")
    sp.add_argument("--readahead-kb", type=int, default=1024, metavar="KB",
                    help="kernel readahead window on the mount (default 1024; as root)")
    sp.add_argument("--mode", choices=["auto", "kernel", "fuse"],
                    default=os.environ.get("CASFS_MODE", "auto"),
                    help="kernel: EROFS + overlayfs, the kernel serves what the node holds "
                    "(root, Linux 6.12+); fuse: every request through the daemon; auto "
                    "(default, or $CASFS_MODE): kernel where the node supports it")
    sp.add_argument("--no-agent", action="store_true",
                    help="fork the daemon here even when a node agent serves the cache dir")
    sp.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    sp = add("agent", cmd_agent, "the node agent: starts mount daemons already warm, holds "
             "every mount's FUSE connection for failover, serves the node's metrics")
    sp.add_argument("action", choices=["start", "stop", "status", "restart"],
                    help="restart: replace the agent and every daemon it holds with the "
                    "casfs installed now, unmounting nothing; status exits 0 running, "
                    "1 dead (pid file left), 3 not running, 4 unknown (as systemctl)")
    sp.add_argument("--cache-dir", help="the node cache directory it serves (as for mount)")
    sp.add_argument("--foreground", action="store_true", help="start: stay attached "
                    "(under systemd: Type=notify, logs on the journal)")
    sp.add_argument("--metrics-port", metavar="[HOST:]PORT",
                    help="start/restart: serve the node's Prometheus metrics, every mount of "
                    "the cache dir, on HOST:PORT (host 127.0.0.1 unless given; default "
                    "$CASFS_AGENT_METRICS)")
    sp.add_argument("--json", action="store_true", help="status: as JSON")

    sp = add("umount", cmd_umount, "unmount a casfs mount and stop its daemon")
    sp.add_argument("mountpoint")

    sp = add("stats", cmd_stats, "counters of a running mount")
    sp.add_argument("mountpoint")
    sp.add_argument("--json", action="store_true")

    sp = add("cache", cmd_cache, "the node cache: stats; prune orphans and evict to the cap; "
             "verify (re-hash every file, drop damaged ones: kernel mode reads them unchecked)")
    sp.add_argument("action", choices=["stats", "prune", "verify"])
    sp.add_argument("--json", action="store_true", help="stats: as JSON")
    sp.add_argument("--cache-dir")
    sp.add_argument("--cache-size", default=os.environ.get("CASFS_CACHE_SIZE", "10G"))

    sp = add("trace", cmd_trace, "show the boot traces recorded for an image")
    sp.add_argument("action", choices=["show"])
    sp.add_argument("ref", help="manifest digest or tag")
    sp.add_argument("--limit", type=int, default=40, help="files to list")
    sp.add_argument("--max-traces", type=int, default=8)
    store_arg(sp)

    sp = add("gc", cmd_gc, "delete store objects no tag (or recent manifest) reaches")
    sp.add_argument("--dry-run", action="store_true", help="report what would be deleted")
    sp.add_argument("--grace", default="6h",
                    help="never delete objects younger than this (default 6h; e.g. 30m, 7d)")
    store_arg(sp)

    sp = add("check", cmd_check, "verify the store: tags, manifests, blobs, layer records, "
             "pack indexes, packs, traces; exit 11 when it finds problems (changes nothing)")
    sp.add_argument("--read-data", action="store_true",
                    help="also download and verify every blob and every live pack entry")
    sp.add_argument("--jobs", type=int, default=8, metavar="N",
                    help="requests in flight (default 8)")
    store_arg(sp)

    sp = add("tag", cmd_tag, "list or remove tags")
    sp.add_argument("action", choices=["ls", "rm"])
    sp.add_argument("names", nargs="*")
    store_arg(sp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.umask(0o077)  # stores, caches, logs and records casfs writes are private
    daemon = getattr(args, "foreground", False)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if daemon else logging.WARNING,
        format=DAEMON_LOG_FORMAT if daemon else "casfs: %(levelname)s: %(message)s",
    )
    try:
        return args.handler(args)
    except CasfsError as exc:
        print(f"casfs: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("casfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into something that stopped reading (e.g. `| head`).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UsageError as exc:  # pragma: no cover - UsageError is a CasfsError
        print(f"casfs: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
