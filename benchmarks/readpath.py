"""The read path: big sequential reads, tree walks, mount start-up and daemon memory, all
against the same SeaweedFS behind the latency proxy, with local disk beside each figure.

    python -m benchmarks.readpath [--quick] [--modes kernel,fuse] [--size-gb 2]
                                  [--entries 100000] [--latency-ms 20]

In one run (every casfs figure once per serving mode, `--modes kernel,fuse` by default,
each mode on cache dirs of its own; local disk and the store measured once):
- sequential read (1 MiB read() calls) of one incompressible multi-GB file: from local
  disk with the page cache dropped; through casfs cold (empty cache dir, fresh mount, page
  cache dropped; capped by --cold-timeout), warm (cache dir kept, fresh mount, page cache
  dropped) and hot (same mount, page cache warm);
- the store's own throughput for comparison: parallel ranged GETs (8 MiB ranges, 16 and
  32 threads, boto3) of the same bytes stored as one object, and parallel GETs of the very
  chunk objects casfs stored for the file; both through the same proxy;
- os.walk + lstat of a ~100,000-entry tree: local disk cold/warm, mounted first walk
  (fresh mount, page cache dropped) and second walk (same mount);
- mount ready: from starting `casfs mount` to the first successful stat inside the 100k
  image with the manifest already in the cache dir: FUSE mode without the node agent (page
  cache warm, and dropped) and with it; kernel mode with the image's EROFS on the node and
  the node view service starting (page cache warm, and dropped), the first mount that
  builds the EROFS, and a second mount while another of the same cache dir is up (the
  service running);
- daemon RSS (VmRSS of the pid `casfs mount` prints: the FUSE daemon, or the node view
  service) after each step, and its CPU seconds (utime + stime) over each warm/hot read.
Writes ``<out>/<date>-readpath[-quick].{json,md}``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    INCIDENTS,
    MODES,
    RESULTS,
    WORK,
    PageCache,
    Services,
    add_product_args,
    casfs_help,
    casfs_index,
    casfs_mount,
    casfs_mount_start,
    casfs_umount,
    cleanup_mounts_under,
    cleanup_stale_runs,
    cpu_seconds,
    exit_on_sigterm,
    fresh_dir,
    log,
    machine_info,
    mode_flags,
    mode_support,
    now_iso,
    parse_modes,
    run_casfs,
    s3_client,
    select_product,
    services,
    stat_counters,
    stop_started_daemons,
    summarize,
    today,
    wait_for_quiet,
)
from benchmarks.images import (
    BIGFILE_PATH,
    TAG,
    build_bigfile_image,
    build_tree_image,
    native_root,
)
from benchmarks.report import fmt_bytes, publish, unique_stem

RAW_BUCKET = "raw-objects"
READ_SIZE = 1 << 20
RANGE_SIZE = 8 << 20


# -- measurements -----------------------------------------------------------------------


def sequential_read(path: Path, timeout: float | None = None) -> dict[str, Any]:
    """Read ``path`` front to back in 1 MiB read() calls; stop early after ``timeout``."""
    buf = bytearray(READ_SIZE)
    view = memoryview(buf)
    total = 0
    partial = False
    fd = os.open(path, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        while True:
            n = os.readv(fd, [view])
            if n == 0:
                break
            total += n
            if timeout is not None and time.perf_counter() - t0 > timeout:
                partial = True
                break
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "bytes": total, "bytes_per_s": total / seconds,
            "partial": partial}


def _drain(body: Any) -> int:
    n = 0
    while chunk := body.read(1 << 20):
        n += len(chunk)
    return n


def ranged_get(client: Any, bucket: str, key: str, size: int, threads: int) -> dict[str, Any]:
    ranges = [(o, min(o + RANGE_SIZE, size) - 1) for o in range(0, size, RANGE_SIZE)]

    def one(r: tuple[int, int]) -> int:
        return _drain(client.get_object(Bucket=bucket, Key=key, Range=f"bytes={r[0]}-{r[1]}")["Body"])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, ranges))
    seconds = time.perf_counter() - t0
    return {"threads": threads, "range_bytes": RANGE_SIZE, "requests": len(ranges),
            "seconds": seconds, "bytes": total, "bytes_per_s": total / seconds}


def objects_get(client: Any, bucket: str, keys: list[str], threads: int) -> dict[str, Any]:
    def one(key: str) -> int:
        return _drain(client.get_object(Bucket=bucket, Key=key)["Body"])

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, keys))
    seconds = time.perf_counter() - t0
    return {"threads": threads, "requests": len(keys), "seconds": seconds, "bytes": total,
            "bytes_per_s": total / seconds}


def walk_lstat(root: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            n += 1
    return {"seconds": time.perf_counter() - t0, "entries": n}


class RssSampler:
    """Samples a pid's VmRSS every 50 ms in a thread; ``peak`` is the highest seen."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from benchmarks.common import rss_bytes

        while not self._stop.is_set():
            v = rss_bytes(self.pid) or 0
            self.peak = max(self.peak, v)
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        if self.pid:
            self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.pid:
            self._t.join()


