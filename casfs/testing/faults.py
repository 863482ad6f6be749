"""Faults survived, as plain scenario functions: real mounts over a store that fails, a
store that lies, processes killed at random points, a full cache disk, many mounts
sharing one cache.

Owns: the scenarios (`boot_under_faults`, `altered_blobs_scenario`,
`altered_pack_scenario`, `kill_index_at_random_points`, `kill_daemon_during_boot`,
`disk_full_scenario`, `many_mounts_scenario`), the fault profiles they run under, and
the machinery they share: source images with their truth on disk, reads through mounts
checked byte for byte against it (`check_reads`), and consistency checks of a store
(`store_problems`) and a cache (`cache_problems`). tests/test_faults.py runs them at
small counts, benchmarks/faults.py at larger ones (docs/reliability.md).

Each scenario takes its counts as arguments, raises AssertionError on a violation
(a wrong byte above all) and returns its figures; one that cannot run here (no tmpfs)
raises `Unavailable`. The S3 store is SeaweedFS behind casfs.testing.proxy.LatencyProxy,
which answers a fraction of requests with 500/503, resets a fraction of connections and
delays some. Every byte read through a mount is compared with the source data the image
was built from, by a reader in a child process bounded by a timeout: a hung mount is
aborted through fusectl and the scenario fails.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from casfs.cache import _ENTRY, _TOTAL_KEY, ChunkCache
from casfs.errors import CasfsError
from casfs.manifest import Manifest
from casfs.store import Store, open_store
from casfs.store.content import MAX_MANIFEST_SIZE, blob_key, compress, decompress, verify_blob
from casfs.testing import ocibuild as ob
from casfs.testing.mounting import (
    CASFS,
    Mount,
    abort_fuse,
    cli,
    force_cleanup,
    is_mounted,
    mounted,
    start_mount,
    unmount_checked,
    wait_gone,
    wait_stats,
)
from casfs.testing.proxy import LatencyProxy
from casfs.testing.seaweed import SeaweedServer, s3_env


class Unavailable(Exception):  # noqa: N818 - "skip this", not an error of casfs
    """The scenario cannot run on this machine (the message says why): a test skips."""


def read_errno(call: Callable[[], object]) -> int | None:
    """The errno of the OSError a call raises (AssertionError if it raises none)."""
    try:
        call()
    except OSError as exc:
        return exc.errno
    raise AssertionError("expected an OSError, the call succeeded")


CHUNK = 256 * 1024
READ_TIMEOUT = 120.0


# == images and their source data ==============================================================

def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def text_bytes(n: int, seed: int) -> bytes:
    """Compressible bytes (words), so zstd and gzip have work to do."""
    r = random.Random(seed)
    words = [bytes(r.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(r.randint(2, 9)))
             for _ in range(400)]
    out = bytearray()
    while len(out) < n:
        out += r.choice(words) + b" "
    return bytes(out[:n])


@dataclass
class SourceImage:
    """An OCI layout written from known files, and those files on disk (the truth)."""

    layout: Path
    truth: Path
    files: dict[str, bytes]
    layers: int

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:t"

    def truth_path(self, rel: str) -> Path:
        return self.truth / rel


def write_image(root: Path, layers: list[dict[str, bytes]],
                compression: list[str] | None = None) -> SourceImage:
    """An image whose layers add these files (later layers may replace earlier files)."""
    specs = []
    final: dict[str, bytes] = {}
    for i, files in enumerate(layers):
        dirs = sorted({"/".join(p.split("/")[: k + 1]) for p in files
                       for k in range(p.count("/"))})
        members = [*map(ob.directory, dirs), *(ob.file(p, d) for p, d in sorted(files.items()))]
        comp = (compression or ["gzip"] * len(layers))[i]
        specs.append(ob.Layer.from_members(members, comp))  # type: ignore[arg-type]
        final.update(files)
    ob.write_oci_layout(root / "layout", specs, tag="t")
    truth = root / "truth"
    for rel, data in final.items():
        p = truth / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return SourceImage(root / "layout", truth, final, len(layers))


def boot_files(n_small: int = 300, n_big: int = 4, seed: int = 1) -> dict[str, bytes]:
    """A small image: many small files (one store request each) and a few multi-chunk
    ones; random (incompressible) and text content."""
    files = {}
    for i in range(n_small):
        size = 1500 + (i * 7919) % 14000
        data = rnd(size, seed * 100_000 + i) if i % 3 else text_bytes(size, seed * 100_000 + i)
        files[f"lib/pkg{i % 12:02}/mod{i:03}.py"] = data
    for i in range(n_big):
        files[f"lib/native/big{i}.so"] = rnd(CHUNK * 2 + 4096 * (i + 1), seed * 1000 + i)
    return files


# == reading through mounts, checked against the truth =========================================

_CHECKER = r"""
import json, os, random, sys, threading, time
spec = json.load(sys.stdin)
jobs = spec["jobs"]            # [path in a mount, path of the source file]
threads, rounds, seed = spec["threads"], spec["rounds"], spec["seed"]
mode, drop = spec["mode"], spec["drop"]
truth, tlock = {}, threading.Lock()
out = {"reads": 0, "bytes": 0, "wrong": [], "errors": [], "files_ok": 0}
olock = threading.Lock()

def source(p):
    with tlock:
        if p not in truth:
            with open(p, "rb") as f:
                truth[p] = f.read()
        return truth[p]

