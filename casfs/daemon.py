"""The mount daemon: from a reference to a serving FUSE mount, in the foreground or
as a background process that `casfs mount` waits for until the mount serves.

Start-up work is kept to what serving needs: resolve the reference, make the
manifest local (fetched once per node, verified, then mmapped), open the cache,
mount. SIGTERM and SIGINT unmount cleanly; SIGHUP reopens the log file (never unmounts).

Failover (casfs.failover): once serving, the daemon links to the node agent of its
cache directory, if one runs (or whenever one starts later), and hands it a duplicate
of its /dev/fuse descriptor. If the daemon dies, the agent starts a successor with a
`Takeover`: it serves the same connection (pyfuse3.init_takeover, no new mount), has
the kernel resend what the dead one had read and not answered, and carries on. Asked
for a handover (an upgrade), the daemon stops reading requests, finishes those it runs
(for up to HANDOVER_DRAIN_SECONDS; the rest are resent to the successor), closes its
session without unmounting and tells the agent, which starts the successor at once.
A daemon that ends unexpectedly while an agent holds its connection does not unmount:
its successor takes the mount over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import trio

from casfs.cache import ChunkCache
from casfs.errors import CasfsError, MountError
from casfs.failover import (
    HANDOVER_DRAIN_SECONDS,
    HoldLink,
    Takeover,
    b64,
    code_fingerprint,
    connection_alive,
    notify_resend,
)
from casfs.fetch import Fetcher
from casfs.localimage import open_image
from casfs.metrics import MountMetrics
from casfs.mountconfig import MountConfig
from casfs.mounts import prepare_mountpoint, remove_record, tune_kernel, write_record
from casfs.process import (
    FAILED,
    READY,
    ReadyPipe,
    daemon_environment,
    detach,
    last_error_line,
    log_file,
    maintain_log,
    open_log,
    raise_open_files_limit,
    read_until,
    reap,
    sighup,
)
from casfs.process import (
    serve_reporting as serve_process,
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


def failover_supported() -> bool:
    """Whether this pyfuse3 carries casfs's failover patch (third_party/pyfuse3)."""
    import pyfuse3

    return hasattr(pyfuse3, "init_takeover")


class _Control:
    """How the daemon's serving ends: "serve" (not yet: an end now is unexpected),
    "unmount" (asked to, by a signal) or "handover" (asked to, by the holder)."""

    def __init__(self) -> None:
        self.mode = "serve"
        self.reason = ""
        self.nursery: trio.Nursery | None = None
        self.fuse_scope = trio.CancelScope()

    def handover(self, reason: str) -> None:
        import pyfuse3

        if self.mode != "serve":
            return
        self.mode, self.reason = "handover", reason
        pyfuse3.terminate()  # no new request is read; those running finish
        if self.nursery is not None:
            self.nursery.start_soon(self._drain_deadline)

    async def _drain_deadline(self) -> None:
        await trio.sleep(HANDOVER_DRAIN_SECONDS)
        log.warning("handover: requests still running after %.0fs are left to the "
                    "successor (the kernel resends them)", HANDOVER_DRAIN_SECONDS)
        self.fuse_scope.cancel()


