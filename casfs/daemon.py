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
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import trio

from casfs.cache import ChunkCache
from casfs.digest import hash_bytes, parse_ref
from casfs.errors import CasfsError, MountError
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.metrics import MountMetrics
from casfs.mountconfig import MountConfig
from casfs.mounts import prepare_mountpoint, remove_record, tune_kernel, write_record
from casfs.packindex import PackIndex
from casfs.refs import resolve_ref
from casfs.store import Store, open_store
from casfs.vfs import ImageFS
from prefetch.heuristics import Heuristics
from prefetch.recorder import Recorder, save_trace
from prefetch.replay import Prefetcher

log = logging.getLogger(__name__)
READY = b"ready\n"
FAILED = b"error: "


class ReadyPipe:
    """The daemon's one message to `casfs mount`: "ready", or the error that stopped it."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def ready(self) -> None:
        self._send(READY)

    def fail(self, message: str) -> None:
        self._send(FAILED + message.replace("\n", " ").encode()[:3800] + b"\n")

    def _send(self, data: bytes) -> None:
        fd, self.fd = self.fd, None  # one message; the fd number may be reused after
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(fd, data)
        with contextlib.suppress(OSError):
            os.close(fd)


def local_manifest(store: Store, cache: ChunkCache, digest: str) -> Manifest:
    """The manifest, from the node's cache when there (verified), else from the store."""
    path = cache.root / "manifests" / digest
    try:
        data = path.read_bytes()
        if hash_bytes(data) == digest:
            return Manifest.open(path, digest)
        log.warning("cached manifest %s is corrupt; fetching it again", digest)
    except FileNotFoundError:
        pass
    data = store.get_manifest(digest)
    # The full structural check runs once per node, before the manifest is kept;
    # later mounts re-hash the cached copy, which proves it is this same manifest.
    Manifest(data, digest).validate()
    tmp = cache.root / "tmp" / f"manifest.{digest}.{os.getpid()}"
    try:
        tmp.write_bytes(data)
        os.rename(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot keep manifest %s in the cache (%s); serving it from memory",
                    digest, exc.strerror)
        return Manifest(data, digest)
    return Manifest.open(path, digest)


def mount_options(cfg: MountConfig) -> set[str]:
    opts = {"fsname=casfs", "subtype=casfs", "ro", "default_permissions"}
    if os.geteuid() == 0:
        opts.add("allow_other")
        if cfg.allow_suid:
            opts.add("suid")
        if cfg.allow_dev:
            opts.add("dev")
    return opts


def serve(cfg: MountConfig, ready: ReadyPipe | None = None) -> None:
    """Mount and serve until unmounted or signalled (blocks)."""
    import pyfuse3

    from casfs.fuse_ops import CasfsOperations

    started = time.monotonic()
    _raise_open_files_limit(8192)  # the cache holds up to OPEN_FILES_MAX chunk files open
    cache = ChunkCache(cfg.cache_dir, cfg.cache_size)
    digest = parse_ref(cfg.ref)
    if digest is not None and (cache.root / "manifests" / digest).exists():
        # Fast path: a digest whose manifest this node already holds needs no request
        # before serving; the store is first asked when a chunk is missing.
        store = open_store(cfg.store_url, probe=False)
    else:
        store = open_store(cfg.store_url)
        digest = resolve_ref(store, cfg.ref)
    manifest = local_manifest(store, cache, digest)
    mountpoint = prepare_mountpoint(cfg.mountpoint)
    metrics = MountMetrics()
    parts: dict = {}

    def extra_stats() -> dict:
        out: dict = {"mount": {"digest": digest, "store": store.url, "pid": os.getpid(),
                               "uptime_seconds": round(time.monotonic() - started, 3),
                               "kernel_no_open": bool(parts.get("no_open"))}}
        prefetch: dict = {}
        if parts.get("prefetcher") is not None:
            prefetch.update(parts["prefetcher"].status.as_dict())
        else:
            prefetch["state"] = "off"
        if parts.get("heuristics") is not None:
            prefetch["heuristic_requests"] = parts["heuristics"].requested
            prefetch["heuristic_ranges"] = parts["heuristics"].ranged
        if parts.get("packs") is not None:
            prefetch["dir_packs"] = parts["packs"].as_dict()
        rec = parts.get("recorder")
        if rec is not None:
            prefetch["recorded_chunks"] = len(rec.order)
            prefetch["trace_saved"] = rec.saved or ""
        out["prefetch"] = prefetch
        return out

    async def main() -> None:
        fetcher = Fetcher(store, cache, metrics, fetch_concurrency=cfg.fetch_concurrency)
        fs = ImageFS(manifest, fetcher, cache, metrics, extra_stats)
        ops = CasfsOperations(fs)
        parts["no_open"] = ops.no_open
        if not ops.no_open:
            log.info("pyfuse3 lacks casfs's inode-fh patch: every open and directory "
                     "listing reaches the daemon (see third_party/pyfuse3)")
        recorder = Recorder(manifest, idle_seconds=cfg.trace_idle) if cfg.trace else None
        packs = PackIndex() if cfg.prefetch else None
        prefetcher = Prefetcher(store, manifest, fetcher, packs=packs) if cfg.prefetch else None
        if recorder is not None:
            fs.read_observers.append(recorder.on_read)
            fs.read_trackers.append(recorder.reading)
        parts["recorder"], parts["prefetcher"], parts["packs"] = recorder, prefetcher, packs

        def save() -> None:
            if recorder is None:
                return
            known = prefetcher.status.packed_digests if prefetcher else set()
            try:
                save_trace(recorder, store, cache, known)
            except (CasfsError, OSError) as exc:
                log.warning("could not save the boot trace: %s", exc)
            release_free_memory()  # the pack was built in memory

        if cfg.metrics_port is not None:
            try:
                _start_metrics(cfg.metrics_port, metrics, fs)
            except OSError as exc:
                raise MountError(
                    f"cannot serve metrics on 127.0.0.1:{cfg.metrics_port}: {exc.strerror}"
                ) from exc
        try:
            pyfuse3.init(ops, mountpoint, mount_options(cfg))
        except RuntimeError as exc:
            raise MountError(f"cannot mount {mountpoint}: {exc}") from exc
        try:
            write_record(mountpoint, {"pid": os.getpid(), "mountpoint": mountpoint,
                                      "digest": digest, "cache_dir": str(cache.root),
                                      "store": store.url})
            log.info("mounted %s at %s in %.3fs", digest, mountpoint, time.monotonic() - started)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, nursery.cancel_scope)
                if cfg.prefetch:
                    def no_trace_plan() -> bool:
                        st = prefetcher.status if prefetcher else None
                        return st is None or (st.state in ("done", "failed")
                                              and st.planned_chunks == 0)

                    def planned(digest: str) -> bool:
                        return prefetcher is not None and digest in prefetcher.planned

                    heuristics = Heuristics(manifest, fetcher, nursery, packs=packs,
                                            siblings_wanted=no_trace_plan, planned=planned)
                    parts["heuristics"] = heuristics
                    fs.read_observers.append(heuristics.on_read)
                    fs.list_observers.append(heuristics.on_list)

                # The trace is loaded while the mount gets ready: a boot's first reads
                # (the interpreter, libpython) come right after "ready", and each one
                # the plan is not yet there for is a GET of its own, in series.
                if prefetcher is not None:
                    nursery.start_soon(_prefetch_then_trim, prefetcher)
                if recorder is not None:
                    nursery.start_soon(recorder.watch, save)
                nursery.start_soon(_announce_ready, mountpoint, cfg, ready)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=True)
            remove_record(mountpoint)
            log.info("unmounted %s", mountpoint)
            if recorder is not None and not recorder.finished:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(save)

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