def one(path, src, rng):
    expected = source(src)
    try:
        if mode == "whole" or rng.random() < 0.5 or not expected:
            with open(path, "rb") as f:
                data = f.read()
            ok = data == expected
            what = f"{path}: whole read ({len(data)} of {len(expected)} bytes)"
        else:
            off = rng.randrange(0, len(expected))
            size = rng.randrange(1, 2 * 262144)
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), size, off)
            ok = data == expected[off:off + size]
            what = f"{path}: pread({size}, {off})"
        if drop:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
    except OSError as exc:
        with olock:
            out["errors"].append([path, exc.errno])
        return
    with olock:
        out["reads"] += 1
        out["bytes"] += len(data)
        if ok:
            out["files_ok"] += 1
        else:
            out["wrong"].append(what)

def worker(i):
    rng = random.Random(seed * 1000 + i)
    for _ in range(rounds):
        if spec["split"]:
            mine = jobs[i::threads]
        else:
            mine = jobs[:]
            rng.shuffle(mine)
        for path, src in mine:
            one(path, src, rng)

t0 = time.monotonic()
ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
out["seconds"] = time.monotonic() - t0
print(json.dumps(out))
"""


def check_reads(jobs: list[tuple[Path, Path]], mountpoints: list[Path], *, threads: int = 8,
                rounds: int = 1, seed: int = 0, mode: str = "whole", drop: bool = False,
                split: bool = True, timeout: float = READ_TIMEOUT) -> dict[str, Any]:
    """Read (mount path, source path) jobs from a child process with threads; every read
    is compared with the source bytes. ``split``: each file read once, the files shared
    out among the threads; else each thread reads every file, in its own order. A read
    that does not finish within ``timeout`` aborts the mounts and fails."""
    spec = {"jobs": [[str(a), str(b)] for a, b in jobs], "threads": threads, "rounds": rounds,
            "seed": seed, "mode": mode, "drop": drop, "split": split}
    child = subprocess.Popen([sys.executable, "-c", _CHECKER], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = child.communicate(json.dumps(spec), timeout=timeout)
    except subprocess.TimeoutExpired:
        for mp in mountpoints:
            abort_fuse(mp)
        child.kill()
        child.communicate(timeout=30)
        raise AssertionError(f"reads did not finish within {timeout}s (a hang or deadlock); "
                             "aborted the mounts") from None
    assert child.returncode == 0, stderr
    return json.loads(stdout)


def image_jobs(m: Mount, image: SourceImage, names: list[str] | None = None) -> list[tuple[Path, Path]]:
    return [(m.path(n), image.truth_path(n)) for n in (names or sorted(image.files))]


def assert_no_wrong_bytes(res: dict[str, Any], where: str) -> None:
    assert res["wrong"] == [], f"{where}: WRONG BYTES served: {res['wrong'][:10]}"


# == store and cache consistency ===============================================================

def store_problems(store: Store) -> tuple[list[str], dict[str, int]]:
    """Everything in a store that is partial or dangling: every blob decompresses and
    hashes to its name, every manifest verifies, every tag names an existing manifest,
    no layer record names a missing blob. Returns (problems, counts)."""
    backend = store.backend
    problems: list[str] = []
    keys = list(backend.list(""))
    blobs = set()
    counts = {"blobs": 0, "manifests": 0, "tags": 0, "layer_records": 0, "index_locks": 0,
              "other": 0}
    for key in keys:
        if key.startswith("blobs/"):
            counts["blobs"] += 1
            parts = key.split("/")
            digest = parts[-1]
            if len(parts) != 3 or parts[1] != digest[:2]:
                problems.append(f"misplaced blob key {key}")
                continue
            try:
                verify_blob(digest, backend.get(key))
                blobs.add(digest)
            except CasfsError as exc:
                problems.append(f"blob {key}: {exc}")
    for key in keys:
        if key.startswith("manifests/"):
            counts["manifests"] += 1
            digest = key.split("/", 1)[1]
            try:
                m = Manifest(store.get_manifest(digest), digest)
                m.validate()
                missing = set(m.chunk_digests()) - blobs
                if missing:
                    problems.append(f"manifest {digest} names {len(missing)} missing blobs")
            except CasfsError as exc:
                problems.append(f"manifest {key}: {exc}")
        elif key.startswith("tags/"):
            counts["tags"] += 1
            name = key.split("/", 1)[1]
            try:
                if not store.has_manifest(store.get_tag(name)):
                    problems.append(f"tag {name} names a missing manifest")
            except CasfsError as exc:
                problems.append(f"tag {name}: {exc}")
        elif key.startswith("layers/"):
            counts["layer_records"] += 1
            try:
                rec = json.loads(decompress(backend.get(key), MAX_MANIFEST_SIZE, key))
                named = {d for op in rec["ops"] if op["op"] == "add"
                         for d, _ in op.get("chunks") or []}
            except (CasfsError, ValueError, KeyError, TypeError) as exc:
                problems.append(f"layer record {key} unreadable: {exc}")
                continue
            if named - blobs:
                problems.append(f"layer record {key} names {len(named - blobs)} missing blobs")
        elif key.startswith("locks/index-"):
            counts["index_locks"] += 1
        elif not key.startswith(("blobs/", "casfs-store.json", "locks/")):
            counts["other"] += 1
    return problems, counts


def cache_problems(cache_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Every LMDB index entry's chunk file exists with the indexed size and hashes to its
    name; the running total equals the entries' sizes. Files no entry names (orphans a
    crash may leave) are counted, not problems: `casfs cache prune` removes them."""
    cache = ChunkCache(cache_dir, 1 << 40)
    problems: list[str] = []
    entries = total = indexed = 0
    try:
        with cache.env.begin() as txn:
            for key, raw in txn.cursor():
                if key == _TOTAL_KEY:
                    total = int.from_bytes(raw[:8], "little")
                    continue
                entries += 1
                size, _ = _ENTRY.unpack(raw)
                indexed += size
                digest = key.hex()
                path = cache.chunk_path(digest)
                try:
                    data = path.read_bytes()
                except OSError as exc:
                    problems.append(f"entry {digest}: file {exc.strerror}")
                    continue
                if len(data) != size:
                    problems.append(f"entry {digest}: file has {len(data)} bytes, indexed {size}")
                elif b3(data) != digest:
                    problems.append(f"entry {digest}: file does not hash to its name")
            names = {f.name for d in (cache_dir / "chunks").iterdir() for f in d.iterdir()}
            orphans = sum(1 for n in names if txn.get(bytes.fromhex(n)) is None)
    finally:
        cache.close()
    if total != indexed:
        problems.append(f"cache total {total} != sum of entries {indexed}")
    return problems, {"entries": entries, "bytes": indexed, "orphans": orphans}