def _time_cmd(argv: list[str], runs: int = 3) -> float:
    vals = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False)
        vals.append(time.perf_counter() - t0)
    return statistics.median(vals)


_SERVE_RE = re.compile(r"mounted \S+ at \S+ in ([\d.]+)s")
_LOG_RE = re.compile(r"log (\S+?)\)?$")


def _daemon_serve_seconds(output: str) -> float | None:
    """The daemon's own 'mounted ... in Xs' (from serve() start, after its imports)."""
    m = _LOG_RE.search(output.strip())
    if not m:
        return None
    try:
        text = Path(m.group(1)).read_text(errors="replace")
    except OSError:
        return None
    found = _SERVE_RE.findall(text)
    return float(found[-1]) if found else None


# -- the run ----------------------------------------------------------------------------


class ReadPath:
    def __init__(self, args: argparse.Namespace, svc: Services, run_dir: Path) -> None:
        self.args = args
        self.svc = svc
        self.run_dir = run_dir
        self.pc = PageCache()
        self.mnt = run_dir / "mnt"
        help_text = casfs_help("mount")
        self.flags = ["--no-trace"] if "--no-trace" in help_text else []
        self.has_mode_flag = "--mode" in help_text
        self.has_agent = "--no-agent" in help_text
        self.modes: list[str] = args.modes if self.has_mode_flag else ["fuse"]
        self.unsupported = {m: r for m, r in mode_support().items() if m in self.modes}
        self.rss: dict[str, dict[str, int | None]] = {m: {} for m in self.modes}
        self.errors: list[str] = []
        self.bucket = svc.seaweed.make_bucket("casfs-readpath")
        self.store = f"s3://{self.bucket}/casfs"

    def live_modes(self) -> list[str]:
        return [m for m in self.modes if not self.unsupported.get(m)]

    def mode_args(self, mode: str, extra: list[str] | None = None) -> list[str]:
        return [*self.flags, *(mode_flags(mode) if self.has_mode_flag else []), *(extra or [])]

    def mount(self, ref: str, cache: Path, mode: str) -> Any:
        return casfs_mount(ref, self.mnt, self.store, cache, self.svc.env_proxy,
                           self.mode_args(mode))

    def guarded(self, what: str, fn: Any, *a: Any) -> dict[str, Any]:
        """One mode's part; a failure is an error entry (and in the errors), not the end."""
        try:
            return fn(*a)
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the run goes on
            log(f"ERROR {what}: {exc}")
            self.errors.append(f"{what}: {exc}")
            return {"status": "error", "note": str(exc)[:300]}

    # -- the big file ---------------------------------------------------------------------

    def bigfile(self, meta: dict[str, Any], local_root: Path) -> dict[str, Any]:
        size = meta["file_bytes"]
        out: dict[str, Any] = {"file_bytes": size}
        log(f"indexing the {fmt_bytes(size)} file (directly into SeaweedFS)")
        idx = casfs_index(Path(meta["oci_dir"]), TAG, self.store, self.svc.env_direct)
        out["index_seconds"] = idx.seconds
        out["index_mb_per_s"] = meta["uncompressed_bytes"] / idx.seconds / 1e6
        local_file = local_root / BIGFILE_PATH
        direct = s3_client(self.svc.seaweed.endpoint_url)
        direct.create_bucket(Bucket=RAW_BUCKET)
        direct.upload_file(str(local_file), RAW_BUCKET, "weights.bin")

        log("local disk: sequential read, page cache dropped")
        runs = []
        for _ in range(self.args.runs):
            self.pc.drop()
            runs.append(sequential_read(local_file))
        out["local_cold"] = _agg(runs)
        out["local_hot"] = _agg([sequential_read(local_file) for _ in range(self.args.runs)])

        proxied = s3_client(self.svc.proxy.url, max_pool=64)
        proxied.head_object(Bucket=RAW_BUCKET, Key="weights.bin")
        out["ranged_get"] = []
        for threads in self.args.threads:
            self.svc.proxy.reset()
            r = ranged_get(proxied, RAW_BUCKET, "weights.bin", size, threads)
            log(f"store: ranged GET x{threads}: {r['bytes_per_s'] / 1e6:.0f} MB/s")
            out["ranged_get"].append(r)
        keys = self._chunk_keys(direct)
        r = objects_get(proxied, self.bucket, keys, max(self.args.threads))
        log(f"store: GET of the {len(keys)} chunk objects x{r['threads']}: "
            f"{r['bytes_per_s'] / 1e6:.0f} MB/s")
        out["chunk_get"] = r
        out["modes"] = {}
        for mode in self.modes:
            why = self.unsupported.get(mode)
            if why:
                out["modes"][mode] = {"status": "n/a", "note": why}
                continue
            self.quiet()
            out["modes"][mode] = self.guarded(f"bigfile, {mode} mode", self.bigfile_mode,
                                              idx.ref, mode)
        return out

    def bigfile_mode(self, ref: str, mode: str) -> dict[str, Any]:
        """Cold, warm and hot reads of the big file in one serving mode, on a cache dir of
        the mode's own."""
        out: dict[str, Any] = {"status": "ok"}
        path_in_mnt = self.mnt / BIGFILE_PATH
        cache = self.run_dir / f"cache-big-{mode}"
        fresh_dir(cache)
        log(f"{mode}: casfs cold read (cap {self.args.cold_timeout:.0f}s)")
        self.pc.drop()
        self.svc.proxy.reset()
        with self.mount(ref, cache, mode) as m, RssSampler(m.pid) as rs:
            r = sequential_read(path_in_mnt, self.args.cold_timeout)
            r.update(self._counters(m))
            r["rss_peak"] = rs.peak
        log(f"  {mode} cold: {r['bytes_per_s'] / 1e6:.0f} MB/s over {fmt_bytes(r['bytes'])}"
            + (" (stopped at the cap)" if r["partial"] else ""))
        out["casfs_cold"] = r
        if r["partial"]:
            log("  filling the rest of the cache (untimed) for the warm runs")
            with self.mount(ref, cache, mode):
                sequential_read(path_in_mnt)
        log(f"{mode}: casfs warm (cache on disk, page cache dropped, fresh mount) and hot")
        warm, hot = [], []
        for i in range(self.args.runs):
            self.pc.drop()
            self.svc.proxy.reset()
            with self.mount(ref, cache, mode) as m, RssSampler(m.pid) as rs:
                cpu0 = cpu_seconds(m.pid)
                w = sequential_read(path_in_mnt)
                w["daemon_cpu"] = _delta(cpu_seconds(m.pid), cpu0)
                w.update(self._counters(m))
                w["rss_peak"] = rs.peak
                warm.append(w)
                log(f"  {mode} warm run {i + 1}: {w['bytes_per_s'] / 1e6:.0f} MB/s, daemon CPU "
                    f"{w['daemon_cpu'] or 0:.2f}s")
                if i == self.args.runs - 1:
                    for _ in range(self.args.runs):
                        cpu0 = cpu_seconds(m.pid)
                        h = sequential_read(path_in_mnt)
                        h["daemon_cpu"] = _delta(cpu_seconds(m.pid), cpu0)
                        h["rss_after"] = m.rss()
                        hot.append(h)
        out["casfs_warm"] = _agg(warm)
        out["casfs_hot"] = _agg(hot)
        self.rss[mode]["bigfile read (peak)"] = max(
            [out["casfs_cold"]["rss_peak"]] + [w["rss_peak"] for w in warm])
        shutil.rmtree(cache, ignore_errors=True)
        return out

    def _chunk_keys(self, client: Any) -> list[str]:
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix="casfs/blobs/"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def _counters(self, m: Any) -> dict[str, Any]:
        pc = self.svc.proxy_counters()
        stats = m.stats()
        c = stat_counters(stats)
        out = {"requests": pc["requests"], "fetched_bytes": pc["body_bytes_down"],
               "daemon_reads": c["reads"], "daemon_read_bytes": c["read_bytes"],
               "daemon_fetches": c["fetches"], "rss_after": m.rss()}
        k = stats.get("kernel")
        if isinstance(k, dict):
            out.update({f"kernel_{key}": v for key, v in k.items() if isinstance(v, int)})
        return out

    def quiet(self) -> None:
        if self.args.quiet_wait > 0:
            wait_for_quiet(self.args.quiet_wait)

    # -- the 100k-entry tree ----------------------------------------------------------------

    def tree(self, meta: dict[str, Any], local_root: Path) -> dict[str, Any]:
        out: dict[str, Any] = {"entries_in_image": meta["entries"]}
        log(f"indexing the {meta['entries']:,}-entry tree")
        idx = casfs_index(Path(meta["oci_dir"]), TAG, self.store, self.svc.env_direct)
        local = local_root / "tree"
        cold, warm = [], []
        for _ in range(self.args.runs):
            self.pc.drop()
            cold.append(walk_lstat(local))
            warm.append(walk_lstat(local))
        out["local_cold"], out["local_warm"] = _agg(cold), _agg(warm)
        log(f"  local: cold {out['local_cold']['seconds']['median']:.2f}s, warm "
            f"{out['local_warm']['seconds']['median']:.2f}s, {cold[0]['entries']:,} entries")
        out["modes"] = {}
        for mode in self.modes:
            why = self.unsupported.get(mode)
            if why:
                out["modes"][mode] = {"status": "n/a", "note": why}
                continue
            self.quiet()
            out["modes"][mode] = self.guarded(f"tree, {mode} mode", self.tree_mode, idx.ref,
                                              mode)
        return out

    def tree_mode(self, ref: str, mode: str) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok"}
        cache = self.run_dir / f"cache-tree-{mode}"
        fresh_dir(cache)
        cold, warm, rss = [], [], []
        for _ in range(self.args.runs):
            self.pc.drop()
            with self.mount(ref, cache, mode) as m:
                cold.append(walk_lstat(self.mnt / "tree"))
                warm.append(walk_lstat(self.mnt / "tree"))
                rss.append(m.rss())
        out["casfs_first_walk"], out["casfs_second_walk"] = _agg(cold), _agg(warm)
        self.rss[mode]["100k tree mounted, after two walks"] = max(v or 0 for v in rss)
        log(f"  {mode}: first walk {out['casfs_first_walk']['seconds']['median']:.2f}s, second "
            f"{out['casfs_second_walk']['seconds']['median']:.2f}s")
        ready = out["mount_ready"] = {}
        if mode == "kernel":
            # The EROFS image is on the node (the walks' mounts built it); the node view
            # service is not running (it left with the last mount): each mount starts it.
            ready["warm"] = self.ready_row(ref, cache, mode, "warm", drop=False)
            ready["dropped"] = self.ready_row(ref, cache, mode, "dropped", drop=True)
            # The first mount of the image on the node: builds the EROFS, starts the service.
            ready["build"] = self.ready_row(ref, cache, mode, "build", drop=False,
                                            rebuild=True)
            # The EROFS on the node and the service running: another kernel-mode mount of
            # the same cache dir is up.
            ready["second"] = self.ready_row(ref, cache, mode, "second", drop=False,
                                             second=True)
        else:
            no_agent = ["--no-agent"] if self.has_agent else []
            ready["warm"] = self.ready_row(ref, cache, mode, "warm", drop=False,
                                           extra=no_agent)
            ready["dropped"] = self.ready_row(ref, cache, mode, "dropped", drop=True,
                                              extra=no_agent)
            if self.has_agent:  # this casfs has a node agent: the same, with one running
                run_casfs(["agent", "start", "--cache-dir", str(cache)], env=self.svc.env_proxy)
                try:
                    ready["agent"] = self.ready_row(ref, cache, mode, "agent", drop=False)
                finally:
                    run_casfs(["agent", "stop", "--cache-dir", str(cache)],
                              env=self.svc.env_proxy)
        shutil.rmtree(cache, ignore_errors=True)
        return out

    def ready_row(self, ref: str, cache: Path, mode: str, key: str,
                  **kw: Any) -> dict[str, Any]:
        """One mount-ready row (READY_ROWS[mode], ``key``); an error entry if it fails."""
        what = f"mount ready, {mode} mode, {_ready_what(mode, key)}"
        try:
            agg = self.mount_ready(ref, cache, mode, **kw)
        except Exception as exc:  # noqa: BLE001 - one row failing leaves the others
            log(f"ERROR {what}: {exc}")
            self.errors.append(f"{what}: {exc}")
            return {"status": "error", "note": str(exc)[:300]}
        log(f"  {what}: first stat after {agg['first_stat']['median'] * 1000:.0f} ms (mount "
            f"returned after {agg['returned']['median'] * 1000:.0f} ms)")
        return {"status": "ok", **agg}

    def mount_ready(self, ref: str, cache: Path, mode: str, drop: bool,
                    extra: list[str] | None = None, rebuild: bool = False,
                    second: bool = False) -> dict[str, Any]:
        """`casfs mount` start -> first successful stat, manifest already in ``cache``.
        ``rebuild``: the node's EROFS images removed first (kernel mode builds it again);
        ``second``: another mount of the same cache dir held up meanwhile (kernel mode:
        the node view service is running)."""
        target = self.mnt / "tree" / "d050" / "s05" / "link"
        args = self.mode_args(mode, extra)
        holder = None
        if second:
            holder = casfs_mount_start(ref, self.run_dir / "mnt-hold", self.store, cache,
                                       self.svc.env_proxy, args)
        runs = []
        try:
            for _ in range(self.args.ready_runs):
                if rebuild:
                    shutil.rmtree(cache / "erofs", ignore_errors=True)
                if drop:
                    self.pc.drop()
                self.svc.proxy.reset()
                t0 = time.perf_counter()
                m = casfs_mount_start(ref, self.mnt, self.store, cache, self.svc.env_proxy, args,
                                      timeout=self.args.ready_timeout)
                try:
                    t_ret = time.perf_counter() - t0
                    while True:
                        try:
                            os.lstat(target)
                            break
                        except OSError:
                            if time.perf_counter() - t0 > 60:
                                raise
                            time.sleep(0.001)
                    t_stat = time.perf_counter() - t0
                    runs.append({"returned": t_ret, "first_stat": t_stat,
                                 "daemon_serve": _daemon_serve_seconds(m.output),
                                 "requests": self.svc.proxy_counters()["requests"],
                                 "rss_idle": m.rss(),
                                 "service_reused": bool(holder and holder.pid == m.pid)})
                finally:
                    casfs_umount(m, last=holder is None)
        finally:
            if holder is not None:
                casfs_umount(holder)
        return _agg(runs)

    def startup_breakdown(self) -> dict[str, float]:
        """Where `casfs mount`'s time goes before serve(): interpreter and imports."""
        py = sys.executable
        return {
            "python -c pass": _time_cmd([py, "-c", "pass"]),
            "import casfs.cli (the `casfs mount` front end)": _time_cmd(
                [py, "-c", "import casfs.cli"]),
            "daemon imports (casfs.daemon, casfs.fuse_ops, casfs.store.s3, boto3)": _time_cmd(
                [py, "-c", "import casfs.daemon, casfs.fuse_ops, casfs.store.s3, boto3"]),
            "import boto3 alone": _time_cmd([py, "-c", "import boto3"]),
        }