def serve(cfg: MountConfig, ready: ReadyPipe | None = None, takeover: Takeover | None = None,
          link: socket.socket | None = None) -> None:
    """Mount and serve until unmounted, signalled or handed over (blocks). With a
    takeover, serve the already mounted connection it carries instead of mounting;
    `link`: an already connected link to the holder (the agent that started us)."""
    import pyfuse3

    from casfs.fuse_ops import CasfsOperations

    started = time.monotonic()
    raise_open_files_limit(8192)  # the cache holds up to OPEN_FILES_MAX chunk files open
    cache = ChunkCache(cfg.cache_dir, cfg.cache_size)
    store, manifest = open_image(cfg.ref, cfg.store_url, cache)
    image = str(cfg.extra.get("image") or cfg.ref)
    # A mount taken over is mounted and served by this process: never stat it here.
    mountpoint = prepare_mountpoint(cfg.mountpoint) if takeover is None else cfg.mountpoint
    metrics = MountMetrics()
    fetcher = Fetcher(store, cache, metrics, fetch_concurrency=cfg.fetch_concurrency)
    # A successor does not record: the boot it would see is the rest of one it missed.
    session = PrefetchSession(manifest, store, fetcher, prefetch=cfg.prefetch,
                              record=cfg.trace and takeover is None, trace_idle=cfg.trace_idle,
                              background=cfg.extra)
    no_open = [False]
    resend_supported = [True]

    def extra_stats() -> dict:
        return {"mount": {"digest": manifest.digest, "pid": os.getpid(), "mode": "fuse",
                          "image": image, "mountpoint": mountpoint,
                          "uptime_seconds": round(time.monotonic() - started, 3),
                          "kernel_no_open": no_open[0]},
                "prefetch": session.stats(),
                "fuse_ops": ops.times.as_dict(),
                "failover": {"linked": link_.held if link_ else False,
                             "takeover": takeover.reason if takeover else "",
                             "resend_supported": resend_supported[0],
                             "resent_requests": pyfuse3.failover_resent_requests()
                             if failover_supported() else 0}}

    fs = ImageFS(manifest, fetcher, metrics, extra_stats,
                 security_xattrs=cfg.allow_suid)
    session.attach(fs)
    ops = CasfsOperations(fs)
    no_open[0] = ops.no_open
    if not ops.no_open:
        log.warning("pyfuse3 lacks casfs's inode-fh patch: every open and directory "
                    "listing reaches the daemon (see third_party/pyfuse3)")
    if cfg.metrics_port is not None and takeover is None:
        try:
            _start_metrics(cfg.metrics_port, metrics, fetcher)
        except OSError as exc:
            raise MountError(
                f"cannot serve metrics on 127.0.0.1:{cfg.metrics_port}: {exc.strerror}"
            ) from exc
    ctl = _Control()
    link_: HoldLink | None = None
    if failover_supported():
        successor_cfg = MountConfig(**{**cfg.as_dict(), "ref": f"blake3:{manifest.digest}",
                                       "mountpoint": mountpoint,
                                       "extra": {**cfg.extra, "image": image}})

        def describe() -> dict[str, Any]:
            return {"kind": "fuse", "key": mountpoint, "mountpoint": mountpoint,
                    "pid": os.getpid(), "config": successor_cfg.as_dict(),
                    "env": daemon_environment(dict(os.environ)),
                    "init": b64(pyfuse3.failover_init_request() or b""),
                    "digest": manifest.digest, "image": image, "code": code_fingerprint(),
                    "verbose": logging.getLogger().level <= logging.DEBUG,
                    "log": str(log_file() or "")}

        link_ = HoldLink(cfg.cache_dir, describe, pyfuse3.failover_session_fd, fs.stats,
                         ctl.handover, preconnected=link)
    elif takeover is not None:
        raise MountError("this pyfuse3 cannot take a connection over (third_party/pyfuse3)")

    async def main() -> None:
        if takeover is None:
            try:
                pyfuse3.init(ops, mountpoint, mount_options(cfg))
            except RuntimeError as exc:
                raise MountError(f"cannot mount {mountpoint}: {exc}") from exc
        else:
            try:
                pyfuse3.init_takeover(ops, takeover.fd, takeover.init, mountpoint,
                                      mount_options(cfg))
            except (RuntimeError, ValueError) as exc:
                raise MountError(f"cannot take {mountpoint} over: {exc}") from exc
            # What the last daemon read and never answered, queued again for us.
            resend_supported[0] = notify_resend(takeover.fd)
            if not resend_supported[0]:
                log.warning("this kernel does not resend requests (FUSE_NOTIFY_RESEND, "
                            "Linux 6.9+): requests the last daemon had taken stay unanswered")
        outcome = "unmount"  # what the end leaves: "unmount", "crash" or "closed"

        def held_alive() -> bool:
            return link_ is not None and link_.held and \
                connection_alive(pyfuse3.failover_session_fd())

        try:
            write_record(mountpoint, {"pid": os.getpid(), "mountpoint": mountpoint,
                                      "digest": manifest.digest, "cache_dir": str(cache.root),
                                      "mode": "fuse", "image": image})
            log.info("%s %s at %s in %.3fs (fuse mode)",
                     "took over" if takeover else "mounted", manifest.digest, mountpoint,
                     time.monotonic() - started)
            async with trio.open_nursery() as nursery:
                ctl.nursery = nursery
                nursery.start_soon(_watch_signals, ctl, link_)
                nursery.start_soon(maintain_log)
                # Prefetch starts while the mount gets ready: a boot's first reads (the
                # interpreter, libpython) come right after "ready", and each one the
                # plan is not yet there for is a GET of its own, in series.
                await nursery.start(session.run)
                nursery.start_soon(_announce_ready, mountpoint, cfg, ready, link_, nursery,
                                   takeover is not None)
                if cfg.metrics_port is not None and takeover is not None:
                    nursery.start_soon(_metrics_when_free, cfg.metrics_port, metrics, fetcher)
                with ctl.fuse_scope:
                    await pyfuse3.main()
                if ctl.mode == "handover":
                    pyfuse3.close(unmount=False)  # the holder's descriptor keeps it
                    outcome = "closed"
                    if link_ is not None:
                        await link_.release("handover")  # the successor starts now
                    log.info("handed %s over (%s)", mountpoint, ctl.reason)
                elif ctl.mode == "serve" and held_alive():
                    outcome = "crash"  # the loop ended, the connection stands
                elif link_ is not None:
                    await link_.release("unmount")
                nursery.cancel_scope.cancel()
        except BaseException:
            if outcome == "unmount" and ctl.mode != "unmount" and held_alive():
                outcome = "crash"
            raise
        finally:
            if outcome == "crash":
                pyfuse3.close(unmount=False)
                log.error("serving %s ended unexpectedly: its connection is left to a "
                          "successor", mountpoint)
            elif outcome == "unmount":
                if takeover is None:
                    pyfuse3.close(unmount=True)
                else:
                    pyfuse3.close(unmount=False)
                    _unmount_lazily(mountpoint)
                remove_record(mountpoint)
                log.info("unmounted %s", mountpoint)
            with trio.CancelScope(shield=True):
                await session.close()

    trio.run(main)