def prune_cache(cache_dir: Path) -> str:
    out = cli("cache", "prune", "--cache-dir", str(cache_dir))
    assert out.returncode == 0, f"casfs cache prune failed ({out.returncode}): {out.stderr}"
    return out.stdout.strip()


# == the S3 store, with and without faults ====================================================

@contextlib.contextmanager
def s3_environment(server: SeaweedServer) -> Iterator[None]:
    """This process's AWS_* variables pointing at SeaweedFS directly (for in-process stores)."""
    saved = {k: os.environ.get(k) for k in s3_env(server)}
    os.environ.update(s3_env(server))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def proxy_env(server: SeaweedServer, proxy: LatencyProxy, **extra: str) -> dict[str, str]:
    """What a casfs subprocess needs to reach SeaweedFS through the proxy."""
    return {**s3_env(server, proxy.url), **extra}


def index_cli(image: SourceImage, store_url: str, *, tag: str | None = None,
              env: dict[str, str] | None = None, timeout: float = 180) -> str:
    args = ["index", image.ref, "--store", store_url, "-q"]
    if tag:
        args += ["--tag", tag]
    proc = cli(*args, env=env, timeout=timeout)
    assert proc.returncode == 0, f"casfs index failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout.strip().splitlines()[-1]


FAULT_PROFILES = {
    # 10%: 500s, 5% resets, 10% of requests slowed by 150 ms
    "10%": {"error_rate": 0.10, "error_status": 500, "reset_rate": 0.05, "delay_rate": 0.10,
            "extra_delay_ms": 150},
    # 30%: 503 SlowDown, 10% resets, 5% stalled for 1.5 s past a 1 s read timeout (so the
    # client times out and retries)
    "30%": {"error_rate": 0.30, "error_status": 503, "reset_rate": 0.10, "delay_rate": 0.05,
            "extra_delay_ms": 1500, "read_timeout": 1.0},
}


def fault_profile(rate: float) -> dict[str, Any]:
    """The benchmark's profiles: error_rate 500/503 alternating, resets a third of it."""
    return {"error_rate": rate, "error_status": 503 if rate >= 0.2 else 500,
            "reset_rate": round(rate / 3, 3), "delay_rate": min(0.1, rate),
            "extra_delay_ms": 200}


STALLS = {"error_rate": 0.0, "reset_rate": 0.0, "delay_rate": 0.05, "extra_delay_ms": 2500,
          "read_timeout": 1.0}
"""A store that stalls: 5% of requests held 2.5 s, past a 1 s read timeout."""


def profiles(rates: list[float]) -> list[tuple[str, dict[str, Any]]]:
    """The benchmark's table: a profile per error rate ("N%"), then "stalls"."""
    return [(f"{round(r * 100)}%", fault_profile(r)) for r in rates] + [("stalls", dict(STALLS))]


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, int]:
    keys = ("requests", "injected_errors", "injected_resets", "injected_delays")
    return {k: after[k] - before[k] for k in keys}