def _delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


READY_ROWS: dict[str, list[tuple[str, str]]] = {
    "kernel": [("warm", "EROFS on the node, view service not running (starts it); page cache warm"),
               ("dropped", "EROFS on the node, view service not running; page cache dropped"),
               ("build", "first mount of the image: builds the EROFS, starts the service"),
               ("second", "EROFS on the node, view service running (a second mount)")],
    "fuse": [("warm", "no agent, page cache warm"),
             ("dropped", "no agent, page cache dropped"),
             ("agent", "node agent running, page cache warm")],
}


def _ready_what(mode: str, key: str) -> str:
    return dict(READY_ROWS.get(mode, [])).get(key, key)


def _agg(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: summarize([r[k] for r in runs if r.get(k) is not None])
                           for k in keys}
    out["runs"] = runs
    return out


def _med(d: dict[str, Any] | None, key: str) -> float | None:
    if not d:
        return None
    v = d.get(key)
    if isinstance(v, dict):
        return v.get("median")
    return v


def _mode(part: dict[str, Any] | None, mode: str) -> dict[str, Any]:
    """One mode's figures of a part (bigfile, tree); {} when not measured."""
    d = ((part or {}).get("modes") or {}).get(mode) or {}
    return d if d.get("status") == "ok" else {}


def _modes_of(res: dict[str, Any]) -> list[str]:
    return list(res.get("modes") or ["fuse"])