def _unmount_lazily(mountpoint: str) -> None:
    """Unmount a mount this process did not mount (a session that took it over has no
    mount of its own to undo): detach it, as libfuse does."""
    from casfs.mounts import is_mounted, run_helper

    if not is_mounted(mountpoint):
        return
    if os.geteuid() == 0:
        from casfs.kernel import syscalls

        with contextlib.suppress(OSError):
            syscalls.umount(mountpoint, syscalls.MNT_DETACH)
            return
    run_helper("fusermount3", "-u", "-z", mountpoint)


async def _announce_ready(mountpoint: str, cfg: MountConfig, ready: ReadyPipe | None,
                          link: HoldLink | None, nursery: trio.Nursery,
                          taken_over: bool) -> None:
    """Once the mount answers a request (so the kernel's INIT is done, which resets the
    readahead window), tune the kernel's side of the mount, link to the holder, then
    tell `casfs mount` (or the agent)."""
    await trio.to_thread.run_sync(os.statvfs, mountpoint)
    if not taken_over:  # a connection taken over keeps its tuning
        tuned = await trio.to_thread.run_sync(
            tune_kernel, mountpoint, cfg.readahead_kb, cfg.max_background
        )
        log.info("kernel tuning: %s", ", ".join(tuned) or "none (not root?)")
    if link is not None:
        nursery.start_soon(link.run)
    if ready is not None:
        ready.ready()


async def _watch_signals(ctl: _Control, link: HoldLink | None) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                # logrotate's signal: the log file again, by its path; nothing else.
                log.info("%s", sighup())
                continue
            if ctl.mode != "serve":
                continue
            log.info("signal %d: unmounting", signum)
            ctl.mode = "unmount"
            if link is not None:
                await link.release("unmount")
            pyfuse3.terminate()
            return


async def _metrics_when_free(port: int, metrics: MountMetrics, fetcher: Fetcher) -> None:
    """A successor serves its predecessor's --metrics-port once that one let it go (a
    handover: the old daemon may still hold it for a moment)."""
    for _ in range(100):
        try:
            _start_metrics(port, metrics, fetcher)
            return
        except OSError:
            await trio.sleep(0.2)
    log.warning("cannot serve metrics on 127.0.0.1:%d: the port stays taken", port)


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
            detach(log_fd, verbose, log_path, title=f"casfs daemon {cfg.mountpoint}")
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
    status = reap(pid, max(1.0, deadline - time.monotonic()))
    if status is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        raise MountError(f"the mount daemon did not become ready; see {log_path}")
    tail = last_error_line(log_path)
    raise MountError(tail or f"the mount daemon exited with status {status}; see {log_path}")


def serve_reporting(cfg: MountConfig, ready_fd: int, takeover: Takeover | None = None,
                    link: socket.socket | None = None) -> int:
    """Serve; an error before "ready" goes back through the pipe as well as the log.
    Returns the daemon's exit status."""
    return serve_process(
        "the mount daemon", ready_fd, lambda pipe: serve(cfg, pipe, takeover=takeover, link=link))


def run_foreground(cfg: MountConfig, ready_fd: int | None) -> int:
    """`casfs mount --foreground`: serve attached (--ready-fd: tell a supervisor when ready)."""
    pipe = ReadyPipe(ready_fd)
    try:
        serve(cfg, pipe)
    except CasfsError as exc:
        pipe.fail(str(exc))
        raise
    return 0
