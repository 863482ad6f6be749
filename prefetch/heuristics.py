"""Guessing ahead when no trace says what comes next.

* Sequential readahead: when a file's chunk i is read soon after chunk i-1 (one of
  the file's last `STREAMS` chunks read: page faults walk several regions of a big
  library at once), the next `readahead_chunks` chunks (at most `readahead_bytes`)
  are fetched in the background (model weights, shared libraries read front to back).
  Once a file is being streamed (reads have stepped from chunk to next chunk
  `STREAMING_STEPS` times in a row), chunks of the window already on local disk are
  verified ahead of the reader as well, so its reads find them checked and in the page
  cache (a warm read of model weights) instead of each waiting on a disk read and a
  hash; scattered reads (page faults in a library) do not pay for that.
* Directory siblings: the first time a file in a directory is read, that
  directory's other small files (at most `sibling_max_size` bytes, at most
  `sibling_max_files` of them; not the `.py` sources of a directory that has a
  `__pycache__`) are fetched too: Python imports a package's
  modules one after another from the same directory. When that directory is a
  package's `__pycache__`, the `__pycache__` of each of its subpackages is
  fetched as well: the package's import goes on into them.
* Distribution metadata: the first read of a file in a `*.dist-info` (or `.egg-info`)
  directory fetches the file of that name in every such directory beside it: an
  entry-point scan reads `entry_points.txt` of each installed distribution in turn.
* Directory listings: Python lists a package directory when it first looks for a
  module in it, just before it opens that module's compiled file; the listing of a
  directory that has a `__pycache__` fetches that `__pycache__`'s small files at once,
  so the first module of each package is not a wait either.
* Shared libraries: the first read of a file named like one (`*.so`, `*.so.*`) of at
  most `library_max_size` bytes fetches all of it: the dynamic loader and the page
  faults that follow touch it all over, a miss each. Of a bigger one, what the loader
  reads before any code runs (prefetch.elf: the writable segments, the dynamic section
  and the symbol, string, hash and relocation tables), found from its ELF headers.

With a trace plan, only readahead runs, and only past what the plan fetches (model
weights the recorded boot did not read). All of it goes through the fetcher as prefetch, below every read in priority. Chunks
that the image's directory packs hold (casfs.packindex: `casfs index` packs each
layer's small files by directory) come in ranged GETs, a directory at a time; the
others one GET each.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Awaitable, Callable

import trio

from casfs.errors import CasfsError
from casfs.fetch import Fetcher
from casfs.manifest import Manifest
from casfs.manifest.reader import ChunkRef
from casfs.packindex import PackIndex
from casfs.ranges import PackRange, ranges_of
from prefetch.elf import parse_headers

log = logging.getLogger(__name__)
PYCACHE = b"__pycache__"
STREAMS = 8  # sequential runs told apart in one file
STREAMING_STEPS = 2  # chunk-to-next-chunk steps in a row before cached chunks are warmed
METADATA_DIRS = (b".dist-info", b".egg-info")


class Heuristics:
    def __init__(self, manifest: Manifest, fetcher: Fetcher, nursery: trio.Nursery, *,
                 readahead_chunks: int = 16, readahead_bytes: int = 32 << 20,
                 siblings: bool = True,
                 sibling_max_size: int = 256 * 1024, sibling_max_files: int = 512,
                 concurrency: int = 48, library_max_size: int = 64 << 20,
                 siblings_wanted: Callable[[], bool] = lambda: True,
                 planned: Callable[[str], bool] = lambda digest: False,
                 packs: PackIndex | None = None) -> None:
        self.manifest = manifest
        self.packs = packs if packs is not None else PackIndex()  # filled by the prefetcher once loaded
        self.fetcher = fetcher
        self.nursery = nursery
        self.readahead_chunks = readahead_chunks
        self.readahead_bytes = readahead_bytes
        self.siblings = siblings
        self.siblings_wanted = siblings_wanted  # false once a trace plan covers the boot
        self.planned = planned  # a chunk the trace plan fetches: no readahead from it
        self.sibling_max_size = sibling_max_size
        self.sibling_max_files = sibling_max_files
        self.library_max_size = library_max_size
        self._files_seen: set[int] = set()
        self.slots = trio.CapacityLimiter(concurrency)
        # ino -> the offsets of the last STREAMS chunks read, oldest first
        self._recent: dict[int, list[int]] = {}
        # ino -> the byte ranges readahead has asked for, newest last
        self._ahead: dict[int, list[tuple[int, int]]] = {}
        # ino -> (offset of the last chunk read, chunk-to-next-chunk steps in a row)
        self._steps: dict[int, tuple[int, int]] = {}
        self._dirs_seen: set[int] = set()  # directories whose files were fetched
        self._packages_seen: set[int] = set()  # packages whose subpackages were
        self._metadata_seen: set[tuple[int, bytes]] = set()  # (site dir, file name)
        self.requested = 0  # requests started: single GETs and pack ranges
        self.ranged = 0  # of those, ranged GETs of directory packs
        self.failures = 0  # guesses that raised something unexpected (logged)

    def on_read(self, ino: int, chunks: list[ChunkRef]) -> None:
        first, last = chunks[0], chunks[-1]
        recent = self._recent.setdefault(ino, [])
        sequential = any(prev <= first.offset <= prev + last.length for prev in recent)
        if last.offset not in recent:
            recent.append(last.offset)
            del recent[:-STREAMS]
        streaming = self._streaming(ino, first, last)
        if self.readahead_chunks and sequential and not self.planned(last.digest):
            self._readahead(ino, last, warm=streaming)
        if not self.siblings_wanted():
            return
        if ino not in self._files_seen:
            self._files_seen.add(ino)
            self._fetch_library(ino, chunks)
        if self.siblings:
            parent = self.manifest.inode(ino).parent
            wanted: list[str] = []
            if parent not in self._dirs_seen:
                self._dirs_seen.add(parent)
                wanted = self._siblings(parent, ino) + self._package_metadata(ino)
            if parent not in self._packages_seen:
                # Apart from the above: a `__pycache__` fetched whole as a subpackage's
                # has not had its own subpackages fetched yet.
                self._packages_seen.add(parent)
                wanted += self._subpackage_caches(parent)
            if wanted:
                self._fetch(wanted)

    def _package_metadata(self, ino: int) -> list[str]:
        """A file of one installed distribution's metadata (`x.dist-info/entry_points.txt`)
        being read means a scan of them all (importlib.metadata, pkg_resources): the file
        of that name in every `*.dist-info` / `*.egg-info` directory beside it."""
        parent = self.manifest.inode(ino).parent
        site = self.manifest.inode(parent).parent
        name = _name_of(self.manifest, parent, ino)
        if name is None or (site, name) in self._metadata_seen or \
                not (_name_of(self.manifest, site, parent) or b"").endswith(METADATA_DIRS):
            return []
        self._metadata_seen.add((site, name))
        out: list[str] = []
        for _, dirname, child in self.manifest.entries(site):
            if child == parent or not dirname.endswith(METADATA_DIRS):
                continue
            found = self.manifest.lookup(child, name)
            node = self.manifest.inode(found) if found else None
            if node is not None and stat.S_ISREG(node.mode) and \
                    0 < node.size <= self.sibling_max_size:
                out.extend(c.digest for c in self.manifest.chunks(found)[:1])
        return out

    def on_list(self, directory: int) -> None:
        """A directory is being listed: fetch its `__pycache__`, whose modules come next."""
        if not self.siblings or not self.siblings_wanted():
            return
        cache = self.manifest.lookup(directory, PYCACHE)
        if cache and cache not in self._dirs_seen and \
                stat.S_ISDIR(self.manifest.inode(cache).mode):
            self._dirs_seen.add(cache)
            self._fetch(self._siblings(cache, 0))

    def _fetch_library(self, ino: int, reading: list[ChunkRef]) -> None:
        node = self.manifest.inode(ino)
        if node.count <= len(reading):
            return  # what is being read is all of it
        if not _looks_like_library(self.manifest, ino):
            return
        if node.size > self.library_max_size:  # too big to take whole
            if reading[0].offset == 0:  # the loader reading the headers
                self._start(self._fetch_loader_parts, ino)
            return
        skip = {c.digest for c in reading}
        for c in self.manifest.chunks(ino):
            if c.digest not in skip:
                self._spawn(c.digest)

    async def _fetch_loader_parts(self, ino: int) -> None:
        """What the dynamic loader reads of a big library, from its ELF headers."""
        size = self.manifest.inode(ino).size
        try:
            layout = parse_headers(await self._file_bytes(ino, 0, 4096), size)
            if layout is None:
                return
            # At most library_max_size of each part: a library with one writable
            # segment over all of it (or a hostile one) is not fetched whole.
            for offset, length in layout.writable():
                self._fetch_range(ino, offset, min(length, self.library_max_size))
            if layout.dynamic is not None:
                tables = layout.tables(await self._file_bytes(ino, *layout.dynamic))
                if tables is not None:
                    self._fetch_range(ino, tables[0], min(tables[1], self.library_max_size))
        except (CasfsError, OSError) as exc:
            log.debug("no loader prefetch for inode %d: %s", ino, exc)

    def _fetch_range(self, ino: int, offset: int, length: int) -> None:
        for c in self.manifest.chunks_for_range(ino, offset, length):
            self._spawn(c.digest)

    async def _file_bytes(self, ino: int, offset: int, length: int) -> bytes:
        """Bytes of a file, its chunks fetched as prefetch (joining a read's fetch)."""
        end = min(offset + length, self.manifest.inode(ino).size)
        chunks = self.manifest.chunks_for_range(ino, offset, length)
        return bytes(await self.fetcher.read(ranges_of(chunks, offset, end), prefetch=True))

    def _streaming(self, ino: int, first: ChunkRef, last: ChunkRef) -> bool:
        """Whether reads of ino walk its chunks in order, one after the next."""
        prev, steps = self._steps.get(ino, (-1, 0))
        if first.offset != prev:  # not more of the same chunk
            steps = steps + 1 if prev >= 0 and first.offset == self._next_offset(ino, prev) else 0
        self._steps[ino] = (last.offset, steps)
        return steps >= STREAMING_STEPS

    def _next_offset(self, ino: int, offset: int) -> int:
        chunk = self.manifest.chunks_for_range(ino, offset, 1)
        return chunk[0].offset + chunk[0].length if chunk else -1

    def _readahead(self, ino: int, last: ChunkRef, warm: bool = False) -> None:
        end = last.offset + last.length
        # Big files have big chunks (indexer.chunking): bound the window in bytes too,
        # which bounds the memory that chunks in flight hold. A reader that has streamed
        # through a whole window (`warm`, and its reads stepped from chunk to next chunk
        # for readahead_chunks more steps: model weights) gets a window twice as wide,
        # more requests in flight for the bandwidth-delay product of a remote store (a
        # 4 MiB GET at 20 ms takes 100-300 ms through a busy store); scattered reads (a
        # library's page faults) and short runs keep the narrow one. Twice, not more: on
        # the read-path benchmark 2x gained 5-15% and kept the daemon under 150 MB RSS,
        # 4x gained a few % more for 190-270 MB (the chunks on the wire are in memory).
        chunks, limit = self.readahead_chunks, self.readahead_bytes
        if warm and self._steps.get(ino, (0, 0))[1] >= STREAMING_STEPS + chunks:
            chunks, limit = chunks * 2, limit * 2
        span = max(last.length, min(chunks * last.length, limit))
        windows = self._ahead.setdefault(ino, [])
        start = end
        moved = True
        while moved:  # past what this stream (or another) already asked for
            moved = False
            for lo, hi in windows:
                if lo <= start < hi:
                    start, moved = hi, True
        if start >= end + span:
            return
        ahead = self.manifest.chunks_for_range(ino, start, end + span - start)
        if ahead:
            windows.append((start, ahead[-1].offset + ahead[-1].length))
            del windows[:-2 * STREAMS]
            for c in ahead:
                self._spawn(c.digest, warm)

    def _siblings(self, parent: int, ino: int) -> list[str]:
        """Digests of a directory's small files, but `ino`'s."""
        out: list[str] = []
        count = 0
        # Python reads a package's compiled modules, not its sources: where a
        # `__pycache__` sits beside them, the `.py` files are only stat'ed.
        compiled = bool(self.manifest.lookup(parent, PYCACHE))
        for _, name, child in self.manifest.entries(parent):
            if child == ino or (compiled and name.endswith(b".py")):
                continue
            node = self.manifest.inode(child)
            if stat.S_ISREG(node.mode) and 0 < node.size <= self.sibling_max_size:
                out.extend(c.digest for c in self.manifest.chunks(child)[:1])
                count += 1
                if count >= self.sibling_max_files:
                    break
        return out

    def _subpackage_caches(self, directory: int) -> list[str]:
        """Reading a package's compiled modules (pkg/__pycache__/x.pyc) announces the
        import of its subpackages next: their pkg/sub/__pycache__ files too."""
        out: list[str] = []
        if self.manifest.lookup(self.manifest.inode(directory).parent, PYCACHE) != directory:
            return out
        package = self.manifest.inode(directory).parent
        if not self.manifest.lookup(package, b"__init__.py"):
            return out  # not a package (the stdlib's top level, site-packages): too broad
        for _, _, sub in self.manifest.entries(package):
            if sub == directory or not stat.S_ISDIR(self.manifest.inode(sub).mode):
                continue
            cache = self.manifest.lookup(sub, PYCACHE)
            if cache and cache not in self._dirs_seen:
                self._dirs_seen.add(cache)
                out.extend(self._siblings(cache, 0))
        return out

    def _fetch(self, digests: list[str]) -> None:
        """Fetch these chunks: a ranged GET per run of them in a directory pack, a GET
        for each of the others."""
        ranges, loose = self.packs.ranges(
            d for d in digests if not self.fetcher.in_flight(d))
        for r in ranges:
            self.requested += 1
            self.ranged += 1
            self._start(self._get_range, r)
        for digest in loose:
            self._spawn(digest)

    def _spawn(self, digest: str, warm: bool = False) -> None:
        if self.fetcher.in_flight(digest):
            return
        self.requested += 1
        self._start(self._get, digest, warm)

    def _start(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        """Run a guess in the background. A guess is only a guess: whatever it raises
        is logged and counted, never passed on to the mount."""

        async def guarded() -> None:
            try:
                await fn(*args)
            except Exception as exc:  # noqa: BLE001 - see the docstring
                self.failures += 1
                log.warning("a first-boot guess failed (%s): %r", fn.__name__, exc)

        self.nursery.start_soon(guarded)

    async def _get_range(self, r: PackRange) -> None:
        async with self.slots:
            try:
                await self.fetcher.get_pack_range(r)
            except CasfsError as exc:
                log.debug("heuristic prefetch of a range of pack %s failed: %s", r.pack, exc)

    async def _get(self, digest: str, warm: bool = False) -> None:
        async with self.slots:
            try:
                await self.fetcher.prefetch(digest, warm=warm)
            except CasfsError as exc:
                log.debug("heuristic prefetch of %s failed: %s", digest, exc)


def _name_of(manifest: Manifest, directory: int, ino: int) -> bytes | None:
    for _, name, child in manifest.entries(directory):
        if child == ino:
            return name
    return None


def _looks_like_library(manifest: Manifest, ino: int) -> bool:
    """Named like a shared library: lib.so, lib.so.1.2, mod.cpython-311-x86_64-linux-gnu.so."""
    name = _name_of(manifest, manifest.inode(ino).parent, ino) or b""
    return name.endswith(b".so") or b".so." in name
