"""The mount daemon: from a reference to a serving FUSE mount, in the foreground or
as a background process that `casfs mount` waits for until the mount serves.

Start-up work is kept to what serving needs: resolve the reference, make the
manifest local (fetched once per node, verified, then mmapped), open the cache,
mount. SIGTERM and SIGINT unmount cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

import trio

from casfs.cache import ChunkCache
from casfs.errors import CasfsError, MountError
from casfs.fetch import Fetcher
from casfs.localimage import open_image
from casfs.metrics import MountMetrics
from casfs.mountconfig import MountConfig
from casfs.mounts import prepare_mountpoint, remove_record, tune_kernel, write_record
from casfs.process import (
    FAILED,
    READY,
    ReadyPipe,
    detach,
    last_error_line,
    open_log,
    raise_open_files_limit,
    read_until,
    reap,
)
from casfs.vfs import ImageFS
from prefetch.session import PrefetchSession

log = logging.getLogger(__name__)


def mount_options(cfg: MountConfig) -> set[str]:
    """FUSE mount options: read-only, the kernel checks modes; as root, reachable by
    every user (containers run as any uid), so setuid and devices only when asked."""
    opts = {"fsname=casfs", "subtype=casfs", "ro", "default_permissions"}
    opts.add("suid" if cfg.allow_suid else "nosuid")
    opts.add("dev" if cfg.allow_dev else "nodev")
    if os.geteuid() == 0:
        opts.add("allow_other")
    return opts


def serve(cfg: MountConfig, ready: ReadyPipe | None = None) -> None:
    """Mount and serve until unmounted or signalled (blocks)."""
    import pyfuse3

    from casfs.fuse_ops import CasfsOperations

    started = time.monotonic()
    raise_open_files_limit(8192)  # the cache holds up to OPEN_FILES_MAX chunk files open
    cache = ChunkCache(cfg.cache_dir, cfg.cache_size)
    store, manifest = open_image(cfg.ref, cfg.store_url, cache)
    mountpoint = prepare_mountpoint(cfg.mountpoint)
    metrics = MountMetrics()
    fetcher = Fetcher(store, cache, metrics, fetch_concurrency=cfg.fetch_concurrency)
    session = PrefetchSession(manifest, store, fetcher, prefetch=cfg.prefetch,
                              record=cfg.trace, trace_idle=cfg.trace_idle)
    no_open = [False]

    def extra_stats() -> dict:
        return {"mount": {"digest": manifest.digest, "pid": os.getpid(), "mode": "fuse",
                          "uptime_seconds": round(time.monotonic() - started, 3),
                          "kernel_no_open": no_open[0]},
                "prefetch": session.stats()}

    fs = ImageFS(manifest, fetcher, metrics, extra_stats,
                 security_xattrs=cfg.allow_suid)
    session.attach(fs)
    ops = CasfsOperations(fs)
    no_open[0] = ops.no_open
    if not ops.no_open:
        log.warning("pyfuse3 lacks casfs's inode-fh patch: every open and directory "
                    "listing reaches the daemon (see third_party/pyfuse3)")
    if cfg.metrics_port is not None:
        try:
            _start_metrics(cfg.metrics_port, metrics, fetcher)
        except OSError as exc:
            raise MountError(
                f"cannot serve metrics on 127.0.0.1:{cfg.metrics_port}: {exc.strerror}"
            ) from exc

    async def main() -> None:
        try:
            pyfuse3.init(ops, mountpoint, mount_options(cfg))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mountpoint}: {exc}") from exc
        try:
            write_record(mountpoint, {"pid": os.getpid(), "mountpoint": mountpoint,
                                      "digest": manifest.digest, "cache_dir": str(cache.root),
                                      "mode": "fuse"})
            log.info("mounted %s at %s in %.3fs (fuse mode)", manifest.digest, mountpoint,
                     time.monotonic() - started)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, nursery.cancel_scope)
                # Prefetch starts while the mount gets ready: a boot's first reads (the
                # interpreter, libpython) come right after "ready", and each one the
                # plan is not yet there for is a GET of its own, in series.
                await nursery.start(session.run)
                nursery.start_soon(_announce_ready, mountpoint, cfg, ready)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            remove_record(mountpoint)
            log.info("unmounted %s", mountpoint)
            await session.close()

    trio.run(main)


async def _announce_ready(mountpoint: str, cfg: MountConfig, ready: ReadyPipe | None) -> None:
    """Once the mount answers a request (so the kernel's INIT is done, which resets the
    readahead window), tune the kernel's side of the mount, then tell `casfs mount`."""
    await trio.to_thread.run_sync(os.statvfs, mountpoint)
    tuned = await trio.to_thread.run_sync(
        tune_kernel, mountpoint, cfg.readahead_kb, cfg.max_background
    )
    log.info("kernel tuning: %s", ", ".join(tuned) or "none (not root?)")
    if ready is not None:
        ready.ready()