def boot_under_faults(seaweed: SeaweedServer, image: SourceImage, clean_ref: str, tmp: Path,
                      profile: dict[str, Any], *, boots: int = 2, seed: int = 0,
                      index: bool = True) -> dict[str, Any]:
    """Index through the faulty proxy (when ``index``), then boot ``boots`` times, each a
    fresh mount with an empty cache reading every file; the first boot records a trace,
    later ones replay it (ranged GETs of its pack). Asserts zero wrong bytes, every read
    served, no fetch or io error in any daemon, and faults actually injected.

    ``profile``: the proxy's fault knobs, plus ``read_timeout`` (CASFS_S3_READ_TIMEOUT for
    casfs, so that delays past it become timeouts and retries)."""
    bucket = seaweed.make_bucket()
    url = f"s3://{bucket}/casfs"
    out: dict[str, Any] = {"profile": profile, "boots": []}
    knobs = {k: v for k, v in profile.items() if k != "read_timeout"}
    with LatencyProxy("127.0.0.1", seaweed.s3_port, seed=seed, **knobs) as proxy:
        env = proxy_env(seaweed, proxy)
        if "read_timeout" in profile:
            env["CASFS_S3_READ_TIMEOUT"] = str(profile["read_timeout"])
        if index:
            t0 = time.monotonic()
            ref = index_cli(image, url, tag="img", env=env)
            out["index"] = {"seconds": round(time.monotonic() - t0, 2), **proxy.stats()}
            out["index"].pop("by_method")
            assert ref == clean_ref, f"index through faults gave {ref}, a clean index {clean_ref}"
            if profile.get("error_rate") or profile.get("reset_rate"):
                assert proxy.stats()["injected_errors"] + proxy.stats()["injected_resets"] > 0
        else:
            index_cli(image, url, tag="img", env=s3_env(seaweed))
        for boot in range(boots):
            before = proxy.stats()
            t0 = time.monotonic()
            # The boot's trace is saved at the unmount (a stalled read must not end the
            # boot early, as a short --trace-idle would).
            with mounted("img", tmp / f"mnt-{bucket}-{boot}", url, tmp / f"cache-{bucket}-{boot}",
                         "--trace-idle", "120", env=env) as m:
                t_mount = time.monotonic() - t0
                res = check_reads(image_jobs(m, image), [m.mountpoint], threads=4,
                                  seed=seed + boot)
                assert_no_wrong_bytes(res, f"boot {boot} under {profile}")
                assert res["errors"] == [], (f"boot {boot}: reads failed {res['errors'][:5]}\n"
                                             f"{m.log()[-3000:]}")
                assert res["files_ok"] == len(image.files)
                st = m.stats()
                if boot > 0:
                    assert st["prefetch"]["source"] == "manifest", st["prefetch"]
                mt = st["metrics"]
            seconds = time.monotonic() - t0
            log = m.log()
            assert "saved boot trace" in log, log[-3000:]
            warnings = [ln for ln in log.splitlines() if " WARNING " in ln]
            d = _delta(proxy.stats(), before)
            assert mt["fetch_errors"] == 0 and mt["io_errors"] == 0, (
                f"boot {boot}: retries did not absorb the faults: {mt}")
            out["boots"].append({"seconds": round(seconds, 2), "mount_seconds": round(t_mount, 2),
                                 "read_seconds": round(res["seconds"], 2),
                                 "files": len(image.files),
                                 "bytes_read": res["bytes"], "wrong_bytes": 0,
                                 "fetch_errors": mt["fetch_errors"], "io_errors": mt["io_errors"],
                                 "fetches": mt["fetches"], "prefetch_requests": mt["prefetch_requests"],
                                 "prefetch_chunks": mt["prefetch_chunks"],
                                 "prefetch": {k: st["prefetch"].get(k) for k in
                                              ("source", "planned_chunks", "done_chunks", "groups")},
                                 "warnings": len(warnings), **d})
            if warnings:
                out.setdefault("warning_lines", []).extend(warnings[:5])
        total = proxy.stats()
    out["requests"] = total["requests"]
    out["injected"] = {k: total[k] for k in ("injected_errors", "injected_resets",
                                             "injected_delays")}
    boots_injected = sum(b["injected_errors"] + b["injected_resets"] for b in out["boots"])
    if profile.get("error_rate", 0) or profile.get("reset_rate", 0):
        assert boots_injected > 0, f"no fault was injected during the boots: {out}"
    if profile.get("delay_rate", 0):
        assert total["injected_delays"] > 0
    return out


# == a store that lies =========================================================================

ALTERATIONS = ("other bytes", "truncated", "other size", "garbage")


