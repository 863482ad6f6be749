"""The node view service: one process per cache directory that serves every kernel-mode
mount of the node.

For each mount it: makes the image local (manifest, EROFS image, object table), mounts
the EROFS image straight from its file, mounts overlayfs at the mountpoint with the
EROFS tree as its lower layer and three data-only layers (the cache's chunk files, its
completed objects, and this process's FUSE view of every object), detaches the EROFS
mount (overlayfs keeps its own reference), and runs the mount's prefetch session. The
kernel then serves every lookup and every byte the node holds; this process only
serves, through the view, the files whose content the node lacks, fetching as FUSE mode
does. It watches opens on the mount (fanotify) to record boots and guess ahead, and it
makes objects whole once a file's chunks are all on the node (so the next mount that
opens the file reads it natively).

It starts with the first kernel-mode mount of its cache directory (the node agent forks
it warm when one runs, else `casfs mount` does) and exits when the last one is
unmounted. Failover (casfs.failover): once serving, it links to the node agent and hands
it its view's /dev/fuse descriptor; if it dies, the agent starts a successor that takes
the view's connection over (`serve_node(takeover=...)`) and re-attaches every kernel-mode
mount of the cache directory its mount records name (`reattach`: the image, a prefetch
session replaying the plan without recording, the fanotify watch): the overlays never
notice, reads waiting on the view are answered by the successor. Asked for a handover
(an upgrade), it stops taking requests, hands the connection back, then saves its mounts'
traces and exits, leaving every mount mounted. SIGHUP reopens its log file. Requests
come over a socket in the user's runtime directory (`view-<key>.sock`, 0600, own uid
only), one JSON line each:

    {"op": "mount", "config": {...}, "env": {...}}  -> ok {"pid": N} | fallback: reason | error: msg
    {"op": "umount", "mountpoint": "/abs"}          -> ok {"last": bool} | error: msg
    {"op": "stats", "mountpoint": "/abs"}           -> ok {...stats...} | error: msg
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import select
import signal
import stat
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pyfuse3
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
from casfs.kernel import syscalls
from casfs.kernel.images import NodeImage, node_image
from casfs.kernel.pagecache import KernelFetcher
from casfs.kernel.view import ObjectView, ViewSource
from casfs.localimage import open_image
from casfs.manifest import Manifest
from casfs.manifest.objects import multi_chunk_files, object_name_of
from casfs.metrics import MountMetrics
from casfs.mountconfig import MountConfig
from casfs.mounts import prepare_mountpoint, remove_record, tune_kernel, write_record
from casfs.nodemetrics import OpTimes
from casfs.process import (
    ReadyPipe,
    daemon_environment,
    listen_private,
    log_file,
    maintain_log,
    peer_uid,
    sighup,
)
from casfs.vfs import ImageFS
from prefetch.session import PrefetchSession

log = logging.getLogger(__name__)
MAX_REQUEST = 1 << 20
IDLE_EXIT_SECONDS = 30.0  # a service nobody asked to mount anything exits
VIEW_READAHEAD_KB = 4096  # the view's readahead window (a FUSE-mode mount's default is 1024)
VIEW_MAX_BACKGROUND = 64
VIEW_OPTIONS = {"fsname=casfs-view", "subtype=casfs-view", "ro", "nosuid", "nodev",
                "default_permissions"}


def lowerdir_escape(path: str) -> str:
    """A path as overlayfs's lowerdir option wants it (":" and "," separate layers)."""
    return path.replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")