async def _prefetch_then_trim(prefetcher: Prefetcher) -> None:
    await prefetcher.run()
    # Prefetch's buffers (ranges in flight, decompressed chunks) are freed by now, but
    # glibc keeps freed heap mapped; hand it back so the daemon's RSS is what it holds.
    await trio.to_thread.run_sync(release_free_memory)


def release_free_memory() -> None:
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


async def _watch_signals(scope: trio.CancelScope) -> None:
    import pyfuse3

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            pyfuse3.terminate()
            return


def _start_metrics(port: int, metrics: MountMetrics, fs: ImageFS) -> None:
    from prometheus_client import CollectorRegistry, start_http_server

    from casfs.metrics import PrometheusCollector

    registry = CollectorRegistry()

    def gauges() -> dict[str, float]:
        return {"cache_bytes": fs.cache.total_bytes(), "cache_max_bytes": fs.cache.max_bytes}

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
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the daemon
        code = 1
        try:
            os.close(read_fd)
            os.setsid()
            _become_daemon(log_fd, verbose)
            code = _serve_reporting(cfg, write_fd)
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
        _reap(pid, 5.0)
        message = buf[len(FAILED):].decode(errors="replace").strip()
        raise MountError(message or f"the mount daemon failed; see {log_path}")
    code = _reap(pid, max(1.0, deadline - time.monotonic()))
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        raise MountError(f"the mount daemon did not become ready; see {log_path}")
    tail = _last_error(log_path)
    raise MountError(tail or f"the mount daemon exited with status {code}; see {log_path}")


def read_until(fd: int, deadline: float, done: Callable[[bytes], bool]) -> bytes:
    """What fd gives until done(all read so far), end of file, or the monotonic deadline."""
    buf = b""
    while not done(buf) and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _become_daemon(log_fd: int, verbose: bool) -> None:
    """In the forked child: detach stdio, log to the mount's log file, cap malloc arenas."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _limit_malloc_arenas(2)
    from casfs.cli import DAEMON_LOG_FORMAT

    logging.basicConfig(force=True, level=logging.DEBUG if verbose else logging.INFO,
                        format=DAEMON_LOG_FORMAT)


def _raise_open_files_limit(want: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _limit_malloc_arenas(count: int) -> None:
    """Dozens of fetch threads would each get a glibc malloc arena; a couple keep the
    daemon's resident memory near what it actually holds (= MALLOC_ARENA_MAX)."""
    import ctypes

    m_arena_max = -8
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(m_arena_max, count)


def _serve_reporting(cfg: MountConfig, ready_fd: int) -> int:
    """Serve; an error before "ready" goes back through the pipe as well as the log."""
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


def _reap(pid: int, timeout: float) -> int | None:
    """The exit status of child pid, or None if it is still running after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _last_error(log_path: Path) -> str:
    try:
        lines = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if line.startswith("casfs: error: "):
            return line[len("casfs: error: "):]
    return ""


def run_foreground(cfg: MountConfig, ready_fd: int | None) -> int:
    """`casfs mount --foreground`: serve attached (--ready-fd: tell a supervisor when ready)."""
    pipe = ReadyPipe(ready_fd)
    try:
        serve(cfg, pipe)
    except CasfsError as exc:
        pipe.fail(str(exc))
        raise
    return 0