def altered_frame(kind: str, stored: bytes, length: int, seed: int) -> bytes:
    """What a lying store returns instead of a blob's stored bytes."""
    if kind == "other bytes":  # a valid zstd frame of other bytes of the same length
        return compress(rnd(length, seed))
    if kind == "truncated":
        return stored[: len(stored) // 2]
    if kind == "other size":  # a valid frame, one byte longer
        return compress(rnd(length + 1, seed))
    return rnd(len(stored), seed)


def bucket_key(store_url: str, key: str) -> tuple[str, str]:
    bucket, _, prefix = store_url[len("s3://"):].partition("/")
    return bucket, f"{prefix}/{key}" if prefix else key


def altered_blobs_scenario(seaweed: SeaweedServer, store_url: str, tmp: Path, *, n_files: int,
                           n_altered: int, seed: int) -> dict[str, Any]:
    """Overwrite one chunk's blob of ``n_altered`` files in the store (cycling through
    ALTERATIONS); a cold mount reads every file: each altered file fails with EIO and a
    log line names its blob, every other file reads right, the altered chunk is never
    cached, and the chunks before it in the same file still read."""
    rng = random.Random(seed)
    files = {f"app/f{i:03}.bin": rnd(CHUNK * rng.randint(1, 3) + rng.randint(1, 9999),
                                     seed * 10_000 + i) for i in range(n_files)}
    image = write_image(tmp / f"img-{seed}", [files])
    index_cli(image, store_url, tag="img", env=s3_env(seaweed))
    client = seaweed.client()
    victims: dict[str, tuple[str, int, str]] = {}  # path -> (digest, chunk index, kind)
    for n, path in enumerate(rng.sample(sorted(files), n_altered)):
        data = files[path]
        index = rng.randrange(0, (len(data) + CHUNK - 1) // CHUNK)
        chunk = data[index * CHUNK:(index + 1) * CHUNK]
        digest, kind = b3(chunk), ALTERATIONS[n % len(ALTERATIONS)]
        bucket, key = bucket_key(store_url, blob_key(digest))
        stored = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        client.put_object(Bucket=bucket, Key=key,
                          Body=altered_frame(kind, stored, len(chunk), seed * 1000 + n))
        victims[path] = (digest, index, kind)
    cache = tmp / f"cache-{seed}"
    with mounted("img", tmp / f"mnt-{seed}", store_url, cache) as m:
        res = check_reads(image_jobs(m, image), [m.mountpoint], threads=4, seed=seed)
        assert_no_wrong_bytes(res, "altered blobs")
        assert sorted(res["errors"]) == sorted([str(m.path(p)), errno.EIO] for p in victims), \
            res["errors"]
        assert res["files_ok"] == n_files - n_altered
        for path, (_digest, index, _kind) in victims.items():
            # the chunks before the altered one still read; the altered one never does
            with open(m.path(path), "rb") as f:
                assert f.read(index * CHUNK) == files[path][:index * CHUNK]
                assert read_errno(lambda: f.read(10)) == errno.EIO
        log = m.log().splitlines()
        unnamed = [d for d, _, _ in victims.values()
                   if not any(d in ln and "ERROR" in ln for ln in log)]
        assert unnamed == [], f"no ERROR line names the altered blobs {unnamed}"
        mt = m.stats()["metrics"]
        assert mt["io_errors"] >= n_altered and mt["fetch_errors"] >= n_altered
    for digest, _, _ in victims.values():
        assert not (cache / "chunks" / digest[:2] / digest).exists(), "an altered chunk was cached"
    kinds: dict[str, int] = {}
    for _, _, kind in victims.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"files": n_files, "altered": n_altered, "kinds": kinds, "eio": len(res["errors"]),
            "files_right": res["files_ok"], "wrong_bytes": 0, "reads": res["reads"]}


def _alter_frames(pack: bytes, offsets: list[tuple[int, int]]) -> bytes:
    """Flip a byte in the middle of each frame. Incompressible chunks are stored as raw
    zstd blocks (and frames carry no checksum): each stays a valid frame of other bytes."""
    out = bytearray(pack)
    for off, length in offsets:
        out[off + length // 2] ^= 0x5A
    return bytes(out)


def altered_pack_scenario(seaweed: SeaweedServer, store_url: str, tmp: Path, *, n_files: int,
                          n_altered: int, seed: int) -> dict[str, Any]:
    """A boot records a trace and its pack; every frame of the pack is then altered in the
    store (each a valid zstd frame of other bytes). A cold boot replaying the trace: the
    prefetch rejects every chunk, reads fetch the blobs and get right bytes. Then the
    blobs of ``n_altered`` files are altered too: those fail with EIO, the rest read right."""
    from prefetch.trace import MAX_TRACE_BYTES, Trace

    files = {f"app/m{i:03}.bin": rnd(40_000 + 1000 * i, seed * 1000 + i) for i in range(n_files)}
    files["app/big.bin"] = rnd(CHUNK * 3, seed * 1000 + 999)
    image = write_image(tmp / f"pimg-{seed}", [files])
    ref = index_cli(image, store_url, tag="img", env=s3_env(seaweed))
    digest = ref.split(":", 1)[1]
    with mounted("img", tmp / f"pmnt1-{seed}", store_url, tmp / f"pcache1-{seed}",
                 "--trace-idle", "0.5") as m:
        res = check_reads(image_jobs(m, image), [m.mountpoint], threads=1)
        assert_no_wrong_bytes(res, "recording boot")
        wait_stats(m, lambda s: s["prefetch"]["trace_saved"], "the trace")
    store = open_store(store_url)
    (trace_id,) = store.list_traces(digest)
    trace = Trace.parse(store.get_trace(digest, trace_id, MAX_TRACE_BYTES), trace_id)
    assert trace.pack is not None
    frames = sorted({(c.pack_offset, c.pack_length) for c in trace.chunks})
    client = seaweed.client()
    bucket, key = bucket_key(store_url, f"packs/{trace.pack}")
    pack = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    client.put_object(Bucket=bucket, Key=key, Body=_alter_frames(pack, frames))
    out: dict[str, Any] = {"pack_frames_altered": len(frames)}

    # Pack altered, blobs intact: every file reads right.
    with mounted("img", tmp / f"pmnt2-{seed}", store_url, tmp / f"pcache2-{seed}",
                 "--no-trace") as m:
        st = wait_stats(m, lambda s: s["prefetch"]["state"] in ("done", "failed"), "prefetch")
        assert st["prefetch"]["source"] == "manifest" and st["prefetch"]["planned_chunks"] > 0
        res = check_reads(image_jobs(m, image), [m.mountpoint], threads=4)
        assert_no_wrong_bytes(res, "altered pack")
        assert res["errors"] == [], res["errors"]
        rejected = sum(1 for ln in m.log().splitlines() if "rejected" in ln)
        assert rejected > 0, m.log()[-2000:]
        st = m.stats()
        assert st["metrics"]["io_errors"] == 0
        out.update(pack_chunks_rejected=rejected, files_right=res["files_ok"],
                   prefetch_chunks=st["metrics"]["prefetch_chunks"])

    # Pack and blobs altered: those files fail with EIO, the rest read right.
    victims = {}
    for n, path in enumerate(sorted(files)[1:1 + n_altered]):
        vdigest = b3(files[path][:CHUNK])
        bucket, key = bucket_key(store_url, blob_key(vdigest))
        client.put_object(Bucket=bucket, Key=key, Body=compress(rnd(len(files[path]), n)))
        victims[path] = vdigest
    with mounted("img", tmp / f"pmnt3-{seed}", store_url, tmp / f"pcache3-{seed}",
                 "--no-trace") as m:
        wait_stats(m, lambda s: s["prefetch"]["state"] in ("done", "failed"), "prefetch")
        res = check_reads(image_jobs(m, image), [m.mountpoint], threads=4)
        assert_no_wrong_bytes(res, "altered pack and blobs")
        assert sorted(res["errors"]) == sorted([str(m.path(p)), errno.EIO] for p in victims)
        log = m.log().splitlines()
        for vdigest in victims.values():
            assert any(vdigest in ln and "ERROR" in ln for ln in log), vdigest
    out.update(blobs_altered=len(victims), eio=len(res["errors"]), wrong_bytes=0)
    return out


# == kill -9 =====================================================================================

class _StoreCounter:
    """How many objects a store holds under a prefix, listed cheaply and often."""

    def __init__(self, store_url: str, open_kw: dict[str, Any] | None) -> None:
        self.url, self.open_kw = store_url, open_kw or {}
        self.store: Store | None = None

    def __call__(self, prefix: str = "blobs/") -> int:
        try:
            if self.store is None:
                self.store = open_store(self.url, **self.open_kw)
            return sum(1 for _ in self.store.backend.list(prefix))
        except CasfsError:
            return 0  # not created yet

    def published(self) -> tuple[int, int, int]:
        """Layer records, manifests, tags: what an index writes after its blobs."""
        return self("layers/"), self("manifests/"), self("tags/")


KILL_KINDS = ("upload", "late", "upload", "early", "upload", "early")


def kill_index_at_random_points(image: SourceImage, store_url: str, clean_ref: str, *,
                                kills: int, seed: int, clean_seconds: float, total_blobs: int,
                                env: dict[str, str] | None = None,
                                open_kw: dict[str, Any] | None = None) -> dict[str, Any]:
    """`casfs index` killed with SIGKILL at seeded random points, over and over on the
    same store; after each kill the store must hold nothing partial or dangling, and a
    final re-run completes with the clean manifest digest. Returns the figures.

    Kill points cycle through KILL_KINDS: "upload" (once a random share of the blobs still
    missing has landed), "late" (as soon as a layer record, the manifest or the tag
    appears: between the writes that publish an image), "early" (a random delay up to
    ``clean_seconds`` after the start: start-up, hashing, the lock; in a re-run that
    finds every blob stored, also its records, manifest and tag). Once every blob is
    stored, "upload" points become "early" ones, and "late" ones too once the image is
    published."""
    rng = random.Random(seed)
    full_env = dict(os.environ)
    full_env.pop("CASFS_STORE", None)
    full_env.update(env or {})
    out: dict[str, Any] = {"kills": [], "completed_before_kill": 0}
    count = _StoreCounter(store_url, open_kw)
    for i in range(kills):
        have = count()
        before = count.published()
        kind = KILL_KINDS[i % len(KILL_KINDS)]
        if kind == "upload" and have >= total_blobs or kind == "late" and before[1] > 0:
            kind = "early"
        target = have + max(1, int(rng.uniform(0.05, 0.8) * (total_blobs - have)))
        delay = clean_seconds * rng.uniform(0.1, 1.0)
        proc = subprocess.Popen([*CASFS, "index", image.ref, "--store", store_url, "--tag",
                                 "img", "-q"], env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        t0 = time.monotonic()
        if kind == "early":
            time.sleep(delay)
        while kind != "early" and proc.poll() is None and time.monotonic() - t0 < 120:
            if kind == "upload" and count() >= target:
                break
            if kind == "late" and count.published() != before:
                break
            time.sleep(0.002)
        at = time.monotonic() - t0
        killed = proc.poll() is None
        if killed:
            proc.kill()
        _, stderr = proc.communicate(timeout=60)
        if not killed:
            out["completed_before_kill"] += 1
            assert proc.returncode == 0, stderr.decode()[-2000:]
        store = open_store(store_url, **(open_kw or {}))
        problems, counts = store_problems(store)
        point = {"upload": f"upload: after {target - have} of {total_blobs - have} missing blobs",
                 "late": "late: as the first record, manifest or tag appeared",
                 "early": f"early: after {delay:.2f}s"}[kind]
        assert problems == [], f"kill {i} {point}: {problems[:10]}"
        out["kills"].append({"point": point, "seconds": round(at, 3), "killed": killed,
                             **counts})
    # Killed indexes leave their locks (fresh for 15 minutes). Index only refuses on gc
    # locks, so a re-run goes ahead.
    store = open_store(store_url, **(open_kw or {}))
    out["stale_index_locks"] = sum(1 for _ in store.backend.list("locks/index-"))
    t0 = time.monotonic()
    rerun = cli("index", image.ref, "--store", store_url, "--tag", "img", "-q", env=env,
                timeout=300)
    assert rerun.returncode == 0, f"re-run after kills failed: {rerun.stderr[-2000:]}"
    ref = rerun.stdout.strip().splitlines()[-1]
    out["rerun_seconds"] = round(time.monotonic() - t0, 2)
    assert ref == clean_ref, f"re-run gave {ref}, a clean index {clean_ref}"
    problems, counts = store_problems(open_store(store_url, **(open_kw or {})))
    assert problems == [], problems[:10]
    out["final"] = counts
    # ...while gc refuses to sweep until those locks go stale (15 minutes).
    gc = cli("gc", "--dry-run", "--store", store_url, env=env)
    out["gc_with_stale_locks"] = {"exit": gc.returncode, "stderr": gc.stderr.strip()}
    if out["stale_index_locks"]:
        assert gc.returncode == 9 and "busy" in gc.stderr, gc.stderr
    return out


def kill_daemon_during_boot(image: SourceImage, store_url: str, tmp: Path, *,
                            kill_after_chunks: int, env: dict[str, str] | None = None,
                            seed: int = 0, require_inflight: bool = True) -> dict[str, Any]:
    """SIGKILL the daemon while a boot's reads are in flight; then the next `casfs mount`
    on the path works, serves every byte right, and the cache is consistent."""
    mnt, cache = tmp / f"kmnt-{seed}", tmp / f"kcache-{seed}"
    m = start_mount("img", mnt, store_url, cache, env=env)
    out: dict[str, Any] = {}
    try:
        spec = {"jobs": [[str(a), str(b)] for a, b in image_jobs(m, image)], "threads": 8,
                "rounds": 1, "seed": seed, "mode": "whole", "drop": False, "split": True}
        reader = subprocess.Popen([sys.executable, "-c", _CHECKER], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert reader.stdin is not None
        reader.stdin.write(json.dumps(spec))
        reader.stdin.close()
        reader.stdin = None  # written: communicate() only collects the output
        chunks = cache / "chunks"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            n = sum(1 for d in list(chunks.iterdir()) for _ in d.iterdir())
            if n >= kill_after_chunks:
                break
            time.sleep(0.002)
        os.kill(m.pid, signal.SIGKILL)
        assert wait_gone(m.pid, 10)
        stdout, _ = reader.communicate(timeout=60)
        first = json.loads(stdout)
        assert_no_wrong_bytes(first, "reads while the daemon was killed")
        out["reads_before_kill"] = first["files_ok"]
        out["reads_failed_by_kill"] = len(first["errors"])
        out["killed_mid_boot"] = bool(first["errors"])
        if require_inflight:
            assert first["errors"], "the daemon was killed after the boot had finished"
        assert read_errno(lambda: os.statvfs(mnt)) in (errno.ENOTCONN, errno.ECONNABORTED)
        problems, counts = cache_problems(cache)
        assert problems == [], f"cache after kill -9: {problems[:10]}"
        out["cache_after_kill"] = counts

        m2 = start_mount("img", mnt, store_url, cache, env=env)
        try:
            with open("/proc/self/mountinfo") as f:
                assert sum(1 for line in f if line.split()[4] == str(mnt)) == 1
            res = check_reads(image_jobs(m2, image), [mnt], threads=8, seed=seed)
            assert_no_wrong_bytes(res, "the mount after kill -9")
            assert res["errors"] == [], res["errors"][:5]
            st = m2.stats()
            assert st["metrics"]["io_errors"] == 0
            out["remount"] = {"files_ok": res["files_ok"],
                              "corrupt_dropped": st["cache"]["corrupt_dropped"]}
        except BaseException:
            force_cleanup(mnt, m2.pid)
            raise
        unmount_checked(m2)
    finally:
        force_cleanup(mnt, m.pid)
    problems, counts = cache_problems(cache)
    assert problems == [], f"cache after the remount: {problems[:10]}"
    out["prune"] = prune_cache(cache)
    assert cache_problems(cache)[1]["orphans"] == 0
    out["cache_final"] = counts
    return out


def build_kill_image(root: Path, scale: float = 1.0) -> tuple[SourceImage, str, float, int]:
    """~32 MB (times ``scale``) in two layers (gzip, zstd), random and text files; the
    manifest reference of a clean index of it into a file store, how long that took and
    how many blobs it holds."""
    n = max(1, round(80 * scale))
    layer1 = {f"usr/lib/a{i:03}.so": rnd(150_000 + 997 * i, 5000 + i) for i in range(n)}
    layer1.update({f"usr/share/t{i:03}.txt": text_bytes(40_000, 6000 + i) for i in range(n)})
    layer2 = {f"opt/app/b{i:02}.bin": rnd(CHUNK * 3 + 333 * i, 7000 + i)
              for i in range(max(1, round(14 * scale)))}
    layer2.update({f"opt/app/doc{i:02}.md": text_bytes(60_000, 8000 + i)
                   for i in range(max(1, round(50 * scale)))})
    image = write_image(root, [layer1, layer2], ["gzip", "zstd"])
    t0 = time.monotonic()
    ref = index_cli(image, f"file://{root / 'clean'}")
    seconds = time.monotonic() - t0
    return image, ref, seconds, _StoreCounter(f"file://{root / 'clean'}", None)()


def assert_kills_landed(out: dict[str, Any]) -> None:
    """Not vacuous: most kills hit a running index, some of them mid-upload."""
    killed = [k for k in out["kills"] if k["killed"]]
    assert len(killed) >= len(out["kills"]) // 2, out
    assert any(k["point"].startswith("upload") for k in killed), json.dumps(out["kills"])


# == the cache's disk full, many mounts =========================================================

@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"cannot mount a tmpfs: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        for _ in range(3):
            if not is_mounted(path):
                break
            subprocess.run(["umount", str(path)], capture_output=True)
            if is_mounted(path):
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(path: Path) -> None:
    """Write filler files until the file system is full."""
    for i in range(1000):
        try:
            with open(path / f"filler-{i}", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            if (path / f"filler-{i}").stat().st_size == 0:
                return


def disk_full_scenario(tmp: Path, *, n_big: int = 30, rounds: int = 2,
                       seed: int = 0) -> dict[str, Any]:
    """A 2 MiB tmpfs as the cache: the mount starts, fills the disk, and every byte of a
    ~10 MB image is still served right (uncached), with a warning and no I/O error. Then
    the disk is filled to the last byte: a mount whose manifest the cache holds starts
    and serves; a new cache directory on it is refused with one clear line (or works)."""
    files = {f"data/f{i:02}.bin": rnd(CHUNK + 7000 * i, seed * 1000 + 900 + i)
             for i in range(n_big)}
    files.update({f"data/s{i:02}.txt": text_bytes(20_000, seed * 1000 + 950 + i)
                  for i in range(20)})
    image = write_image(tmp / f"dimg-{seed}", [files])
    size = sum(map(len, image.files.values()))
    assert size > 9 << 20, size
    url = f"file://{tmp / f'dstore-{seed}'}"
    index_cli(image, url, tag="img")
    mnt = tmp / f"dmnt-{seed}"
    out: dict[str, Any] = {"image_bytes": size, "cache_disk": "2 MiB tmpfs"}
    with small_tmpfs(tmp / f"tmpfs-{seed}", "2m") as disk:
        cache = disk / "cache"
        with mounted("img", mnt, url, cache) as m:
            res = check_reads(image_jobs(m, image), [m.mountpoint], threads=4, rounds=rounds,
                              mode="mixed", drop=True, split=False, seed=seed)
            assert_no_wrong_bytes(res, "cache disk full")
            assert res["errors"] == [], res["errors"][:5]
            st = m.stats()
            assert st["metrics"]["io_errors"] == 0
            assert st["cache"]["insert_failures"] > 0, st["cache"]
            warnings = m.log().count("cache disk full")
            assert warnings > 0, m.log()[-2000:]
        problems, counts = cache_problems(cache)
        assert problems == [], problems[:10]
        prune_cache(cache)
        assert cache_problems(cache)[1]["orphans"] == 0
        out["filling"] = {"reads": res["reads"], "bytes_read": res["bytes"],
                          "insert_failures": st["cache"]["insert_failures"],
                          "inserts": st["cache"]["inserts"], "warnings": warnings,
                          "cache_after": counts}

        # Full to the last byte: a mount of an image whose manifest is cached starts and
        # serves every byte (uncached).
        fill_disk(disk)
        with mounted("img", mnt, url, cache) as m:
            res = check_reads(image_jobs(m, image), [m.mountpoint], threads=4)
            assert_no_wrong_bytes(res, "disk full before the mount")
            assert res["errors"] == [], res["errors"][:5]
            assert m.stats()["metrics"]["io_errors"] == 0
        out["full_before_mount"] = {"reads": res["reads"], "bytes_read": res["bytes"]}

        # A new cache directory there: it cannot be made (one clear line, exit status 8),
        # or, if it can, the mount serves right.
        fill_disk(disk)
        proc = cli("mount", "img", str(mnt), "--store", url, "--cache-dir", str(disk / "new"))
        if proc.returncode == 0:
            pid = int(proc.stdout.split("daemon pid ")[1].split(",")[0])
            try:
                res = check_reads(image_jobs(Mount(mnt, "img", url, disk / "new", pid,
                                                   Path("/dev/null")), image), [mnt])
                assert_no_wrong_bytes(res, "a new cache on a full disk")
                assert res["errors"] == []
            finally:
                force_cleanup(mnt, pid)
            out["new_cache_on_full_disk"] = "mounted and served"
        else:
            assert proc.returncode == 8, proc.stderr
            assert proc.stderr.count("\n") == 1 and "No space left" in proc.stderr, proc.stderr
            assert not is_mounted(mnt)
            out["new_cache_on_full_disk"] = proc.stderr.strip()
    return out


def many_mounts_scenario(tmp: Path, *, mounts: int = 8, n_images: int = 3,
                         threads: int = 24, rounds: int = 1, seed: int = 0) -> dict[str, Any]:
    """``mounts`` mounts of ``n_images`` images (sharing files) over one cache capped
    below their data, ``threads`` reader threads across them with random whole and
    ranged reads, page cache dropped: every byte right, nothing hangs, the cache index
    consistent afterwards."""
    common = {f"common/c{i:02}.bin": rnd(CHUNK + 5000 * i, seed * 10_000 + 400 + i)
              for i in range(10)}
    images = []
    for k in range(n_images):
        own = {f"own/{k}/o{i:02}.bin": rnd(60_000 + 30_000 * i, seed * 10_000 + 500 + 50 * k + i)
               for i in range(10)}
        own[f"own/{k}/big.bin"] = rnd(CHUNK * 4 + k, seed * 10_000 + 600 + k)
        images.append(write_image(tmp / f"mimg{seed}-{k}", [{**common, **own}]))
    url = f"file://{tmp / f'mstore-{seed}'}"
    refs = [index_cli(img, url, tag=f"img{k}") for k, img in enumerate(images)]
    assert len(set(refs)) == n_images
    unique = {b3(d[i:i + CHUNK]): len(d[i:i + CHUNK])
              for img in images for d in img.files.values() for i in range(0, len(d), CHUNK)}
    cap = sum(unique.values()) // 2
    cache = tmp / f"mcache-{seed}"
    with contextlib.ExitStack() as stack:
        ms = [stack.enter_context(mounted(f"img{j % n_images}", tmp / f"mmnt{seed}-{j}", url,
                                          cache, "--cache-size", str(cap)))
              for j in range(mounts)]
        jobs = [job for j, m in enumerate(ms) for job in image_jobs(m, images[j % n_images])]
        res = check_reads(jobs, [m.mountpoint for m in ms], threads=threads, rounds=rounds,
                          mode="mixed", drop=True, split=False, timeout=150 * rounds,
                          seed=seed)
        assert_no_wrong_bytes(res, f"{mounts} mounts, one cache")
        assert res["errors"] == [], res["errors"][:5]
        stats = [m.stats() for m in ms]
        assert all(s["metrics"]["io_errors"] == 0 for s in stats)
        evictions = sum(s["cache"]["evictions"] for s in stats)
    assert evictions > 0
    problems, counts = cache_problems(cache)
    assert problems == [], problems[:10]
    assert counts["bytes"] <= cap
    prune_cache(cache)
    return {"mounts": mounts, "images": n_images, "threads": threads, "reads": res["reads"],
            "bytes_read": res["bytes"], "seconds": round(res["seconds"], 2),
            "evictions": evictions, "cache_cap": cap, "cache_after": counts, "wrong_bytes": 0}