class KernelMount:
    """One kernel-mode mount: its image, its reads through the view, its prefetch."""

    def __init__(self, cfg: MountConfig, store: Any, manifest: Manifest, image: NodeImage,
                 cache: ChunkCache, env: dict[str, str] | None = None,
                 record: bool = True) -> None:
        self.cfg = cfg
        self.env = env or {}  # the requester's settings (a successor view opens its store so)
        self.image_ref = str(cfg.extra.get("image") or cfg.ref)
        self.times = OpTimes()  # reads the view served for this mount
        self.mountpoint = cfg.mountpoint
        self.manifest = manifest
        self.cache = cache
        self.table = image.table
        self.image = image
        self.metrics = MountMetrics()
        # Warming fills the page cache for the kernel rather than verifying for the daemon.
        self.fetcher = KernelFetcher(store, cache, self.metrics, manifest=manifest,
                                     fetch_concurrency=cfg.fetch_concurrency)
        self.session = PrefetchSession(manifest, store, self.fetcher, prefetch=cfg.prefetch,
                                       record=cfg.trace and record, trace_idle=cfg.trace_idle,
                                       background=cfg.extra)
        self.fs = ImageFS(manifest, self.fetcher, self.metrics, self.stats,
                          security_xattrs=cfg.allow_suid)
        self.session.attach(self.fs)
        self.session.after_boot.append(self.complete_objects_fetching)
        self.closed = False
        self.started = time.monotonic()
        self.through_view: set[int] = set()  # files whose content the view served
        self.native_opens = 0  # files opened whose content the node held
        self.view_opens = 0  # files opened whose content the view serves
        self.objects_completed = 0
        self.cancel = trio.CancelScope()
        self.watch_stop: int | None = None  # write end of the fanotify thread's stop pipe
        self.nids = image.nids

    # -- the view's side ---------------------------------------------------------------------

    def served(self, ino: int) -> None:
        self.through_view.add(ino)

    # -- opens the kernel served (fanotify) -------------------------------------------------

    def ino_of_nid(self, nid: int) -> int:
        nids = self.nids
        i = bisect_left(nids, nid, 1)
        return i if i < len(nids) and nids[i] == nid else 0

    def opened(self, events: list[tuple[int, bool, bool]]) -> None:
        """Opens on the mount: (nid, is a directory, the content was on the node)."""
        for nid, is_dir, local in events:
            ino = self.ino_of_nid(nid)
            if not ino:
                continue
            if is_dir:
                self.session.observe_list(ino)
                continue
            node = self.manifest.inode(ino)
            if not stat.S_ISREG(node.mode) or node.size == 0:
                continue
            if not local:
                self.view_opens += 1
                continue  # its reads reach the view, which records them with offsets
            self.native_opens += 1
            chunks = self.manifest.chunks(ino)
            if len(chunks) > 1:
                # The kernel reads it: casfs sees no offsets. Stand in the chunks the
                # plan had for it (what earlier boots read), else its first.
                planned = self.session.planned
                chunks = [c for c in chunks if c.digest in planned] or chunks[:1]
            self.session.observe_read(ino, chunks)

    def is_local(self, ino: int) -> bool:
        """Whether the node holds file ino's whole content (blocking)."""
        chunks = self.manifest.chunks(ino)
        if len(chunks) == 1:
            return self.cache.chunk_path(chunks[0].digest).exists()
        return self.cache.object_path(object_name_of(chunks)).exists()

    # -- objects ---------------------------------------------------------------------------

    async def complete_objects(self, fetch: bool) -> int:
        """Make whole the objects of the files read through the view that have several
        chunks (one chunk is its own object), fetching their missing chunks first when
        `fetch` (after the boot; prefetch priority, stopping short of the cache cap)."""
        done = 0
        for ino in sorted(self.through_view):
            chunks = self.manifest.chunks(ino)
            if len(chunks) < 2:
                continue
            name = object_name_of(chunks)
            if fetch:
                if not await self.fetcher.room_left(0.85):
                    log.info("not completing more objects: the cache is near its cap")
                    fetch = False
                else:
                    await self._fetch_all(c.digest for c in chunks)
            ok = await trio.to_thread.run_sync(
                self.cache.complete_object, name, [(c.digest, c.length) for c in chunks],
                limiter=self.fetcher.disk_limiter)
            if ok:
                done += 1
        self.objects_completed += done
        return done

    async def complete_planned(self) -> None:
        """Once the trace plan is fetched: make whole the objects of the files the plan
        brought every chunk of, so that the boot's own first opens of them, if still to
        come, are served by the kernel."""
        prefetcher = self.session.prefetcher
        if prefetcher is None:
            return
        while prefetcher.status.state not in ("done", "failed"):
            await trio.sleep(0.2)
        planned = self.session.planned
        if not planned:
            return

        def wanted() -> list[tuple[str, list[tuple[str, int]]]]:
            out = []
            for ino in multi_chunk_files(self.manifest):
                chunks = self.manifest.chunks(ino)
                if all(c.digest in planned for c in chunks):
                    out.append((object_name_of(chunks), [(c.digest, c.length) for c in chunks]))
            return out

        done = 0
        for name, chunks in await trio.to_thread.run_sync(wanted):
            if await trio.to_thread.run_sync(self.cache.complete_object, name, chunks,
                                             limiter=self.fetcher.disk_limiter):
                done += 1
        self.objects_completed += done

    async def complete_objects_fetching(self) -> None:
        n = await self.complete_objects(fetch=True)
        log.info("%s: %d objects made whole after the boot", self.mountpoint, n)

    async def _fetch_all(self, digests: Iterator[str]) -> None:
        wanted = list(digests)
        present = await self.fetcher.present(wanted)
        missing = [d for d, have in zip(wanted, present, strict=True) if not have]
        slots = trio.CapacityLimiter(16)

        async def one(digest: str) -> None:
            async with slots:
                with contextlib.suppress(CasfsError):
                    await self.fetcher.prefetch(digest)

        async with trio.open_nursery() as nursery:
            for digest in missing:
                nursery.start_soon(one, digest)

    # -- reporting -------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            "mount": {"digest": self.manifest.digest, "pid": os.getpid(), "mode": "kernel",
                      "mountpoint": self.mountpoint, "image": self.image_ref,
                      "uptime_seconds": round(time.monotonic() - self.started, 3),
                      "erofs_built_seconds": round(self.image.built_seconds, 3)},
            "kernel": {"native_opens": self.native_opens, "view_opens": self.view_opens,
                       "files_through_view": len(self.through_view),
                       "objects_completed": self.objects_completed},
            "prefetch": self.session.stats(),
        }

    def shown_stats(self) -> dict[str, Any]:
        """What `casfs stats` shows of this mount."""
        out = self.stats()
        out["metrics"] = self.metrics.as_dict()
        out["cache"] = self.fetcher.cache_stats()
        return out

    def full_stats(self) -> dict[str, Any]:
        """What `casfs stats` shows, and what the node metrics need besides."""
        out = self.shown_stats()
        out["fuse_ops"] = self.times.as_dict()
        return out

    def record(self) -> dict[str, Any]:
        """The mount record: which mount this is, and what a successor view needs to
        serve it again (its settings; never the environment, which holds credentials)."""
        return {"pid": os.getpid(), "mountpoint": self.mountpoint, "mode": "kernel",
                "digest": self.manifest.digest, "cache_dir": str(self.cache.root),
                "image": self.image_ref, "config": self.cfg.as_dict()}


