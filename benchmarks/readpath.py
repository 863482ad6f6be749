"""The read path: big sequential reads, tree walks, mount start-up and daemon memory, all
against the same SeaweedFS behind the latency proxy, with local disk beside each figure.

    python -m benchmarks.readpath [--size-gb 2] [--entries 100000] [--latency-ms 20]

In one run:
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
  image with the manifest already in the cache dir (page cache warm, and dropped);
- daemon RSS (VmRSS of the pid `casfs mount` prints) after each step.
Writes ``<out>/<date>-readpath.{json,md}``.
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
    exit_on_sigterm,
    fresh_dir,
    log,
    machine_info,
    now_iso,
    run_casfs,
    s3_client,
    select_product,
    services,
    stat_counters,
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
        self.flags = ["--no-trace"] if "--no-trace" in casfs_help("mount") else []
        self.rss: dict[str, int | None] = {}
        self.bucket = svc.seaweed.make_bucket("casfs-readpath")
        self.store = f"s3://{self.bucket}/casfs"

    def mount(self, ref: str, cache: Path) -> Any:
        return casfs_mount(ref, self.mnt, self.store, cache, self.svc.env_proxy, self.flags)

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

        path_in_mnt = self.mnt / BIGFILE_PATH
        cache = self.run_dir / "cache-big"
        fresh_dir(cache)
        log(f"casfs cold read (cap {self.args.cold_timeout:.0f}s)")
        self.pc.drop()
        self.svc.proxy.reset()
        with self.mount(idx.ref, cache) as m, RssSampler(m.pid) as rs:
            r = sequential_read(path_in_mnt, self.args.cold_timeout)
            r.update(self._counters(m))
            r["rss_peak"] = rs.peak
        log(f"  cold: {r['bytes_per_s'] / 1e6:.0f} MB/s over {fmt_bytes(r['bytes'])}"
            + (" (stopped at the cap)" if r["partial"] else ""))
        out["casfs_cold"] = r
        if r["partial"]:
            log("  filling the rest of the cache (untimed) for the warm runs")
            with self.mount(idx.ref, cache):
                sequential_read(path_in_mnt)
        log("casfs warm (cache on disk, page cache dropped, fresh mount) and hot")
        warm, hot = [], []
        for i in range(self.args.runs):
            self.pc.drop()
            self.svc.proxy.reset()
            with self.mount(idx.ref, cache) as m, RssSampler(m.pid) as rs:
                w = sequential_read(path_in_mnt)
                w.update(self._counters(m))
                w["rss_peak"] = rs.peak
                warm.append(w)
                if i == self.args.runs - 1:
                    for _ in range(self.args.runs):
                        h = sequential_read(path_in_mnt)
                        h["rss_after"] = m.rss()
                        hot.append(h)
        out["casfs_warm"] = _agg(warm)
        out["casfs_hot"] = _agg(hot)
        self.rss["bigfile read (peak)"] = max(
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
        c = stat_counters(m.stats())
        return {"requests": pc["requests"], "fetched_bytes": pc["body_bytes_down"],
                "daemon_reads": c["reads"], "daemon_read_bytes": c["read_bytes"],
                "daemon_fetches": c["fetches"], "rss_after": m.rss()}

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
        cache = self.run_dir / "cache-tree"
        fresh_dir(cache)
        cold, warm, rss = [], [], []
        for _ in range(self.args.runs):
            self.pc.drop()
            with self.mount(idx.ref, cache) as m:
                cold.append(walk_lstat(self.mnt / "tree"))
                warm.append(walk_lstat(self.mnt / "tree"))
                rss.append(m.rss())
        out["casfs_first_walk"], out["casfs_second_walk"] = _agg(cold), _agg(warm)
        self.rss["100k tree mounted, after two walks"] = max(v or 0 for v in rss)
        log(f"  casfs: first walk {out['casfs_first_walk']['seconds']['median']:.2f}s, second "
            f"{out['casfs_second_walk']['seconds']['median']:.2f}s")
        no_agent = ["--no-agent"] if "--no-agent" in casfs_help("mount") else []
        out["mount_ready"] = self.mount_ready(idx.ref, cache, drop=False, extra=no_agent)
        out["mount_ready_dropped"] = self.mount_ready(idx.ref, cache, drop=True, extra=no_agent)
        if no_agent:  # this casfs has a node agent: the same, with one running
            run_casfs(["agent", "start", "--cache-dir", str(cache)], env=self.svc.env_proxy)
            try:
                out["mount_ready_agent"] = self.mount_ready(idx.ref, cache, drop=False)
            finally:
                run_casfs(["agent", "stop", "--cache-dir", str(cache)], env=self.svc.env_proxy)
        shutil.rmtree(cache, ignore_errors=True)
        return out

    def mount_ready(self, ref: str, cache: Path, drop: bool,
                    extra: list[str] | None = None) -> dict[str, Any]:
        """`casfs mount` start -> first successful stat, manifest already in ``cache``."""
        target = self.mnt / "tree" / "d050" / "s05" / "link"
        runs = []
        for _ in range(self.args.ready_runs):
            if drop:
                self.pc.drop()
            self.svc.proxy.reset()
            t0 = time.perf_counter()
            m = casfs_mount_start(ref, self.mnt, self.store, cache, self.svc.env_proxy,
                                  [*self.flags, *(extra or [])])
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
                             "rss_idle": m.rss()})
            finally:
                casfs_umount(m)
        agg = _agg(runs)
        log(f"  mount ready{' (page cache dropped)' if drop else ''}: first stat after "
            f"{agg['first_stat']['median'] * 1000:.0f} ms (mount returned after "
            f"{agg['returned']['median'] * 1000:.0f} ms)")
        return agg

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


def evaluate(res: dict[str, Any]) -> list[dict[str, Any]]:
    big, tree = res.get("bigfile") or {}, res.get("tree") or {}
    local_cold = _med(big.get("local_cold"), "bytes_per_s")
    warm = _med(big.get("casfs_warm"), "bytes_per_s")
    hot = _med(big.get("casfs_hot"), "bytes_per_s")
    cold = _med(big.get("casfs_cold"), "bytes_per_s")
    store = max((r["bytes_per_s"] for r in big.get("ranged_get", [])), default=None)
    walk_l = _med(tree.get("local_warm"), "seconds")
    walk_m = _med(tree.get("casfs_second_walk"), "seconds")
    # A node runs the agent when it has one (casfs agent): the figure is with it.
    agent = tree.get("mount_ready_agent") is not None
    ready = _med(tree.get("mount_ready_agent" if agent else "mount_ready"), "first_stat")
    rss = max([v for v in res.get("rss", {}).values() if v] or [0]) or None

    def row(target: str, measured: float | None, text: str, ok: bool | None) -> dict[str, Any]:
        return {"target": target, "measured": measured, "measured_text": text,
                "met": None if measured is None else ok}

    r = lambda a, b: None if a is None or not b else a / b  # noqa: E731
    return [
        row("warm read ≥ 0.5× local disk cold", r(warm, local_cold),
            f"{r(warm, local_cold) or 0:.2f}×", (r(warm, local_cold) or 0) >= 0.5),
        row("hot read ≥ 5 GB/s (kernel page cache)", hot, f"{(hot or 0) / 1e9:.2f} GB/s",
            (hot or 0) >= 5e9),
        row("cold read ≥ 70% of parallel ranged GET", r(cold, store),
            f"{100 * (r(cold, store) or 0):.0f}%", (r(cold, store) or 0) >= 0.7),
        row("walk+lstat (warm) ≤ 1.5× local disk", r(walk_m, walk_l),
            f"{r(walk_m, walk_l) or 0:.2f}×", (r(walk_m, walk_l) or 99) <= 1.5),
        row("mount ready (100k entries, manifest cached"
            + (", node agent running" if agent else "") + ") ≤ 150 ms", ready,
            f"{(ready or 0) * 1000:.0f} ms", (ready or 99) <= 0.150),
        row("daemon RSS ≤ 150 MB", rss, fmt_bytes(rss), (rss or 0) <= 150e6),
    ]


def render(res: dict[str, Any]) -> str:
    big, tree = res.get("bigfile") or {}, res.get("tree") or {}
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
    ]
    if big:
        lines += [
            f"## Sequential read of one {fmt_bytes(big['file_bytes'])} incompressible file "
            "(1 MiB read() calls)",
            "",
            "| read | MB/s (median) | × local disk cold | requests | fetched | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for key, label in (("local_cold", "local disk, page cache dropped"),
                           ("local_hot", "local disk, page cache warm"),
                           ("casfs_cold", "casfs cold (empty cache, fresh mount)"),
                           ("casfs_warm", "casfs warm (cache on disk, page cache dropped)"),
                           ("casfs_hot", "casfs hot (same mount, page cache warm)")):
            d = big.get(key)
            if not d:
                continue
            v = _med(d, "bytes_per_s")
            note = " (stopped at the cap)" if d.get("partial") else ""
            lines.append(f"| {label}{note} | {mbps(d)} | {(v or 0) / lc:.2f}× | "
                         f"{_fmt_int(_med(d, 'requests'))} | {fmt_bytes(_med(d, 'fetched_bytes'))} "
                         f"| {_med(d, 'seconds') or 0:.1f} |")
        for r in big.get("ranged_get", []):
            lines.append(f"| store: ranged GET, {r['threads']} threads × 8 MiB (boto3) | "
                         f"{r['bytes_per_s'] / 1e6:,.0f} | {r['bytes_per_s'] / lc:.2f}× | "
                         f"{r['requests']} | {fmt_bytes(r['bytes'])} | {r['seconds']:.1f} |")
        c = big.get("chunk_get")
        if c:
            lines.append(f"| store: GET of casfs's {c['requests']} chunk objects, {c['threads']} "
                         f"threads | {c['bytes_per_s'] / 1e6:,.0f} | {c['bytes_per_s'] / lc:.2f}× | "
                         f"{c['requests']} | {fmt_bytes(c['bytes'])} | {c['seconds']:.1f} |")
        lines += ["", f"Indexing the file: {big['index_seconds']:.1f} s "
                  f"({big['index_mb_per_s']:.0f} MB/s, directly into SeaweedFS).", ""]
    if tree:
        lines += [
            f"## os.walk + lstat of {tree['entries_in_image']:,} entries",
            "",
            "| walk | seconds (median) | × local disk warm | entries |",
            "|---|---|---|---|",
        ]
        base = _med(tree.get("local_warm"), "seconds")
        for key, label in (("local_cold", "local disk, page cache dropped"),
                           ("local_warm", "local disk, warm"),
                           ("casfs_first_walk", "casfs, first walk (fresh mount, page cache dropped)"),
                           ("casfs_second_walk", "casfs, second walk (same mount)")):
            d = tree.get(key)
            s = _med(d, "seconds")
            lines.append(f"| {label} | {s:.2f} | {s / base:.2f}× | {_fmt_int(_med(d, 'entries'))} |")
        lines += ["", "## Mount ready (100k-entry image, manifest already in the cache dir)", "",
                  "| page cache | `casfs mount` returned, ms | first stat, ms | daemon serve(), ms |"
                  " requests |", "|---|---|---|---|---|"]
        for key, label in (("mount_ready", "warm, no agent"),
                           ("mount_ready_dropped", "dropped, no agent"),
                           ("mount_ready_agent", "warm, node agent running")):
            d = tree.get(key)
            if d:
                ds = _med(d, "daemon_serve")
                lines.append(f"| {label} | {_med(d, 'returned') * 1000:.0f} | "
                             f"{_med(d, 'first_stat') * 1000:.0f} | "
                             f"{'–' if ds is None else f'{ds * 1000:.0f}'} | "
                             f"{_fmt_int(_med(d, 'requests'))} |")
    if res.get("startup"):
        lines += ["", "Start-up costs on this machine (median of 3, page cache warm):", "",
                  "| what | ms |", "|---|---|"]
        lines += [f"| {k} | {v * 1000:.0f} |" for k, v in res["startup"].items()]
    if res.get("rss"):
        lines += ["", "## Daemon RSS", "", "| when | VmRSS |", "|---|---|"]
        lines += [f"| {k} | {fmt_bytes(v)} |" for k, v in res["rss"].items()]
    lines += ["", "## Targets (brief)", "", "| target | measured | |", "|---|---|---|"]
    for t in res["targets"]:
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        lines.append(f"| {t['target']} | {t['measured_text']} | {verdict} |")
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def _fmt_int(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.0, help="size of the big file (GiB)")
    p.add_argument("--entries", type=int, default=100_000, help="entries of the tree image")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--runs", type=int, default=3, help="runs of each warm/local figure")
    p.add_argument("--ready-runs", type=int, default=5, help="runs of the mount-ready figure")
    p.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32],
                   help="thread counts of the ranged-GET comparison (default 16,32)")
    p.add_argument("--cold-timeout", type=float, default=300.0,
                   help="stop the cold read after this many seconds and report its rate")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="wait up to this long for other work to leave the CPUs idle first")
    p.add_argument("--skip", default="", help="comma-separated: bigfile, tree")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--stem", help="results file name stem (default <date>-readpath)")
    add_product_args(p)
    args = p.parse_args(argv)
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
    cleanup_mounts_under(args.work / "runs")
    run_dir = fresh_dir(args.work / "runs" / f"readpath-{os.getpid()}")
    res: dict[str, Any] = {"benchmark": "readpath", "date": now_iso(), "machine": machine_info(),
                           "product": product, "runs": args.runs, "errors": []}
    try:
        with services(args.latency_ms) as svc:
            bench = ReadPath(args, svc, run_dir)
            res["store"] = svc.note
            res["mount_flags"] = bench.flags
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
    finally:
        cleanup_mounts_under(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)
    res["targets"] = evaluate(res)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    publish(res, args.out, args.stem or unique_stem(args.out, f"{today()}-readpath"), render)
    log(f"readpath finished in {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