async def _watch_signals(scope: trio.CancelScope) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def _start_metrics(port: int, metrics: MountMetrics, fetcher: Fetcher) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from casfs.metrics import PrometheusCollector

    registry = CollectorRegistry()

    def gauges() -> dict[str, float]:
        cache = fetcher.cache_stats()
        return {"cache_bytes": cache["bytes"], "cache_max_bytes": cache["max_bytes"]}

    registry.register(PrometheusCollector(metrics, gauges))
    start_http_server(port, addr="127.0.0.1", registry=registry)


def spawn_background(cfg: MountConfig, log_path: Path, verbose: bool = False,
                     timeout: float = 60.0) -> int:
    """Fork the mount daemon off this process; return its pid once it serves.

    Forking (rather than starting a new interpreter) saves a Python start-up and the
    re-import of casfs: `casfs mount` returns in the time the daemon needs to open the
    cache and manifest and answer the kernel. The daemon reports "ready", or its one-line
    error, through a pipe; its log goes to log_path.
    """
    read_fd, write_fd = os.pipe()
    log_fd = open_log(log_path)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_fd)
            detach(log_fd, verbose)
            code = serve_reporting(cfg, write_fd)
        finally:
            logging.shutdown()
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    os.close(log_fd)
    deadline = time.monotonic() + timeout
    try:
        buf = read_until(read_fd, deadline, lambda got: got.startswith(READY))
    finally:
        os.close(read_fd)
    if buf.startswith(READY):
        return pid
    if buf.startswith(FAILED):
        reap(pid, 5.0)
        message = buf[len(FAILED):].decode(errors="replace").strip()
        raise MountError(message or f"the mount daemon failed; see {log_path}")
    code = reap(pid, max(1.0, deadline - time.monotonic()))
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        raise MountError(f"the mount daemon did not become ready; see {log_path}")
    tail = last_error_line(log_path)
    raise MountError(tail or f"the mount daemon exited with status {code}; see {log_path}")


def serve_reporting(cfg: MountConfig, ready_fd: int) -> int:
    """Serve; an error before "ready" goes back through the pipe as well as the log.
    Returns the daemon's exit status."""
    pipe = ReadyPipe(ready_fd)
    try:
        serve(cfg, pipe)
    except CasfsError as exc:
        print(f"casfs: error: {exc}", file=sys.stderr)
        pipe.fail(str(exc))
        return exc.exit_code
    except BaseException as exc:
        log.exception("the mount daemon failed")
        pipe.fail(f"the mount daemon failed: {exc!r}")
        return 1
    return 0


def run_foreground(cfg: MountConfig, ready_fd: int | None) -> int:
    """`casfs mount --foreground`: serve attached (--ready-fd: tell a supervisor when ready)."""
    pipe = ReadyPipe(ready_fd)
    try:
        serve(cfg, pipe)
    except CasfsError as exc:
        pipe.fail(str(exc))
        raise
    return 0
