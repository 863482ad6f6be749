"""Recording a boot: the first access to each chunk, and when, relative to the mount.

Recording is a set lookup and a list append per chunk read through the daemon
(re-reads served by the page cache never reach it), bounded by MAX_TRACE_CHUNKS.

The boot ends at whichever comes first: `idle_seconds` (default 10 s) with no read
in flight and no new first access, counted from the later of the last first access
and the end of the last read (so a read stalled on the store holds the boot open);
`max_seconds` after the mount (default 300 s), however busy; or the unmount. The
daemon tells the recorder when each read starts and ends (`reading()`). Then the
trace is saved to the store under the manifest, with pointers under each of the
image's layers so images sharing layers find it; and unless earlier traces' packs
already hold nearly all of this boot's chunks, a pack is written:
the boot's chunks' stored (compressed) forms back to back in first-access order,
so the next boot can fetch its working set in a few large ranged GETs. When no
pack is written the trace points into the existing pack holding most of its
chunks, so a pack stays reachable however many boots are merged after it.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager

import trio

from casfs.manifest import Manifest
from casfs.manifest.reader import ChunkRef
from casfs.store import Store
from casfs.store.content import compress
from prefetch.trace import MAX_TRACE_CHUNKS, Trace, TraceChunk

log = logging.getLogger(__name__)
PACK_COVERAGE_ENOUGH = 0.9


def path_of(manifest: Manifest, ino: int) -> str:
    """A path naming ino (found through its recorded parent directory)."""
    node = manifest.inode(ino)
    parent = node.parent
    for _, name, child in manifest.entries(parent):
        if child == ino:
            prefix = "" if parent == 1 else path_of(manifest, parent)
            return prefix + "/" + os.fsdecode(name)
    return f"<inode {ino}>"


class Recorder:
    def __init__(self, manifest: Manifest, *, idle_seconds: float = 10.0,
                 max_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.manifest = manifest
        self.idle_seconds = idle_seconds
        self.max_seconds = max_seconds
        self.clock = clock
        self.started = clock()
        self.last_new = self.started  # the last first access
        self.in_flight = 0  # reads started and not yet finished
        self.last_done = self.started  # when the last read finished
        self.seen: set[str] = set()
        self.order: list[tuple[str, int, int, int]] = []  # digest, length, t_ms, ino
        self.finished = False
        self.saved: str | None = None

    def on_read(self, ino: int, chunks: list[ChunkRef]) -> None:
        if self.finished:
            return
        for c in chunks:
            if c.digest not in self.seen and len(self.order) < MAX_TRACE_CHUNKS:
                self.seen.add(c.digest)
                now = self.clock()
                self.order.append((c.digest, c.length, int((now - self.started) * 1000), ino))
                self.last_new = now

    def read_started(self) -> None:
        """A read reached the daemon; pair with read_finished (or use reading())."""
        self.in_flight += 1

    def read_finished(self) -> None:
        """A read started with read_started returned, failed or was cancelled."""
        self.in_flight -= 1
        self.last_done = self.clock()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Around one read: while any read is in flight the boot does not go idle.

        Called on the trio thread, as ImageFS.read runs there: no lock needed."""
        self.read_started()
        try:
            yield
        finally:
            self.read_finished()

    def boot_over(self) -> bool:
        now = self.clock()
        if now - self.started >= self.max_seconds:
            return True
        if not self.order or self.in_flight:
            return False
        return now - max(self.last_new, self.last_done) >= self.idle_seconds

    async def watch(self, save: Callable[[], None]) -> None:
        """Wait for the boot to end, then save the trace (in a worker thread)."""
        while not self.boot_over():
            await trio.sleep(0.5)
        await trio.to_thread.run_sync(save)

    def build_trace(self) -> Trace:
        self.finished = True
        paths: dict[int, str] = {}
        chunks = []
        for digest, length, t_ms, ino in self.order:
            if ino not in paths:
                paths[ino] = path_of(self.manifest, ino)
            chunks.append(TraceChunk(digest, length, t_ms, paths[ino]))
        boot = (self.last_new - self.started) if self.order else 0.0
        return Trace(self.manifest.digest, time.time(), boot, chunks)


def save_trace(recorder: Recorder, store: Store, chunk_bytes: Callable[[str], bytes | None],
               known_packed: Mapping[str, tuple[str, int, int]] | Collection[str]) -> str | None:
    """Finish recording and write the trace (and maybe a pack). Blocking. Returns the trace id.

    chunk_bytes(digest): a chunk's bytes from the node (None when no longer there), for
    the pack (Fetcher.cached_bytes).

    known_packed: the chunks earlier traces' packs hold, as digest -> (pack, offset,
    stored length) (PrefetchStatus.packed_digests), or just the digests. When they
    cover the boot, no pack is written and, given locations, the trace points into
    the existing pack that holds most of its chunks: that way the pack stays in use
    when the trace that wrote it is no longer among the newest merged, and a trace
    learnt from another image's pack passes it on to this image's next boots.
    """
    if recorder.finished:
        return recorder.saved
    trace = recorder.build_trace()
    if not trace.chunks:
        return None
    digests = [c.digest for c in trace.chunks]
    covered = sum(1 for d in digests if d in known_packed) / len(digests)
    if covered < PACK_COVERAGE_ENOUGH:
        _write_pack(trace, store, chunk_bytes)
    elif isinstance(known_packed, Mapping):
        _point_into_pack(trace, known_packed)
    trace_id = f"{int(trace.created * 1000):013d}-{secrets.token_hex(4)}"
    layers = [layer.get("digest", "") for layer in recorder.manifest.meta.get("layers", [])]
    store.put_trace(trace.manifest, trace_id, trace.to_json(), [ly for ly in layers if ly])
    recorder.saved = trace_id
    log.info("saved boot trace %s: %d chunks over %.1fs%s", trace_id, len(trace.chunks),
             trace.boot_seconds, f", pack {trace.pack}" if trace.pack else "")
    return trace_id


def _point_into_pack(trace: Trace, known: Mapping[str, tuple[str, int, int]]) -> None:
    packs = Counter(known[c.digest][0] for c in trace.chunks if c.digest in known)
    if not packs:
        return
    pack = packs.most_common(1)[0][0]
    for c in trace.chunks:
        loc = known.get(c.digest)
        if loc is not None and loc[0] == pack:
            c.pack_offset, c.pack_length = loc[1], loc[2]
    trace.pack = pack


def _write_pack(trace: Trace, store: Store, chunk_bytes: Callable[[str], bytes | None]) -> None:
    frames = []
    offset = 0
    for c in trace.chunks:
        data = chunk_bytes(c.digest)
        if data is None:
            continue  # evicted already: the next boot fetches it by itself
        frame = compress(data)
        c.pack_offset, c.pack_length = offset, len(frame)
        frames.append(frame)
        offset += len(frame)
    if frames:
        trace.pack = store.put_pack(b"".join(frames))
