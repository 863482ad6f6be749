"""One mount's prefetch, from start to end: the one object that owns recording this
boot, replaying earlier boots' traces, guessing ahead when there are none, streaming
the rest of the image in the background on a first boot (prefetch.stream), the
image's directory pack indexes they share, and counting the reads that still waited
on the network (prefetch.waits).

The daemon creates a PrefetchSession, attaches it to the filesystem model (it observes
reads and listings) and starts `run()` in its nursery; `close()` at unmount saves a
trace the boot had not finished. Prefetch is only ever a hint: everything it does runs
in the session's own nursery, and whatever goes wrong there (a hostile trace, a bug in a
guess, a store failure) is logged and counted in `stats()` and never reaches the mount's
task group: the mount keeps serving, without prefetch if need be.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio

from casfs.errors import CasfsError
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.manifest.reader import ChunkRef
from casfs.packindex import PackIndex
from casfs.process import release_free_memory
from casfs.store import Store
from casfs.vfs import ImageFS
from prefetch.heuristics import Heuristics
from prefetch.policy import OFF, StreamPolicy
from prefetch.recorder import Recorder, save_trace
from prefetch.replay import Prefetcher
from prefetch.stream import BackgroundStream
from prefetch.waits import ReadWaits

log = logging.getLogger(__name__)


def _policy(background: StreamPolicy | Mapping[str, Any] | str | None) -> StreamPolicy:
    """The stream's policy; a bad setting is logged and the default used (the mount
    goes on: the CLI checks its flags before it gets here)."""
    try:
        if isinstance(background, StreamPolicy):
            return background
        if isinstance(background, str):
            return StreamPolicy.from_settings({"background_fetch": background})
        return StreamPolicy.from_settings(background)
    except ValueError as exc:
        log.warning("background fetch: %s; using the default", exc)
        return StreamPolicy()


class PrefetchSession:
    """Recording (`record`), replay, first-boot guessing and the background stream
    (`prefetch`; the stream as `background` says) for one mount.

    background: the stream's policy: a StreamPolicy; or a mount's settings (a mapping
    with keys `background_fetch`, `background_cap`, `background_rate`,
    `background_idle_cpus`: MountConfig's fields or its `extra`), each unset one from
    this process's environment (CASFS_BACKGROUND_FETCH, _CAP, _RATE, _IDLE_CPUS), else
    the default; or just a mode (off, likely, all, auto); None: the environment alone."""

    def __init__(self, manifest: Manifest, store: Store, fetcher: Fetcher, *,
                 prefetch: bool = True, record: bool = True, trace_idle: float = 10.0,
                 background: StreamPolicy | Mapping[str, Any] | str | None = None) -> None:
        self.manifest = manifest
        self.store = store
        self.fetcher = fetcher
        self.packs = PackIndex() if prefetch else None
        self.prefetcher = (Prefetcher(store, manifest, fetcher, packs=self.packs)
                           if prefetch else None)
        self.recorder = Recorder(manifest, idle_seconds=trace_idle) if record else None
        self.heuristics: Heuristics | None = None
        self.waits = ReadWaits(fetcher)
        self.policy = _policy(background)
        self.stream: BackgroundStream | None = None
        self._boot: Recorder | None = None  # tells the boot's end when not recording
        if self.packs is not None and self.policy.mode_for(manifest.meta) != OFF:
            # The boot's end stops the stream: the recorder's idle rule, from a recorder
            # of its own when this boot is not recorded.
            boot = self.recorder or Recorder(manifest, idle_seconds=trace_idle)
            if boot is not self.recorder:
                self._boot = boot
            self.stream = BackgroundStream(manifest, fetcher, self.packs, policy=self.policy,
                                           boot_over=boot.boot_over)
        self.failures = 0  # anything that went wrong inside prefetch (logged)
        # Called (in the session's nursery) once the boot is over and its trace saved.
        self.after_boot: list[Callable[[], Awaitable[None]]] = []
        self._guessing = prefetch
        self._closed = False

    # -- wiring ------------------------------------------------------------------------

    def attach(self, fs: ImageFS) -> None:
        """Observe the model's reads and listings (before the mount serves)."""
        fs.read_observers.append(self._on_read)
        fs.read_observers.append(self.waits.observe)  # last: no checkpoint before its tracker
        fs.list_observers.append(self._on_list)
        if self.recorder is not None:
            fs.read_trackers.append(self.recorder.reading)
        elif self._boot is not None:
            fs.read_trackers.append(self._boot.reading)
        fs.read_trackers.append(self.waits.reading)

    def observe_read(self, ino: int, chunks: list[ChunkRef]) -> None:
        """A read of these chunks of file ino reached casfs (or, in kernel mode, the file
        was opened where the kernel serves it: then its chunks stand for the read)."""
        self._on_read(ino, chunks)

    def observe_list(self, directory: int) -> None:
        """A directory is being listed (or, in kernel mode, opened)."""
        self._on_list(directory)

    def _on_read(self, ino: int, chunks: list[ChunkRef]) -> None:
        try:
            if self.recorder is not None:
                self.recorder.on_read(ino, chunks)
            elif self._boot is not None:
                self._boot.on_read(ino, chunks)
            if self.heuristics is not None:
                self.heuristics.on_read(ino, chunks)
            if self.stream is not None:
                self.stream.on_read(ino, chunks)
        except Exception as exc:  # noqa: BLE001 - a hint must never fail a read
            self._failed("observing a read", exc)
            self._drop_heuristics()

    def _on_list(self, directory: int) -> None:
        try:
            if self.heuristics is not None:
                self.heuristics.on_list(directory)
        except Exception as exc:  # noqa: BLE001 - a hint must never fail a listing
            self._failed("observing a listing", exc)
            self._drop_heuristics()

    def _drop_heuristics(self) -> None:
        if self.heuristics is not None:
            self.failures += self.heuristics.failures
            self.heuristics = None

    def _failed(self, what: str, exc: BaseException) -> None:
        self.failures += 1
        log.warning("prefetch: %s failed, carrying on without it: %r", what, exc,
                    exc_info=not isinstance(exc, CasfsError))

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled (the unmount). Signals `started` once the guesses are
        ready for the first reads; the trace load is under way by then. Never raises
        anything but cancellation."""
        started = False
        try:
            async with trio.open_nursery() as nursery:
                if self._guessing:
                    self.heuristics = Heuristics(
                        self.manifest, self.fetcher, nursery, packs=self.packs,
                        siblings_wanted=self._no_trace_plan, planned=self._planned)
                if self.prefetcher is not None:
                    nursery.start_soon(self._guard, "replaying traces", self._replay)
                if self.recorder is not None:
                    nursery.start_soon(self._guard, "recording the boot", self._record)
                task_status.started()
                started = True
                await trio.sleep_forever()
        except Exception as exc:  # noqa: BLE001 - see the docstring
            self._failed("the prefetch session", exc)
            self._drop_heuristics()
        if not started:
            task_status.started()

    async def _guard(self, what: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except Exception as exc:  # noqa: BLE001 - see the module docstring
            self._failed(what, exc)

    async def _replay(self) -> None:
        assert self.prefetcher is not None
        await self.prefetcher.run()
        if self.stream is not None and self.prefetcher.status.source != "manifest":
            # No trace of this image (none at all, or only of images sharing layers,
            # replayed by now): stream the rest behind the guesses and the reads.
            await self._guard("streaming the image", self.stream.run)
        elif self.stream is not None:
            self.stream.status.state = "off"
            self.stream.status.stopped = "trace replayed"
        # Prefetch's buffers (ranges in flight, decompressed chunks) are freed by now,
        # but glibc keeps freed heap mapped; hand it back so RSS is what the daemon holds.
        await trio.to_thread.run_sync(release_free_memory)

    async def _record(self) -> None:
        assert self.recorder is not None
        await self.recorder.watch(self._save)
        for hook in self.after_boot:
            await self._guard("work after the boot", hook)

    @property
    def planned(self) -> set[str]:
        """Every chunk the trace plan fetches (empty without one)."""
        return self.prefetcher.planned if self.prefetcher is not None else set()

    def _no_trace_plan(self) -> bool:
        st = self.prefetcher.status if self.prefetcher is not None else None
        return st is None or (st.state in ("done", "failed") and st.planned_chunks == 0)

    def _planned(self, digest: str) -> bool:
        return self.prefetcher is not None and digest in self.prefetcher.planned

    def _save(self) -> None:
        """Write this boot's trace (and maybe its pack). Blocking; never raises."""
        if self.recorder is None:
            return
        known = self.prefetcher.status.packed_digests if self.prefetcher is not None else set()
        try:
            save_trace(self.recorder, self.store, self.fetcher.cached_bytes, known)
        except (CasfsError, OSError) as exc:
            log.warning("could not save the boot trace: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a trace is a hint
            self._failed("saving the trace", exc)
        release_free_memory()  # the pack was built in memory

    async def close(self) -> None:
        """At unmount: save the trace of a boot that had not ended yet."""
        if self._closed:
            return
        self._closed = True
        if self.recorder is not None and not self.recorder.finished:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._save)

    # -- reporting ---------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.prefetcher is not None:
            out.update(self.prefetcher.status.as_dict())
        else:
            out["state"] = "off"
        if self.heuristics is not None:
            out["heuristic_requests"] = self.heuristics.requested
            out["heuristic_ranges"] = self.heuristics.ranged
        if self.packs is not None:
            out["dir_packs"] = self.packs.as_dict()
        if self.recorder is not None:
            out["recorded_chunks"] = len(self.recorder.order)
            out["trace_saved"] = self.recorder.saved or ""
        out["stream"] = (self.stream.status.as_dict() if self.stream is not None
                         else {"mode": OFF, "state": "off"})
        # The figures a benchmark reports, flat beside the others (metrics has the waits).
        stream = out["stream"]
        for key in ("requests", "fetched_chunks", "fetched_bytes", "used_chunks", "used_bytes"):
            out[f"stream_{key}"] = stream.get(key, 0)
        m = self.fetcher.metrics
        out["read_waits"] = m.read_waits
        out["read_wait_seconds"] = round(m.read_wait_seconds, 4)
        out["failures"] = self.failures + (self.heuristics.failures if self.heuristics else 0)
        return out
