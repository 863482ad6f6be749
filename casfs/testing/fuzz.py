"""Fuzzing the manifest reader and layer ingestion: the targets, the mutator, and the
line between a finding and a broken harness.

Owns: `Target` (runs one input, sorts the outcome), `fuzz_targets()` (manifest reader;
tar, gzip and zstd layer ingestion through the real `Store` over a `MemoryBackend`,
directory packs included), `check_seeds` (every seed must be accepted before fuzzing
starts), `mutate`, `hypothesis_batch` and `fuzz_target` (one target for a time budget).
benchmarks/faults.py runs them; tests/test_doubles.py checks the seeds.

An input's outcome is one of:
- accepted: it parsed, and what it built holds together (the manifest validates and
  reads back, every blob and every directory-pack entry verifies);
- refused: the code under test raised a casfs error (bad input, said so);
- a crash: any other exception from the code under test, or an accepted input whose
  result does not hold together (an AssertionError): kept under the crash directory;
- a harness error (`HarnessError`): the harness itself is broken, e.g. a double that no
  longer matches what the code under test calls (a TypeError naming the double), or
  code here failing. It stops the fuzzing at once: counting it as a crash of casfs, input
  after input, would hide that nothing is being fuzzed.
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from casfs.errors import CasfsError

__all__ = ["FuzzTimeout", "HarnessError", "Target", "check_seeds", "fuzz_target",
           "fuzz_targets", "hypothesis_batch", "is_harness_error", "mutate"]

EXECUTION_TIMEOUT = 20.0


class HarnessError(Exception):
    """The fuzz harness is broken (not casfs): the run must stop and say so."""


class FuzzTimeout(Exception):  # noqa: N818 - raised by the alarm, not an error condition
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise FuzzTimeout()


# == harness or code under test ====================================================================

_HARNESS_FILES: set[str] = set()
_HARNESS_NAMES: set[str] = set()


def register_harness(*files: str, names: tuple[str, ...] = ()) -> None:
    """Mark source files (and class names) as harness: an exception raised in them, or a
    TypeError/AttributeError naming one of those classes, is a harness error."""
    _HARNESS_FILES.update(os.path.realpath(f) for f in files)
    _HARNESS_NAMES.update(names)


def _innermost_file(tb: TracebackType | None) -> str | None:
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return os.path.realpath(last) if last else None


def is_harness_error(exc: BaseException) -> bool:
    """Whether an exception (not a casfs error) comes from the harness, not casfs.

    AssertionErrors are the harness's checks of what casfs built: findings. Anything else
    raised inside harness code is the harness failing; so is a TypeError or AttributeError
    that names a harness class (a double called with arguments it does not take, or
    asked for a method it lacks: Python raises those at the caller, inside casfs)."""
    if isinstance(exc, AssertionError):
        return False
    if _innermost_file(exc.__traceback__) in _HARNESS_FILES:
        return True
    if isinstance(exc, TypeError | AttributeError):
        text = str(exc)
        return any(re.search(rf"\b{re.escape(n)}\b", text) for n in _HARNESS_NAMES)
    return False


# == targets =========================================================================================

class Target:
    """A fuzz target: run(data) returns "accepted" or raises a casfs error."""

    def __init__(self, name: str, corpus: list[bytes], run: Callable[[bytes], str]) -> None:
        self.name, self.corpus, self.run = name, corpus, run
        self.stats: dict[str, Any] = {"executions": 0, "accepted": 0, "refused": 0,
                                      "crashes": 0, "timeouts": 0, "seconds": 0.0,
                                      "mutational": 0, "hypothesis": 0}
        self.crashes: list[dict[str, Any]] = []

    def execute(self, data: bytes, crash_dir: Path, how: str) -> None:
        """Run one input and count its outcome; raises HarnessError if the harness broke."""
        self.stats["executions"] += 1
        self.stats[how] += 1
        signal.setitimer(signal.ITIMER_REAL, EXECUTION_TIMEOUT)
        try:
            outcome = self.run(data)
            self.stats[outcome] += 1
        except CasfsError:
            self.stats["refused"] += 1
        except FuzzTimeout:
            self.stats["timeouts"] += 1
            self._keep(data, f"timeout (over {EXECUTION_TIMEOUT:.0f} s)", crash_dir)
        except Exception as exc:
            if is_harness_error(exc):
                path = self._save(data, crash_dir, "harness-error")
                raise HarnessError(
                    f"{self.name}: the harness failed, not casfs (input at {path}):\n"
                    + "".join(traceback.format_exception(exc))[-4000:]) from exc
            self.stats["crashes"] += 1  # a crash: anything but a clear casfs error
            self._keep(data, "".join(traceback.format_exception_only(exc)).strip(), crash_dir)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _save(self, data: bytes, crash_dir: Path, kind: str) -> Path:
        crash_dir.mkdir(parents=True, exist_ok=True)
        path = crash_dir / f"{self.name.replace(' ', '-')}-{kind}-{self.stats['executions']}.bin"
        path.write_bytes(data)
        return path

    def _keep(self, data: bytes, why: str, crash_dir: Path) -> None:
        path = self._save(data, crash_dir, "crash")
        if len(self.crashes) < 20:
            self.crashes.append({"input": str(path), "error": why[:1000]})


def fuzz_targets() -> list[Target]:
    """The manifest reader, and layer ingestion from plain, gzip and zstd streams."""
    from casfs.manifest import Manifest, build_manifest
    from casfs.packindex import parse as parse_pack_index
    from casfs.store import Store
    from casfs.store.content import verify_blob
    from casfs.testing import ocibuild as ob
    from casfs.testing.doubles import MemoryBackend
    from casfs.testing.hostile import GOOD, SEED_TAR, exercise, rich_tar
    from indexer.apply import TreeBuilder
    from indexer.decompress import ExpansionGuard, open_decompressed
    from indexer.dirpack import DirPacker
    from indexer.layer import read_layer, resolve_chunks
    from indexer.upload import BlobUploader

    def exercise_manifest(data: bytes) -> str:
        exercise(Manifest(data))
        return "accepted"

    def check_accepted(store: Store, data: bytes, pack_index: bytes | None) -> None:
        """What an accepted layer built must hold together; a casfs error here is a finding."""
        try:
            m = Manifest(data)
            exercise(m)
            chunks = m.chunk_digests()
            for digest in chunks:
                verify_blob(digest, store.get_blob_compressed(digest))
            assert pack_index is not None, "directory packing failed on an accepted layer"
            for digest, (pack, offset, length) in parse_pack_index(pack_index, "fuzz").items():
                assert digest in chunks, f"the pack index names {digest}, not in the manifest"
                verify_blob(digest, store.get_pack_range(pack, offset, length))
        except CasfsError as exc:
            raise AssertionError(f"an accepted layer built something invalid: {exc}") from exc

    def ingest(stream: Any, with_manifest: list[bytes] | None = None) -> str:
        # A fresh store (the real Store over the memory double), uploader and packer for
        # each input: nothing one input did is seen by the next.
        store = Store(MemoryBackend("memory://fuzz"))
        uploader = BlobUploader(store, workers=2)
        packer = DirPacker(store, pack_bytes=16 << 10)  # small packs: several per layer
        try:
            ops = read_layer(stream, uploader, "layer", packer=packer)
            resolve_chunks(ops)
            builder = TreeBuilder()
            builder.apply_layer(ops, "layer")
            data = build_manifest(builder.root, {"layers": []})
        except BaseException:
            packer.close()
            uploader.close(cancel=True)
            raise
        uploader.close()
        check_accepted(store, data, packer.finish("fuzz layer"))
        if with_manifest is not None:
            with_manifest.append(data)
        return "accepted"

    def tar_target(data: bytes) -> str:
        return ingest(io.BytesIO(data))

    def compressed(comp: str) -> Callable[[bytes], str]:
        def run(data: bytes) -> str:
            stream = open_decompressed(io.BufferedReader(io.BytesIO(data)), comp, "layer")
            guarded = io.BufferedReader(ExpansionGuard(stream, lambda: len(data), "layer",
                                                       256 << 20, 1000), 1 << 16)
            return ingest(guarded)
        return run

    tars = [SEED_TAR, rich_tar()]
    manifests = [GOOD]
    built: list[bytes] = []
    try:  # the manifest the rich seed builds is a seed of the manifest reader
        ingest(io.BytesIO(tars[1]), built)
    except Exception as exc:
        raise HarnessError("ingesting the seed layer failed; nothing would be fuzzed:\n"
                           + "".join(traceback.format_exception(exc))[-4000:]) from exc
    manifests += built
    return [
        Target("manifest reader", manifests, exercise_manifest),
        Target("tar ingestion", tars, tar_target),
        Target("gzip layer ingestion", [ob.compress(t, "gzip") for t in tars], compressed("gzip")),
        Target("zstd layer ingestion", [ob.compress(t, "zstd") for t in tars], compressed("zstd")),
    ]


def check_seeds(targets: list[Target]) -> None:
    """Every seed of every target must be accepted: a seed that fails means the harness
    (or casfs on good input) is broken, and fuzzing from it would measure nothing."""
    for target in targets:
        for i, seed in enumerate(target.corpus):
            try:
                outcome = target.run(seed)
            except Exception as exc:
                raise HarnessError(
                    f"{target.name}: seed {i} ({len(seed)} bytes) was not accepted; the "
                    "harness or casfs is broken on good input, nothing would be fuzzed:\n"
                    + "".join(traceback.format_exception(exc))[-4000:]) from exc
            if outcome != "accepted":
                raise HarnessError(f"{target.name}: seed {i} gave {outcome!r}, not 'accepted'")


register_harness(__file__, names=("MemoryBackend", "FaultyBackend"))


def _register_doubles() -> None:
    from casfs.testing import doubles, hostile

    register_harness(doubles.__file__, hostile.__file__)


_register_doubles()


# == inputs ========================================================================================

INTERESTING = [b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff",
               b"\xff\xff\xff\x7f", b"\x01\x00\x00\x00", b"0000000\x00", b"7777777\x00",
               b"../", b"/", b"\x00" * 8]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 1, 2, 3, 5, 8])):
        if not buf:
            buf += rng.randbytes(rng.randint(1, 64))
            continue
        op = rng.randrange(8)
        at = rng.randrange(len(buf))
        if op == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at] = rng.randrange(256)
        elif op == 2:
            v = rng.choice(INTERESTING)
            buf[at:at + len(v)] = v
        elif op == 3:
            del buf[at:at + rng.randint(1, 512)]
        elif op == 4:
            buf[at:at] = rng.randbytes(rng.randint(1, 64))
        elif op == 5:
            del buf[at:]
        elif op == 6:
            other = rng.choice(corpus)
            if other:
                s = rng.randrange(len(other))
                buf[at:at + 256] = other[s:s + rng.randint(1, 256)]
        else:  # a 4- or 8-byte integer field set to something big
            n = rng.choice([4, 8])
            buf[at:at + n] = rng.choice([rng.randrange(1 << (8 * n)), (1 << (8 * n)) - 1,
                                         1 << (8 * n - 1)]).to_bytes(n, "little")
    return bytes(buf)


def hypothesis_batch(target: Target, crash_dir: Path, seed: int, examples: int) -> None:
    """`examples` hypothesis-generated edits of one seed (byte changes, a cut, a tail)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    base = target.corpus[seed % len(target.corpus)]
    edits = st.lists(st.tuples(st.integers(0, max(0, len(base) - 1)), st.integers(0, 255)),
                     min_size=1, max_size=8)

    broken: list[HarnessError] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(edits, st.integers(0, len(base)), st.binary(max_size=64))
    def run(mutations: list[tuple[int, int]], cut: int, tail: bytes) -> None:
        if broken:
            return
        buf = bytearray(base)
        for at, value in mutations:
            if buf:
                buf[at % len(buf)] = value
        try:
            target.execute(bytes(buf[:cut]) + tail if tail else bytes(buf), crash_dir,
                           "hypothesis")
        except HarnessError as exc:  # raised past hypothesis, not through it (no shrinking)
            broken.append(exc)

    run()
    if broken:
        raise broken[0]


def fuzz_target(target: Target, seconds: float, rng: random.Random, crash_dir: Path,
                seed: int, hypothesis_home: Path | None = None) -> None:
    """Fuzz one target for `seconds`: batches of 50 inputs, a quarter of them
    hypothesis-generated. Runs on the main thread (each input is bounded by SIGALRM);
    raises HarnessError as soon as the harness breaks. `hypothesis_home`: where
    hypothesis keeps its files (else `.hypothesis` in the directory it was imported
    from), so that a run in a sandbox directory finds only what the inputs wrote."""
    if hypothesis_home is not None:
        from hypothesis.configuration import set_hypothesis_home_dir

        set_hypothesis_home_dir(hypothesis_home)
    old_handler = signal.signal(signal.SIGALRM, _alarm)
    t0 = time.monotonic()
    deadline = t0 + seconds
    batch = 0
    try:
        while time.monotonic() < deadline:
            if batch % 4 == 3:
                hypothesis_batch(target, crash_dir, seed + batch, 50)
            else:
                for _ in range(50):
                    target.execute(mutate(rng, rng.choice(target.corpus), target.corpus),
                                   crash_dir, "mutational")
            batch += 1
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        target.stats["seconds"] = round(time.monotonic() - t0, 1)