# The mount-ready figure a node sees in steady state, per mode: with the agent running
# (FUSE), with the image's EROFS on the node and the view service running (kernel).
STEADY_READY = {"fuse": ("agent", "warm"), "kernel": ("second",)}


def steady_ready(tree_mode: dict[str, Any], mode: str) -> tuple[str | None, float | None]:
    ready = tree_mode.get("mount_ready") or {}
    for key in STEADY_READY.get(mode, ("warm",)):
        row = ready.get(key) or {}
        if row.get("status") == "ok":
            return key, _med(row, "first_stat")
    return None, None


def evaluate_mode(res: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    """The brief's targets (and context rows) for one serving mode, against the same
    run's local-disk and store figures."""
    big, tree = res.get("bigfile") or {}, res.get("tree") or {}
    bm, tm = _mode(big, mode), _mode(tree, mode)
    local_cold = _med(big.get("local_cold"), "bytes_per_s")
    warm = _med(bm.get("casfs_warm"), "bytes_per_s")
    hot = _med(bm.get("casfs_hot"), "bytes_per_s")
    cold = _med(bm.get("casfs_cold"), "bytes_per_s")
    store = max((r["bytes_per_s"] for r in big.get("ranged_get", [])), default=None)
    walk_l = _med(tree.get("local_warm"), "seconds")
    walk_m = _med(tm.get("casfs_second_walk"), "seconds")
    ready_key, ready = steady_ready(tm, mode)
    rss = max([v for v in ((res.get("rss") or {}).get(mode) or {}).values() if v] or [0]) or None

    def row(target: str, measured: float | None, text: str, ok: bool | None,
            info: bool = False) -> dict[str, Any]:
        return {"target": target, "measured": measured,
                "measured_text": "–" if measured is None else text,
                "met": None if measured is None or info else ok, "info": info}

    r = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    ready_how = dict(READY_ROWS.get(mode, [])).get(ready_key or "", "")
    return [
        row("warm read (content on the node, page cache dropped) ≥ 0.9× local disk cold",
            r(warm, local_cold), f"{r(warm, local_cold) or 0:.2f}×",
            (r(warm, local_cold) or 0) >= 0.9),
        row("cold read ≥ 70% of parallel ranged GET", r(cold, store),
            f"{100 * (r(cold, store) or 0):.0f}%", (r(cold, store) or 0) >= 0.7),
        row("mount ready (100k entries, image metadata on the node) ≤ 50 ms", ready,
            f"{(ready or 0) * 1000:.0f} ms ({ready_how})", (ready or 99) <= 0.050),
        row("daemon RSS ≤ 150 MB", rss, fmt_bytes(rss), (rss or 0) <= 150e6),
        row("second walk + lstat of the tree vs local disk warm", r(walk_m, walk_l),
            f"{r(walk_m, walk_l) or 0:.2f}×", None, info=True),
        row("hot read (kernel page cache)", hot, f"{(hot or 0) / 1e9:.2f} GB/s", None,
            info=True),
    ]


def evaluate(res: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {mode: evaluate_mode(res, mode) for mode in _modes_of(res)}


def _side_by_side(modes: list[str], rows: list[tuple[str, list[list[str]], list[float | None]]],
                  heads: list[str], ratio_name: str) -> list[str]:
    """A table with a column group per mode; with two modes a last column of the first
    mode's figure over the second's."""
    pair = len(modes) == 2
    head = "| | " + " | ".join(f"{m}: {h}" for m in modes for h in heads)
    head += f" | {modes[0]} ÷ {modes[1]} ({ratio_name}) |" if pair else " |"
    out = [head, "|---|" + "---|" * (len(heads) * len(modes) + (1 if pair else 0))]
    for label, cells, vals in rows:
        line = f"| {label} | " + " | ".join(c for group in cells for c in group)
        if pair:
            a, b = vals
            line += f" | {'–' if a is None or not b else f'{a / b:.2f}×'} |"
        else:
            line += " |"
        out.append(line)
    return out


def render(res: dict[str, Any]) -> str:
    big, tree = res.get("bigfile") or {}, res.get("tree") or {}
    modes = _modes_of(res)
    mbps = lambda d: f"{(_med(d, 'bytes_per_s') or 0) / 1e6:,.0f}"  # noqa: E731
    lc = _med(big.get("local_cold"), "bytes_per_s")
    lines = [
        f"# casfs read-path benchmark, {res['date']}",
        "",
        f"Store: **{res['store']}**. Machine: {res['machine']['nproc']} CPUs, "
        f"{res['machine']['mem_bytes'] / 2**30:.0f} GiB RAM, kernel {res['machine']['kernel']}. "
        f"casfs {res['product']['source']}; mounts use {' '.join(res['mount_flags']) or 'defaults'}. "
        f"{res['runs']} run(s) per figure; page cache drops: "
        f"{'ok' if res['page_cache']['ok'] else 'FAILED: ' + str(res['page_cache']['error'])}.",
        "",
        "Serving modes, side by side in this run: " + ", ".join(f"**{m}**" for m in modes)
        + " (`casfs mount --mode`; kernel: EROFS + overlayfs, the node view service behind "
        "what the node lacks; fuse: every request through the daemon). Each mode has cache "
        "dirs of its own; local disk and the store are measured once. *daemon CPU s*: utime + "
        "stime of the FUSE daemon, or of the node view service, over the read.",
        "",
    ]
    for mode, why in (res.get("modes_unsupported") or {}).items():
        lines += [f"{mode} mode could not be measured here: {why}.", ""]
    if big:
        lines += [
            f"## Sequential read of one {fmt_bytes(big['file_bytes'])} incompressible file "
            "(1 MiB read() calls)",
            "",
            "| reference | MB/s (median) | × local disk cold | requests | fetched | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (("local_cold", "local disk, page cache dropped"),
                           ("local_hot", "local disk, page cache warm")):
            d = big.get(key)
            if d:
                lines.append(f"| {label} | {mbps(d)} | {(_med(d, 'bytes_per_s') or 0) / lc:.2f}× "
                             f"| – | – | {_med(d, 'seconds') or 0:.1f} |")
        for r in big.get("ranged_get", []):
            lines.append(f"| store: ranged GET, {r['threads']} threads × 8 MiB (boto3) | "
                         f"{r['bytes_per_s'] / 1e6:,.0f} | {r['bytes_per_s'] / lc:.2f}× | "
                         f"{r['requests']} | {fmt_bytes(r['bytes'])} | {r['seconds']:.1f} |")
        c = big.get("chunk_get")
        if c:
            lines.append(f"| store: GET of casfs's {c['requests']} chunk objects, {c['threads']} "
                         f"threads | {c['bytes_per_s'] / 1e6:,.0f} | {c['bytes_per_s'] / lc:.2f}× | "
                         f"{c['requests']} | {fmt_bytes(c['bytes'])} | {c['seconds']:.1f} |")
        rows = []
        for key, label in (("casfs_cold", "casfs cold (empty cache, fresh mount)"),
                           ("casfs_warm", "casfs warm (content on the node, page cache "
                            "dropped, fresh mount)"),
                           ("casfs_hot", "casfs hot (same mount, page cache warm)")):
            cells, vals = [], []
            for mode in modes:
                d = _mode(big, mode).get(key)
                if not d:
                    cells.append([_status(big, mode)] + ["–"] * 4)
                    vals.append(None)
                    continue
                v = _med(d, "bytes_per_s")
                partial = " (stopped at the cap)" if d.get("partial") else ""
                cpu = _med(d, "daemon_cpu")
                cells.append([mbps(d) + partial, f"{(v or 0) / lc:.2f}×",
                              _fmt_int(_med(d, "requests")), fmt_bytes(_med(d, "fetched_bytes")),
                              "–" if cpu is None else f"{cpu:.2f}"])
                vals.append(v)
            rows.append((label, cells, vals))
        lines += ["", "casfs, the modes side by side (× the same run's local disk, page cache "
                  "dropped):", ""]
        lines += _side_by_side(modes, rows, ["MB/s", "× local disk cold", "requests", "fetched",
                                             "daemon CPU s"], "MB/s")
        kernel = _mode(big, "kernel")
        if kernel.get("casfs_warm"):
            w = kernel["casfs_warm"]
            lines += ["", "Kernel mode, warm read (medians): "
                      f"{_fmt_int(_med(w, 'kernel_native_opens'))} native open(s), "
                      f"{_fmt_int(_med(w, 'kernel_view_opens'))} through the view, "
                      f"{fmt_bytes(_med(w, 'daemon_read_bytes'))} read through the view."]
        lines += ["", f"Indexing the file: {big['index_seconds']:.1f} s "
                  f"({big['index_mb_per_s']:.0f} MB/s, directly into SeaweedFS).", ""]
    if tree:
        base = _med(tree.get("local_warm"), "seconds")
        lines += [
            f"## os.walk + lstat of {tree['entries_in_image']:,} entries",
            "",
            "| reference | seconds (median) | × local disk warm | entries |",
            "|---|---|---|---|",
        ]
        for key, label in (("local_cold", "local disk, page cache dropped"),
                           ("local_warm", "local disk, warm")):
            d = tree.get(key)
            s = _med(d, "seconds")
            lines.append(f"| {label} | {s:.2f} | {s / base:.2f}× | {_fmt_int(_med(d, 'entries'))} |")
        rows = []
        for key, label in (("casfs_first_walk", "casfs, first walk (fresh mount, page cache "
                            "dropped)"), ("casfs_second_walk", "casfs, second walk (same mount)")):
            cells, vals = [], []
            for mode in modes:
                d = _mode(tree, mode).get(key)
                s = _med(d, "seconds")
                if s is None:
                    cells.append([_status(tree, mode), "–", "–"])
                    vals.append(None)
                    continue
                cells.append([f"{s:.2f}", f"{s / base:.2f}×", _fmt_int(_med(d, "entries"))])
                vals.append(s)
            rows.append((label, cells, vals))
        lines += ["", "casfs, the modes side by side:", ""]
        lines += _side_by_side(modes, rows, ["seconds", "× local disk warm", "entries"],
                               "seconds")
        lines += ["", "## Mount ready (100k-entry image, manifest already in the cache dir; "
                  "`casfs mount` start to the first successful stat inside)", "",
                  "| mode | how | `casfs mount` returned, ms | first stat, ms | "
                  "serve() in the log, ms | requests |", "|---|---|---|---|---|---|"]
        for mode in modes:
            ready = _mode(tree, mode).get("mount_ready") or {}
            for key, label in READY_ROWS.get(mode, []):
                d = ready.get(key)
                if not d:
                    continue
                if d.get("status") != "ok":
                    lines.append(f"| {mode} | {label} | {d.get('status')}: {d.get('note', '')} "
                                 "| | | |")
                    continue
                ds = _med(d, "daemon_serve")
                lines.append(f"| {mode} | {label} | {_med(d, 'returned') * 1000:.0f} | "
                             f"{_med(d, 'first_stat') * 1000:.0f} | "
                             f"{'–' if ds is None else f'{ds * 1000:.0f}'} | "
                             f"{_fmt_int(_med(d, 'requests'))} |")
    if res.get("startup"):
        lines += ["", "Start-up costs on this machine (median of 3, page cache warm):", "",
                  "| what | ms |", "|---|---|"]
        lines += [f"| {k} | {v * 1000:.0f} |" for k, v in res["startup"].items()]
    rss = res.get("rss") or {}
    if any(rss.values()):
        lines += ["", "## Daemon RSS (FUSE daemon / node view service)", "",
                  "| when | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
        whens = list(dict.fromkeys(k for m in modes for k in (rss.get(m) or {})))
        for when in whens:
            lines.append(f"| {when} | " + " | ".join(fmt_bytes((rss.get(m) or {}).get(when))
                                                    for m in modes) + " |")
    targets = res.get("targets") or {}
    lines += ["", "## Targets (brief)", "", "| target | " + " | ".join(modes) + " |",
              "|---|" + "---|" * len(modes)]
    descs = list(dict.fromkeys(t["target"] for m in modes for t in targets.get(m, [])))
    for desc in descs:
        cells = []
        for m in modes:
            t = next((t for t in targets.get(m, []) if t["target"] == desc), None)
            if t is None:
                cells.append("–")
                continue
            verdict = ("(context)" if t.get("info") else "n/a" if t["met"] is None
                       else "met" if t["met"] else "NOT met")
            cells.append(f"{t['measured_text']} {verdict}")
        lines.append(f"| {desc} | " + " | ".join(cells) + " |")
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def _status(part: dict[str, Any], mode: str) -> str:
    d = ((part or {}).get("modes") or {}).get(mode) or {}
    return f"{d.get('status', 'not run')}" + (f": {d['note']}" if d.get("note") else "")


def _fmt_int(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small settings to check the harness: a 256 MiB file, a 10,000-entry "
                   "tree, 2 runs, 3 mount-ready runs (each overridable)")
    p.add_argument("--size-gb", type=float, help="size of the big file (GiB; default 2)")
    p.add_argument("--entries", type=int, help="entries of the tree image (default 100000)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="serving modes to measure every casfs figure in, side by side "
                   "(`casfs mount --mode`; default kernel,fuse)")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--runs", type=int, help="runs of each warm/local figure (default 3)")
    p.add_argument("--ready-runs", type=int, help="runs of each mount-ready figure (default 5)")
    p.add_argument("--ready-timeout", type=float, default=60.0,
                   help="seconds a mount-ready `casfs mount` may take before the row is an "
                   "error (default 60)")
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32],
                   help="thread counts of the ranged-GET comparison (default 16,32)")
    p.add_argument("--cold-timeout", type=float, default=300.0,
                   help="stop the cold read after this many seconds and report its rate")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="wait up to this long for other work to leave the CPUs idle first")
    p.add_argument("--skip", default="", help="comma-separated: bigfile, tree")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--stem", help="results file name stem (default <date>-readpath[-quick])")
    add_product_args(p)
    args = p.parse_args(argv)
    try:
        args.modes = parse_modes(args.modes)
    except ValueError as exc:
        p.error(str(exc))
    quick = {"size_gb": 0.25, "entries": 10_000, "runs": 2, "ready_runs": 3}
    full = {"size_gb": 2.0, "entries": 100_000, "runs": 3, "ready_runs": 5}
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    exit_on_sigterm()
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    product = select_product(args.casfs_src, args.casfs_rev, args.work)
    log(f"casfs under test: {product['source']}")
    skip = set(filter(None, args.skip.split(",")))
    size = int(args.size_gb * 2**30)
    big_meta = None if "bigfile" in skip else build_bigfile_image(size, args.work)
    tree_meta = None if "tree" in skip else build_tree_image(args.entries, args.work)
    big_root = native_root(big_meta, args.work) if big_meta else None
    tree_root = native_root(tree_meta, args.work) if tree_meta else None
    runs_base = args.work / "runs"
    cleanup_stale_runs(runs_base)
    run_dir = fresh_dir(runs_base / f"readpath-{os.getpid()}")
    res: dict[str, Any] = {"benchmark": "readpath", "date": now_iso(), "machine": machine_info(),
                           "product": product, "runs": args.runs, "quick": args.quick,
                           "errors": []}
    try:
        with services(args.latency_ms) as svc:
            bench = ReadPath(args, svc, run_dir)
            res["store"] = svc.note
            res["mount_flags"] = bench.flags
            res["modes"] = bench.modes
            res["modes_unsupported"] = {m: r for m, r in bench.unsupported.items() if r}
            for name, fn, meta, root in (("bigfile", bench.bigfile, big_meta, big_root),
                                         ("tree", bench.tree, tree_meta, tree_root)):
                if meta is None:
                    continue
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                try:
                    res[name] = fn(meta, root)
                except Exception as exc:  # noqa: BLE001 - reported, the other part still runs
                    log(f"ERROR {name}: {exc}")
                    res["errors"].append(f"{name}: {exc}")
            res["startup"] = bench.startup_breakdown()
            res["rss"] = bench.rss
            res["page_cache"] = bench.pc.report()
            res["errors"] += bench.errors
    finally:
        cleanup_mounts_under(run_dir)
        stop_started_daemons()
        shutil.rmtree(run_dir, ignore_errors=True)
    res["errors"] += INCIDENTS
    res["targets"] = evaluate(res)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    stem = f"{today()}-readpath" + ("-quick" if args.quick else "")
    publish(res, args.out, args.stem or unique_stem(args.out, stem), render)
    log(f"readpath finished in {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