class NodeView:
    """The service: the view, the control socket, every kernel mount of the node."""

    def __init__(self, cache_dir: str, cache_size: int) -> None:
        self.cache_dir = os.path.realpath(cache_dir)
        self.cache = ChunkCache(self.cache_dir, cache_size)
        self.root = Path(self.cache_dir)
        self.view_dir = self.root / "view"
        self.mounts: dict[str, KernelMount] = {}
        self.ops = ObjectView(self._sources, self.view_stats)
        self.nursery: trio.Nursery | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.ever_mounted = False  # a mount was asked for (whether it worked or not)
        self.pending = 0  # requests being answered
        self.lock = trio.Lock()  # one mount or unmount at a time
        self.mode = "serve"  # "unmount" (asked to stop), "handover", "lost" (connection gone)
        self.handover_reason = ""
        self.done: trio.Event | None = None
        self.link: HoldLink | None = None
        self.fuse_scope = trio.CancelScope()
        self.fuse_done: trio.Event | None = None
        self.listener: Any = None  # the control socket (closed first in a handover)
        self.tsock: Any = None  # the same, as trio accepts on it
        self.sock_path: Path | None = None
        self.sock_ino = 0
        self.takeover: Takeover | None = None

    def _sources(self) -> list[ViewSource]:
        return [*sorted(self.mounts.values(), key=lambda m: -m.started)]

    def view_stats(self) -> dict[str, Any]:
        return {"mounts": sorted(self.mounts), "lookups": self.ops.lookups,
                "reads": self.ops.reads, "misses": self.ops.misses,
                "io_errors": self.ops.io_errors, "ambiguous": self.ops.ambiguous,
                "pid": os.getpid(),
                "takeover": self.takeover.reason if self.takeover else "",
                "resent_requests": pyfuse3.failover_resent_requests()
                if hasattr(pyfuse3, "failover_resent_requests") else 0}

    # -- failover ------------------------------------------------------------------------------

    def mounts_meta(self) -> dict[str, Any]:
        """For the holder: each mount and the environment its store was opened with."""
        return {mp: {"env": km.env, "image": km.image_ref, "digest": km.manifest.digest}
                for mp, km in self.mounts.items()}

    def describe(self) -> dict[str, Any]:
        return {"kind": "view", "key": "view", "pid": os.getpid(),
                "cache_dir": self.cache_dir, "cache_size": self.cache.max_bytes,
                "init": b64(pyfuse3.failover_init_request() or b""),
                "env": daemon_environment(dict(os.environ)), "code": code_fingerprint(),
                "verbose": logging.getLogger().level <= logging.DEBUG,
                "log": str(log_file() or ""), "mounts": self.mounts_meta(),
                "image": "", "digest": ""}

    def agent_stats(self) -> dict[str, Any]:
        view = self.view_stats()
        view["fuse_ops"] = self.ops.times.as_dict()
        return {"view": view, "mounts": {mp: km.full_stats() for mp, km in self.mounts.items()}}

    async def _update_holder(self) -> None:
        if self.link is not None:
            await self.link.send({"op": "update", "mounts": self.mounts_meta()})

    def handover(self, reason: str) -> None:
        """The holder asks for the connection back (an upgrade): see hand_over."""
        if self.mode != "serve" or self.done is None:
            return
        self.mode, self.handover_reason = "handover", reason
        self.done.set()

    async def hand_over(self) -> None:
        """Stop taking requests (control socket first: `casfs mount` waits for the
        successor through the agent), let the view's running requests finish, give the
        connection back; then save the mounts' traces and let them go, mounted."""
        self._close_listener()
        pyfuse3.terminate()
        assert self.fuse_done is not None
        with trio.move_on_after(HANDOVER_DRAIN_SECONDS):
            await self.fuse_done.wait()
        self.fuse_scope.cancel()
        await self.fuse_done.wait()
        pyfuse3.close(unmount=False)
        if self.link is not None:
            await self.link.release("handover")
        log.info("handed the node view over (%s): %d mounts left to the successor",
                 self.handover_reason, len(self.mounts))
        for km in list(self.mounts.values()):
            self._stop_watch(km)
            km.cancel.cancel()
            with trio.CancelScope(shield=True):
                await km.session.close()
            km.closed = True

    def _close_listener(self) -> None:
        listener, self.listener = self.listener, None
        tsock, self.tsock = self.tsock, None
        if listener is None:
            return
        with contextlib.suppress(OSError):
            if self.sock_path is not None and os.stat(self.sock_path).st_ino == self.sock_ino:
                self.sock_path.unlink()  # ours, not a successor's
        if tsock is not None:
            tsock.close()  # wakes the task accepting on it
        else:
            listener.close()

    async def reattach_all(self, mounts: dict[str, Any]) -> None:
        """A successor: serve again every kernel-mode mount of this cache directory that
        the mount records name and that is still mounted (before the view answers a
        request: a read must find its mount)."""
        from casfs.mounts import mount_table

        table = await trio.to_thread.run_sync(mount_table)
        for record in await trio.to_thread.run_sync(self._records):
            mountpoint = str(record["mountpoint"])
            if table.get(mountpoint) != "overlay":
                log.info("%s: no longer mounted; its record dropped", mountpoint)
                remove_record(mountpoint)
                continue
            env = dict((mounts.get(mountpoint) or {}).get("env") or {}) or \
                daemon_environment(dict(os.environ))
            try:
                await self.reattach(record, env)
            except Exception as exc:  # noqa: BLE001 - one mount lost is not all of them
                log.error("%s: cannot serve it again (%s): files the node lacks fail there",
                          mountpoint, exc)
        self.ever_mounted = True

    def _records(self) -> list[dict[str, Any]]:
        """The mount records of this cache directory's kernel-mode mounts (blocking)."""
        from casfs.mounts import find_record, records_dir

        out = []
        for path in sorted(records_dir().glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(record, dict) or record.get("mode") != "kernel" or \
                    os.path.realpath(str(record.get("cache_dir", ""))) != self.cache_dir:
                continue
            if find_record(str(record.get("mountpoint", ""))) == record:
                out.append(record)  # the record of that mountpoint, not a stray file
        return out

    async def reattach(self, record: dict[str, Any], env: dict[str, str]) -> None:
        raw = record.get("config")
        if not isinstance(raw, dict):
            raise MountError("its record has no settings (mounted by an older casfs)")
        cfg = _checked_config(raw, self.cache_dir)
        cfg.ref = f"blake3:{record['digest']}"  # the manifest is on the node: no request
        cfg.extra = {**cfg.extra, "image": str(record.get("image") or cfg.extra.get("image")
                                               or cfg.ref)}
        store, manifest = await trio.to_thread.run_sync(self._open_image, cfg, env)
        image = await trio.to_thread.run_sync(
            lambda: node_image(self.root, manifest, security_xattrs=cfg.allow_suid))
        km = KernelMount(cfg, store, manifest, image, self.cache, env, record=False)
        self.mounts[km.mountpoint] = km
        assert self.nursery is not None
        await self.nursery.start(self._run_mount, km)
        write_record(km.mountpoint, km.record())
        log.info("%s: serving it again (%s)", km.mountpoint, manifest.digest)

    # -- mounting ----------------------------------------------------------------------------

    async def mount(self, cfg: MountConfig, env: dict[str, str]) -> dict[str, Any]:
        from casfs.erofs import kernel_mode_obstacle

        started = time.monotonic()
        self.ever_mounted = True
        store, manifest = await trio.to_thread.run_sync(self._open_image, cfg, env)
        reason = await trio.to_thread.run_sync(
            lambda: kernel_mode_obstacle(manifest, drop_security_xattrs=not cfg.allow_suid))
        if reason is not None:
            raise _Fallback(reason)
        image = await trio.to_thread.run_sync(
            lambda: node_image(self.root, manifest, security_xattrs=cfg.allow_suid))
        real = await trio.to_thread.run_sync(prepare_mountpoint, cfg.mountpoint)
        cfg.mountpoint = real
        if real in self.mounts:
            raise MountError(f"{real} is already a casfs mount")
        await trio.to_thread.run_sync(self._mount_stack, cfg, image)
        km = KernelMount(cfg, store, manifest, image, self.cache, env)
        self.mounts[real] = km
        try:
            assert self.nursery is not None
            await self.nursery.start(self._run_mount, km)
            write_record(real, km.record())
            await self._update_holder()
        except BaseException:
            await self._teardown(km, lazy=True)
            raise
        log.info("mounted %s at %s in %.3fs (kernel mode; EROFS %s)", manifest.digest, real,
                 time.monotonic() - started,
                 f"built in {image.built_seconds:.3f}s" if image.built_seconds else "on the node")
        return {"pid": os.getpid(), "built_seconds": image.built_seconds}

    def _open_image(self, cfg: MountConfig, env: dict[str, str]) -> tuple[Any, Manifest]:
        # The store is opened with the requester's settings (its AWS_* variables).
        saved = dict(os.environ)
        try:
            os.environ.clear()
            os.environ.update(env)
            return open_image(cfg.ref, cfg.store_url, self.cache)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def _mount_stack(self, cfg: MountConfig, image: NodeImage) -> None:
        """EROFS, then overlayfs over it and the data layers, then the EROFS mount
        detached (overlayfs holds its own). In a worker thread: overlayfs looks at the
        view's root while mounting, which this process itself must answer."""
        meta = self.root / "kmnt" / f"{os.getpid()}.{abs(hash(cfg.mountpoint))}"
        meta.mkdir(parents=True, exist_ok=True, mode=0o700)
        flags = syscalls.MS_RDONLY | (0 if cfg.allow_suid else syscalls.MS_NOSUID) | \
            (0 if cfg.allow_dev else syscalls.MS_NODEV)
        try:
            syscalls.mount(str(image.erofs), str(meta), "erofs", syscalls.MS_RDONLY |
                           syscalls.MS_NOSUID | syscalls.MS_NODEV)
        except OSError as exc:
            meta.rmdir()
            raise MountError(f"cannot mount the EROFS image of {cfg.ref}: {exc.strerror}") \
                from exc
        try:
            layers = [str(meta), str(self.root / "chunks"), str(self.root / "objects"),
                      str(self.view_dir)]
            lower = lowerdir_escape(layers[0]) + "::" + \
                "::".join(lowerdir_escape(p) for p in layers[1:])
            data = f"lowerdir={lower},metacopy=on,redirect_dir=follow"
            try:
                syscalls.mount("casfs", cfg.mountpoint, "overlay", flags, data)
            except OSError as exc:
                raise MountError(f"cannot mount overlayfs at {cfg.mountpoint}: "
                                 f"{exc.strerror}") from exc
        finally:
            with contextlib.suppress(OSError):
                syscalls.umount(str(meta), syscalls.MNT_DETACH)
            with contextlib.suppress(OSError):
                meta.rmdir()

    async def _run_mount(self, km: KernelMount,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with km.cancel:
            async with trio.open_nursery() as nursery:
                await nursery.start(km.session.run)
                nursery.start_soon(_guarded, "completing planned objects", km.complete_planned)
                self._start_watch(km)
                task_status.started()
                await trio.sleep_forever()

    # -- opens (fanotify, in a thread of its own per mount) ------------------------------------

    def _start_watch(self, km: KernelMount) -> None:
        try:
            fd = syscalls.fanotify_open_watch(km.mountpoint)
        except OSError as exc:
            log.warning("%s: cannot watch opens (%s): boots are recorded from the view's "
                        "reads only", km.mountpoint, exc.strerror)
            return
        stop_r, stop_w = os.pipe()
        km.watch_stop = stop_w
        token = trio.lowlevel.current_trio_token()
        threading.Thread(target=self._watch, args=(km, fd, stop_r, token),
                         name="casfs-fanotify", daemon=True).start()

    def _watch(self, km: KernelMount, fd: int, stop_r: int,
               token: trio.lowlevel.TrioToken) -> None:
        me = os.getpid()
        try:
            while True:
                ready, _, _ = select.select([fd, stop_r], [], [])
                if stop_r in ready:
                    return
                try:
                    data = os.read(fd, 64 * 1024)
                except OSError as exc:
                    if exc.errno in (errno.EINTR, errno.EAGAIN):
                        continue
                    raise
                events: list[tuple[int, bool, bool]] = []
                for _mask, efd, pid in syscalls.fanotify_events(data):
                    if efd < 0:
                        continue
                    try:
                        if pid == me:
                            continue
                        st = os.fstat(efd)
                        is_dir = stat.S_ISDIR(st.st_mode)
                        local = True
                        if stat.S_ISREG(st.st_mode) and st.st_size:
                            ino = km.ino_of_nid(st.st_ino)
                            local = bool(ino) and km.is_local(ino)
                        events.append((st.st_ino, is_dir, local))
                    except OSError:
                        pass
                    finally:
                        os.close(efd)
                if events:
                    try:
                        trio.from_thread.run_sync(km.opened, events, trio_token=token)
                    except trio.RunFinishedError:
                        return
        except Exception:  # noqa: BLE001 - recording is a hint; the mount goes on
            log.exception("%s: watching opens failed; boots are recorded from the view only",
                          km.mountpoint)
        finally:
            os.close(fd)
            os.close(stop_r)

    # -- unmounting ---------------------------------------------------------------------------

    async def umount(self, mountpoint: str) -> dict[str, Any]:
        real = os.path.realpath(mountpoint) if mountpoint not in self.mounts else mountpoint
        km = self.mounts.get(real)
        if km is None:
            raise MountError(f"{mountpoint} is not a kernel-mode mount of this node's casfs")
        try:
            await trio.to_thread.run_sync(syscalls.umount, real)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise MountError(f"cannot unmount {mountpoint}: target is busy") from exc
            raise MountError(f"cannot unmount {mountpoint}: {exc.strerror}") from exc
        await self._teardown(km, lazy=False)
        return {"last": not self.mounts}

    async def _teardown(self, km: KernelMount, lazy: bool) -> None:
        """After the overlay is gone (or to undo a half-made mount): stop watching, save
        the trace, make whole what can be without fetching, forget the mount."""
        if lazy:
            with contextlib.suppress(OSError):
                await trio.to_thread.run_sync(syscalls.umount, km.mountpoint,
                                              syscalls.MNT_DETACH)
        self._stop_watch(km)
        km.cancel.cancel()
        with trio.CancelScope(shield=True):
            await km.session.close()
            try:
                await km.complete_objects(fetch=False)
            except Exception as exc:  # noqa: BLE001 - objects are an optimisation
                log.warning("%s: completing objects failed: %r", km.mountpoint, exc)
        km.closed = True
        self.mounts.pop(km.mountpoint, None)
        remove_record(km.mountpoint)
        log.info("unmounted %s", km.mountpoint)
        with trio.CancelScope(shield=True):
            await self._update_holder()

    @staticmethod
    def _stop_watch(km: KernelMount) -> None:
        if km.watch_stop is not None:
            with contextlib.suppress(OSError):
                os.write(km.watch_stop, b"x")
                os.close(km.watch_stop)
            km.watch_stop = None

    async def shutdown(self) -> None:
        """Signalled: take every mount down (lazily: a busy one goes once its users do)."""
        for km in list(self.mounts.values()):
            await self._teardown(km, lazy=True)

    # -- requests ------------------------------------------------------------------------------

    async def serve_requests(self, listener: trio.socket.SocketType, done: trio.Event) -> None:
        assert self.nursery is not None
        self.tsock = listener
        while not done.is_set():
            try:
                conn, _ = await listener.accept()
            except (trio.ClosedResourceError, OSError):
                return  # closed for a handover
            self.nursery.start_soon(self._handle, conn, done)

    async def _handle(self, conn: trio.socket.SocketType, done: trio.Event) -> None:
        with conn:
            if peer_uid(conn) != os.geteuid():
                await conn.send(b"error: the view serves its own uid only\n")
                return
            data = b""
            with trio.move_on_after(10):
                while b"\n" not in data and len(data) <= MAX_REQUEST:
                    chunk = await conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            self.pending += 1
            try:
                reply = await self._answer(data)
            except _Fallback as fb:
                reply = f"fallback: {fb}"
            except CasfsError as exc:
                reply = "error: " + str(exc).replace("\n", " ")
            except Exception as exc:  # noqa: BLE001 - one request failing is not the service's end
                log.exception("request failed")
                reply = f"error: the node view failed: {exc!r}"
            finally:
                self.pending -= 1
            with contextlib.suppress(OSError):
                await conn.send(reply.encode() + b"\n")
        if self.ever_mounted and not self.mounts and not self.pending:
            done.set()  # the last mount is gone (or the only one asked for failed)

    async def _answer(self, data: bytes) -> str:
        if not data.strip():
            return "ok {}"  # a probe
        try:
            request = json.loads(data)
            op = request["op"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CasfsError(f"bad request ({exc})") from None
        if op == "mount":
            cfg = _checked_config(request.get("config"), self.cache_dir)
            env = daemon_environment({str(k): str(v)
                                      for k, v in dict(request.get("env") or {}).items()})
            self.cache.max_bytes = cfg.cache_size
            async with self.lock:
                return "ok " + json.dumps(await self.mount(cfg, env))
        if op == "umount":
            async with self.lock:
                return "ok " + json.dumps(await self.umount(str(request["mountpoint"])))
        if op == "stats":
            km = self.mounts.get(os.path.realpath(str(request["mountpoint"])))
            if km is None:
                raise MountError(f"{request['mountpoint']} is not a kernel-mode mount")
            out = km.shown_stats()
            out["view"] = self.view_stats()
            return "ok " + json.dumps(out)
        raise CasfsError(f"unknown request {op!r}")


class _Fallback(Exception):  # noqa: N818 - not an error: auto mode serves through FUSE instead
    """The image cannot be served in kernel mode (the reason); auto mode uses FUSE."""


def _checked_config(raw: Any, cache_dir: str) -> MountConfig:
    if not isinstance(raw, dict):
        raise CasfsError("bad request (no config)")
    try:
        cfg = MountConfig(**raw)
    except TypeError as exc:
        raise CasfsError(f"bad request ({exc})") from None
    if os.path.realpath(cfg.cache_dir) != cache_dir:
        raise CasfsError(f"cache directory {cfg.cache_dir!r} is not this view's")
    mp = cfg.mountpoint
    if not isinstance(mp, str) or not os.path.isabs(mp) or \
            any(ord(ch) < 32 or ord(ch) == 127 for ch in mp):
        raise CasfsError("the mountpoint must be an absolute path without control characters")
    return cfg


def _clear_stale_view(view_dir: Path) -> None:
    """A view left mounted by a killed service answers nothing: detach it."""
    from casfs.mounts import mount_table

    if str(view_dir) in mount_table():
        with contextlib.suppress(OSError):
            syscalls.umount(str(view_dir), syscalls.MNT_DETACH)


def serve_node(cache_dir: str, cache_size: int, ready: ReadyPipe | None = None,
               takeover: Takeover | None = None, link: Any = None,
               mounts: dict[str, Any] | None = None) -> None:
    """Run the node view service until its last mount is unmounted, or it is handed
    over (blocks). With a takeover: serve a dead view's connection and re-attach its
    mounts (`mounts`: what the holder knew of them, their environments)."""
    node = NodeView(cache_dir, cache_size)
    node.takeover = takeover
    if takeover is None:
        _clear_stale_view(node.view_dir)
        node.view_dir.mkdir(mode=0o700, exist_ok=True)
    from casfs.kernel.paths import socket_path

    sock_path = node.sock_path = socket_path(node.cache_dir)
    listener = node.listener = listen_private(sock_path)
    node.sock_ino = os.stat(sock_path).st_ino
    failover = hasattr(pyfuse3, "init_takeover")
    if failover:
        node.link = HoldLink(node.cache_dir, node.describe, pyfuse3.failover_session_fd,
                             node.agent_stats, node.handover, preconnected=link)
    elif takeover is not None:
        raise MountError("this pyfuse3 cannot take a connection over (third_party/pyfuse3)")

    def held_alive() -> bool:
        return node.link is not None and node.link.held and \
            connection_alive(pyfuse3.failover_session_fd())

    async def serve_fuse() -> None:
        assert node.fuse_done is not None
        try:
            with node.fuse_scope:
                await pyfuse3.main()
        finally:
            node.fuse_done.set()
        if node.mode == "serve":  # the view's connection ended under us
            node.mode = "crash" if held_alive() else "lost"
            log.error("the node view's FUSE session ended (%s)", node.mode)
            assert node.done is not None
            node.done.set()

    async def main() -> None:
        try:
            if takeover is None:
                pyfuse3.init(node.ops, str(node.view_dir), VIEW_OPTIONS)
            else:
                pyfuse3.init_takeover(node.ops, takeover.fd, takeover.init,
                                      str(node.view_dir), VIEW_OPTIONS)
        except (RuntimeError, ValueError) as exc:
            raise MountError(f"cannot mount the node view at {node.view_dir}: {exc}") from exc
        done = node.done = trio.Event()
        node.fuse_done = trio.Event()
        outcome = "unmount"
        try:
            async with trio.open_nursery() as nursery:
                node.nursery = nursery
                if takeover is not None:
                    # the mounts first: a read the kernel resends must find its mount
                    await node.reattach_all(mounts or {})
                    if not notify_resend(takeover.fd):
                        log.warning("this kernel does not resend requests "
                                    "(FUSE_NOTIFY_RESEND, Linux 6.9+): requests the last "
                                    "view had taken stay unanswered")
                nursery.start_soon(serve_fuse)
                tsock = trio.socket.from_stdlib_socket(listener)
                nursery.start_soon(node.serve_requests, tsock, done)
                nursery.start_soon(_watch_signals, node, done)
                nursery.start_soon(_exit_if_unused, node, done)
                nursery.start_soon(maintain_log)
                await trio.to_thread.run_sync(os.statvfs, str(node.view_dir))
                # As a FUSE-mode mount is tuned: a big readahead window and many
                # background requests, or a streaming read through the view crawls.
                tuned = await trio.to_thread.run_sync(
                    tune_kernel, str(node.view_dir), VIEW_READAHEAD_KB, VIEW_MAX_BACKGROUND)
                log.info("view kernel tuning: %s", ", ".join(tuned) or "none")
                log.info("node view %d %s %s at %s", os.getpid(),
                         "took over" if takeover else "serving", node.cache_dir,
                         node.view_dir)
                if node.link is not None:
                    nursery.start_soon(node.link.run)
                if ready is not None:
                    ready.ready()
                if takeover is not None and not node.mounts:
                    log.info("no kernel-mode mount left to serve: exiting")
                    done.set()
                await done.wait()
                if node.mode == "handover":
                    await node.hand_over()
                    outcome = "closed"
                elif node.mode == "crash":
                    outcome = "crash"
                else:
                    if node.link is not None:
                        await node.link.release("unmount")
                    await node.shutdown()
                nursery.cancel_scope.cancel()
        except BaseException:
            if outcome == "unmount" and node.mode == "serve" and held_alive():
                outcome = "crash"
            raise
        finally:
            node._close_listener()
            if outcome == "crash":
                pyfuse3.close(unmount=False)
                log.error("node view %d ended unexpectedly: its connection and mounts are "
                          "left to a successor", os.getpid())
            elif outcome == "unmount":
                pyfuse3.close(unmount=takeover is None)
                if takeover is not None:
                    with contextlib.suppress(OSError):
                        syscalls.umount(str(node.view_dir), syscalls.MNT_DETACH)
            log.info("node view %d stopped", os.getpid())

    trio.run(main)


def serve_view(cache_dir: str, cache_size: int, ready_fd: int, link: Any = None,
               takeover: Takeover | None = None, mounts: dict[str, Any] | None = None) -> int:
    """Be the node view (in a forked child); its exit status. An error before "ready"
    also goes to ready_fd. `takeover`: serve a dead view's connection; `link`: a
    connected link to the holder that forked this process."""
    from casfs.process import raise_open_files_limit, serve_reporting

    raise_open_files_limit(8192)
    return serve_reporting("the node view", ready_fd, lambda pipe: serve_node(
        cache_dir, cache_size, pipe, takeover=takeover, link=link, mounts=mounts))


async def _guarded(what: str, fn: Callable[[], Awaitable[None]]) -> None:
    """Background work of a mount that must never take the mount down."""
    try:
        await fn()
    except Exception:  # noqa: BLE001 - logged; the mount serves on
        log.exception("%s failed", what)


async def _watch_signals(node: NodeView, done: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("%s", sighup())
                continue
            if node.mode != "serve":
                continue
            log.info("signal %d: unmounting every kernel-mode mount", signum)
            node.mode = "unmount"
            done.set()
            return


async def _exit_if_unused(node: NodeView, done: trio.Event) -> None:
    await trio.sleep(IDLE_EXIT_SECONDS)
    if not node.ever_mounted:
        log.info("no mount asked for in %.0fs: exiting", IDLE_EXIT_SECONDS)
        done.set()
