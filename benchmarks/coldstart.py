"""The cold-start benchmark: Python imports from a mounted image against the alternatives.

    python -m benchmarks.coldstart [--quick] [--modes kernel,fuse] [--latency-ms 20]
                                   [--runs N] [--out DIR]

One run: build (or reuse) the image, extract it to local disk, start SeaweedFS and the
latency proxy, index the image into SeaweedFS (directly: indexing is not what is measured
here), upload its layer blobs for the full pull, then per workload:

- native cold / warm: the image's interpreter on the extracted tree;
- full pull: every layer blob downloaded through the proxy, decompressed, extracted (GNU
  tar), then the import, each phase timed (one pull per run serves every workload);
- casfs first boot: empty cache dir, no trace in the store, page cache dropped, fresh
  `casfs mount` through the proxy, then the import (casfs's defaults otherwise);
- casfs --no-prefetch (with --no-prefetch-row): the same with prefetch and its
  heuristics off: plain lazy loading;
- casfs prefetched boot: one recording boot (empty cache), then boots with an empty cache
  that replay its trace (only when `casfs mount` has --no-prefetch; else reported n/a);
- casfs warm cache: cache dir kept from the first boots, page cache dropped, fresh mount;
- casfs hot: one mount, page cache warm.

Every casfs scenario runs once per serving mode (`--modes kernel,fuse`, default both:
`casfs mount --mode kernel` serves from an EROFS image + overlayfs with the node view
service behind what the node lacks; `--mode fuse` serves every request through the
daemon), side by side in the same run: first, warm and hot boots take turns between the
modes run by run (a machine whose load drifts moves both alike); prefetched boots replay
a trace recorded in their own mode, so each mode records and replays in turn. Each mode
has cache dirs of its own; the natives and the full pull are measured once and every
ratio is against the same run's figures. The warm-cache boots start from the cache of the
last first boot after one more boot of the workload that is let run to its end
(trace-idle), so whatever casfs does after a boot is done (kernel mode makes the boot's
multi-chunk files whole objects, read natively from then on); they replay those settling
boots' traces. Each boot reports the daemon's CPU seconds (the
FUSE daemon's, or the node view service's, utime + stime over the import).

Only the recording boot records a trace (--no-trace elsewhere), and traces are deleted
between workloads, so each workload replays its own boot only. After each page-cache drop
casfs's own code is re-read by a throwaway mount (unless --cold-agent): on a worker node
the agent is resident and the image is what is cold.

Writes ``<out>/<date>-coldstart[-quick].{json,md,png}`` and prints the tables and the
brief's targets beside the measured ratios. Targets are reported, never enforced.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.common import (
    INCIDENTS,
    MODES,
    RESULTS,
    WORK,
    BenchError,
    Mounted,
    PageCache,
    Services,
    add_product_args,
    casfs_help,
    casfs_index,
    casfs_mount,
    cleanup_mounts_under,
    cleanup_stale_runs,
    cpu_seconds,
    disk_device,
    disk_read_bytes,
    exit_on_sigterm,
    fresh_dir,
    log,
    machine_info,
    mode_flags,
    mode_support,
    now_iso,
    parse_modes,
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
    IMAGES,
    TAG,
    ImageSpec,
    Workload,
    build_image,
    decompress_blob,
    extract_tar,
    layer_blob_path,
    native_root,
    run_workload,
    verify_workload,
)
from casfs.store.content import decompress

PULL_CONCURRENCY = 3  # dockerd's default max-concurrent-downloads
OCI_BUCKET = "oci-layers"


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A summary (median, min, max) of every numeric field the runs share."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k, v in r.items() if isinstance(v, int | float) and k not in keys]
    return {k: summarize([r[k] for r in runs if isinstance(r.get(k), int | float)])
            for k in keys}


def ok(runs: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"status": "ok", "runs": runs, **summarize_runs(runs), **extra}


def na(note: str) -> dict[str, Any]:
    return {"status": "n/a", "note": note}


class ColdStart:
    """One benchmark run: the image, the services, the page cache and the results."""

    def __init__(self, args: argparse.Namespace, spec: ImageSpec, meta: dict[str, Any],
                 root: Path, svc: Services, store: str, ref: str, run_dir: Path) -> None:
        self.args = args
        self.spec = spec
        self.meta = meta
        self.root = root
        self.svc = svc
        self.store = store
        self.ref = ref
        self.run_dir = run_dir
        self.pc = PageCache()
        self.home = run_dir / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.mnt = run_dir / "mnt"
        self.device = disk_device(root)
        self.prefetch = "--no-prefetch" in casfs_help("mount")
        # With prefetch built, only the one recording boot per workload records a trace
        # (--no-trace everywhere else), so a prefetched boot replays exactly that boot and
        # a first boot finds no trace at all. Every other default (readahead and sibling
        # heuristics, replay) stays on: the rows measure the product as shipped.
        self.quiet = ["--no-trace"] if self.prefetch else []
        self.errors: list[str] = []
        self.has_mode_flag = "--mode" in casfs_help("mount")
        self.modes: list[str] = args.modes if self.has_mode_flag else ["fuse"]
        # Per mode, why it cannot be measured on this node (None: it can).
        self.unsupported = {m: r for m, r in mode_support().items() if m in self.modes}

    @property
    def runs(self) -> int:
        return self.args.runs

    def workload(self, wl: Workload, root: Path) -> float:
        return run_workload(self.meta, root, wl.code, self.home, timeout=self.args.timeout)

    # -- native ---------------------------------------------------------------------

    def native_cold(self, wl: Workload) -> dict[str, Any]:
        runs = []
        for _ in range(self.runs):
            self.pc.drop()
            d0 = disk_read_bytes(self.device)
            t = self.workload(wl, self.root)
            d1 = disk_read_bytes(self.device)
            runs.append({"wall": t, "disk_read_bytes": None if d0 is None else d1 - d0})
        return ok(runs)

    def native_warm(self, wl: Workload) -> dict[str, Any]:
        self.workload(wl, self.root)  # warm-up
        return ok([{"wall": self.workload(wl, self.root)} for _ in range(self.runs)])

    # -- full pull ------------------------------------------------------------------

    def full_pull(self, workloads: list[Workload]) -> dict[str, dict[str, Any]]:
        """Per run: drop caches, download, decompress, extract, then each workload's
        import on the fresh tree. Returns a scenario result per workload."""
        client = s3_client(self.svc.proxy.url)
        client.list_buckets()  # connection set-up and boto3's lazy loading, untimed
        per_wl: dict[str, list[dict[str, Any]]] = {wl.name: [] for wl in workloads}
        layers = self.meta["layers"]
        for i in range(self.runs):
            dest = fresh_dir(self.run_dir / "pull")
            blobs = dest / "blobs"
            blobs.mkdir()
            self.pc.drop()
            self.svc.proxy.reset()
            t0 = time.perf_counter()

            def fetch(layer: dict[str, Any], blobs: Path = blobs) -> Path:
                path = blobs / layer["digest"].split(":", 1)[1]
                body = client.get_object(Bucket=OCI_BUCKET, Key=layer["digest"])["Body"]
                with open(path, "wb") as f:
                    while buf := body.read(1 << 20):
                        f.write(buf)
                return path

            with concurrent.futures.ThreadPoolExecutor(PULL_CONCURRENCY) as pool:
                paths = list(pool.map(fetch, layers))
            t1 = time.perf_counter()
            tars = []
            for layer, path in zip(layers, paths, strict=True):
                tar = path.with_suffix(".tar")
                decompress_blob(path, layer["media_type"], tar)
                tars.append(tar)
            t2 = time.perf_counter()
            root = dest / "root"
            for layer, tar in zip(layers, tars, strict=True):
                if layer.get("whiteouts"):
                    raise BenchError("the full pull does not apply whiteouts")
                extract_tar(tar, root)
            t3 = time.perf_counter()
            pcount = self.svc.proxy_counters()
            phases = {"download": t1 - t0, "decompress": t2 - t1, "extract": t3 - t2}
            log(f"  full pull run {i + 1}: download {phases['download']:.2f}s, decompress "
                f"{phases['decompress']:.2f}s, extract {phases['extract']:.2f}s")
            for wl in workloads:
                t = self.workload(wl, root)
                per_wl[wl.name].append({
                    **phases, "import": t, "wall": sum(phases.values()) + t,
                    "requests": pcount["requests"], "fetched_bytes": pcount["body_bytes_down"]})
            shutil.rmtree(dest)
        return {name: ok(runs) for name, runs in per_wl.items()}

    # -- casfs ----------------------------------------------------------------------

    def flags(self, mode: str) -> list[str]:
        """`--mode <mode>` when this casfs has the flag (else it only has FUSE)."""
        return mode_flags(mode) if self.has_mode_flag else []

    def mount(self, cache: Path, mode: str, extra: list[str], env: dict[str, str] | None = None,
              mnt: Path | None = None) -> Any:
        return casfs_mount(self.ref, mnt or self.mnt, self.store, cache,
                           env or self.svc.env_proxy, [*self.flags(mode), *extra])

    def drop_for_boot(self, mode: str) -> None:
        """Drop the page cache, then (unless --cold-agent) bring casfs's own code back into
        it with a throwaway mount in the same mode that reads nothing (--no-prefetch, its
        own cache dir): on a worker node casfs is resident; the image is what is cold."""
        self.pc.drop()
        if self.args.cold_agent:
            return
        scratch = fresh_dir(self.run_dir / f"cache-prewarm-{mode}")
        with self.mount(scratch, mode, ["--no-prefetch", *self.quiet], self.svc.env_direct) as m:
            self.check_mode(m, mode)
        shutil.rmtree(scratch, ignore_errors=True)

    def check_mode(self, m: Mounted, mode: str) -> None:
        """A mount is measured in the mode asked for, or not at all."""
        if self.has_mode_flag and m.mode != mode:
            raise BenchError(f"casfs mount --mode {mode} served in {m.mode or 'an unknown'} "
                             f"mode: {m.output}")

    def boot(self, wl: Workload, cache: Path, mode: str,
             extra: list[str] | None = None) -> dict[str, Any]:
        """Drop the page cache, mount fresh (cache dir as given), import, count, unmount."""
        self.drop_for_boot(mode)
        self.svc.proxy.reset()
        with self.mount(cache, mode, extra or []) as m:
            self.check_mode(m, mode)
            cpu0 = cpu_seconds(m.pid)
            t = self.workload(wl, self.mnt)
            cpu1 = cpu_seconds(m.pid)
            pcount = self.svc.proxy_counters()
            stats = m.stats()
            counters = stat_counters(stats)
            rss = m.rss()
        return {"wall": m.seconds + t, "mount": m.seconds, "import": t,
                "requests": pcount["requests"], "get_requests": pcount["get_requests"],
                "fetched_bytes": pcount["body_bytes_down"],
                # Uncompressed bytes of the chunks now on the node (the boot started empty
                # for first/prefetched boots): comparable with read_bytes, unlike the
                # compressed bytes on the wire.
                "cache_bytes": int((stats.get("cache") or {}).get("bytes", 0)),
                **{f"daemon_{k}": v for k, v in counters.items()
                   if k not in ("read_bytes", "reads", "opens")},
                "read_bytes": counters["read_bytes"], "reads": counters["reads"],
                "opens": counters["opens"], "rss_bytes": rss,
                # CPU of the process serving the mount (the FUSE daemon, or the node view
                # service in kernel mode) while the import ran.
                "daemon_cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                **kernel_counters(stats)}

    def interleaved(self, what: str, modes: list[str],
                    one: Callable[[str, int], dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """self.runs runs of a scenario per mode, the modes taking turns run by run (so a
        machine that drifts moves them alike); a mode whose run fails becomes an error row
        and the others go on. Returns each mode's scenario result."""
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        failed: dict[str, str] = {}
        busy = wait_for_quiet(self.args.quiet_wait) if self.args.quiet_wait > 0 else None
        load = os.getloadavg()[0]
        log(what + (f" (CPUs {busy:.0%} busy with other work)" if busy and busy > 0.25 else ""))
        for i in range(self.runs):
            for mode in modes:
                if mode in failed:
                    continue
                try:
                    runs[mode].append(one(mode, i))
                except Exception as exc:  # noqa: BLE001 - reported in the results
                    msg = f"{what} [{mode}]: {exc}"
                    log("ERROR " + msg)
                    if self.args.verbose:
                        traceback.print_exc()
                    self.errors.append(msg)
                    failed[mode] = str(exc)[:300]
        return {m: {"status": "error", "note": failed[m]} if m in failed else
                ok(runs[m], loadavg_start=load, cpu_busy_start=busy) for m in modes}

    def cache_dir(self, kind: str, mode: str, wl: Workload) -> Path:
        """A cache dir of one mode's own (never shared with the other mode)."""
        return self.run_dir / f"cache-{kind}-{mode}-{wl.name}"

    def casfs_first(self, wl: Workload, modes: list[str]) -> tuple[dict[str, Any], dict[str, Path]]:
        """Empty cache, no trace in the store: the first boot ever of this image. The last
        run's cache of each mode is that mode's warm cache."""
        caches = {mode: self.cache_dir("first", mode, wl) for mode in modes}

        def one(mode: str, i: int) -> dict[str, Any]:
            fresh_dir(caches[mode])
            r = self.boot(wl, caches[mode], mode, self.quiet)
            self.log_boot(f"{mode}: first boot run {i + 1}", r)
            return r

        return self.interleaved(f"[{wl.name}] casfs first boot", modes, one), caches

    def log_boot(self, label: str, r: dict[str, Any]) -> None:
        log(f"  {label}: {r['wall']:.2f}s ({r['mount']:.2f}s mount), {r['requests']} requests, "
            f"{r['fetched_bytes'] / 1e6:.1f} MB fetched, {r['read_bytes'] / 1e6:.1f} MB read "
            f"via FUSE, daemon CPU {r['daemon_cpu'] or 0:.2f}s" + _kernel_note(r))

    def empty_cache_boots(self, label: str, wl: Workload, cache: Path,
                          mode: str) -> list[dict[str, Any]]:
        """self.runs boots of wl in one mode, each on an emptied cache dir."""
        runs = []
        for i in range(self.runs):
            fresh_dir(cache)
            r = self.boot(wl, cache, mode, self.quiet)
            self.log_boot(f"{label} run {i + 1}", r)
            runs.append(r)
        return runs

    def casfs_noprefetch(self, wl: Workload, modes: list[str]) -> dict[str, Any]:
        """Plain lazy loading: no replay, no heuristics (diagnostic row, --no-prefetch-row)."""
        if not self.prefetch:
            return {m: na("casfs mount has no --no-prefetch flag: same as the first boot")
                    for m in modes}

        def one(mode: str, i: int) -> dict[str, Any]:
            cache = fresh_dir(self.cache_dir("np", mode, wl))
            r = self.boot(wl, cache, mode, ["--no-prefetch", *self.quiet])
            self.log_boot(f"{mode}: --no-prefetch run {i + 1}", r)
            shutil.rmtree(cache, ignore_errors=True)
            return r

        return self.interleaved(f"[{wl.name}] casfs --no-prefetch", modes, one)

    def trace_extra(self) -> list[str]:
        return [] if self.args.trace_idle is None else ["--trace-idle", f"{self.args.trace_idle:g}"]

    def wait_boot_end(self, m: Mounted, log_offset: int) -> dict[str, Any]:
        """Mounted, after the workload: wait (up to --trace-wait) until the daemon reports
        the boot's trace saved and, in kernel mode, the view has finished making the
        boot's files whole ("N objects made whole after the boot" in view.log)."""
        t0 = time.monotonic()
        deadline = t0 + self.args.trace_wait
        saved, objects = "", None
        while time.monotonic() < deadline:
            saved = saved or (m.stats().get("prefetch") or {}).get("trace_saved") or ""
            if saved and m.mode == "kernel" and objects is None:
                objects = objects_made_whole(m, log_offset)
            if saved and (m.mode != "kernel" or objects is not None):
                break
            time.sleep(0.5)
        if not saved:
            log(f"WARNING: the boot's trace was not reported saved within "
                f"{self.args.trace_wait:.0f}s; it may be saved at unmount")
        elif m.mode == "kernel" and objects is None:
            log(f"WARNING: the view did not report the objects made whole after the boot "
                f"within {self.args.trace_wait:.0f}s")
        return {"trace_saved": saved, "objects_made_whole": objects,
                "boot_end_wait": time.monotonic() - t0}

    def record_boot(self, wl: Workload, cache: Path, mode: str) -> dict[str, Any]:
        """A boot that records its trace; waits (mounted) until the daemon says it saved
        it, so the trace and its pack are in the store before the next boot."""
        self.drop_for_boot(mode)
        self.svc.proxy.reset()
        log_offset = view_log_size(cache)
        with self.mount(cache, mode, self.trace_extra()) as m:
            self.check_mode(m, mode)
            t = self.workload(wl, self.mnt)
            pcount = self.svc.proxy_counters()
            end = self.wait_boot_end(m, log_offset)
            counters = stat_counters(m.stats())
        traces = self.list_keys("traces/m/")
        log(f"  {mode}: recording boot: {m.seconds + t:.2f}s, trace "
            f"{end['trace_saved'] or '(not reported)'}, {len(traces)} trace object(s) in the "
            f"store")
        return {"wall": m.seconds + t, "mount": m.seconds, "import": t,
                "requests": pcount["requests"], "fetched_bytes": pcount["body_bytes_down"],
                "read_bytes": counters["read_bytes"], **end, "traces_in_store": len(traces)}

    def casfs_prefetched(self, wl: Workload, mode: str) -> dict[str, Any]:
        if not self.prefetch:
            return na("prefetch not built yet (`casfs mount` has no --no-prefetch flag)")
        self.clear_traces()  # replay this mode's recording boot, and nothing else
        cache = fresh_dir(self.cache_dir("pf", mode, wl))
        recording = self.record_boot(wl, cache, mode)
        if not recording["traces_in_store"]:
            raise BenchError("the recording boot left no trace in the store")
        runs = self.empty_cache_boots(f"{mode}: prefetched boot", wl, cache, mode)
        shutil.rmtree(cache, ignore_errors=True)
        return ok(runs, recording=recording)

    def settle(self, wl: Workload, cache: Path, mode: str) -> dict[str, Any]:
        """One more boot on the first boot's cache, recording, let run until the boot has
        ended and what casfs does after a boot is done: what a node that has run the image
        before holds (kernel mode: the boot's multi-chunk files made whole objects). Its
        trace stays in the store for the warm boots to replay."""
        self.drop_for_boot(mode)
        log_offset = view_log_size(cache)
        with self.mount(cache, mode, self.trace_extra() if self.prefetch else []) as m:
            self.check_mode(m, mode)
            t = self.workload(wl, self.mnt)
            end = self.wait_boot_end(m, log_offset) if self.prefetch else {}
            stats = m.stats()
        out = {"wall": m.seconds + t, **end,
               "cache_bytes": int((stats.get("cache") or {}).get("bytes", 0)),
               **kernel_counters(stats)}
        log(f"  {mode}: settling boot {out['wall']:.2f}s, then {end.get('boot_end_wait', 0):.1f}s "
            f"to the boot's end" + (f"; {end.get('objects_made_whole')} objects made whole"
                                    if mode == "kernel" else ""))
        return out

    def casfs_warm(self, wl: Workload, caches: dict[str, Path]) -> dict[str, Any]:
        """Each mode's first-boot cache settled (one boot run to its end, recording), then
        warm boots, the modes taking turns; they replay the settling boots' traces (one
        per mode, the same traces for both modes)."""
        modes = list(caches)
        if self.prefetch:
            self.guarded("deleting traces and packs from the store", self.clear_traces)
        settled: dict[str, Any] = {}
        for mode in modes:
            try:
                settled[mode] = self.settle(wl, caches[mode], mode)
            except Exception as exc:  # noqa: BLE001 - the warm boots are still measured
                log(f"ERROR [{wl.name}] {mode}: settling boot: {exc}")
                self.errors.append(f"[{wl.name}] {mode}: settling boot: {exc}")
                settled[mode] = {"status": "error", "note": str(exc)[:300]}

        def one(mode: str, i: int) -> dict[str, Any]:
            r = self.boot(wl, caches[mode], mode, self.quiet)
            self.log_boot(f"{mode}: warm run {i + 1}", r)
            return r

        out = self.interleaved(f"[{wl.name}] casfs warm cache", modes, one)
        for mode in modes:
            out[mode]["settle"] = settled[mode]
        return out

    def casfs_hot(self, wl: Workload, caches: dict[str, Path]) -> dict[str, Any]:
        """One mount per mode (each at its own mountpoint), all up at once, page cache
        warm; the modes take turns run by run."""
        with contextlib.ExitStack() as stack:
            mounts: dict[str, Mounted] = {}
            try:
                for mode, cache in caches.items():
                    m = stack.enter_context(self.mount(cache, mode, self.quiet,
                                                       mnt=self.run_dir / f"mnt-hot-{mode}"))
                    self.check_mode(m, mode)
                    mounts[mode] = m
                for m in mounts.values():
                    verify_workload(self.meta, m.mountpoint, wl, self.home)  # warm-up + paths
            except Exception as exc:  # noqa: BLE001 - reported in the results
                msg = f"[{wl.name}] casfs hot: mounting: {exc}"
                log("ERROR " + msg)
                self.errors.append(msg)
                return {mode: {"status": "error", "note": str(exc)[:300]} for mode in caches}

            def one(mode: str, i: int) -> dict[str, Any]:
                m = mounts[mode]
                before = stat_counters(m.stats())
                self.svc.proxy.reset()
                cpu0 = cpu_seconds(m.pid)
                t = self.workload(wl, m.mountpoint)
                cpu1 = cpu_seconds(m.pid)
                after = stat_counters(m.stats())
                pcount = self.svc.proxy_counters()
                return {"wall": t, "import": t, "requests": pcount["requests"],
                        "fetched_bytes": pcount["body_bytes_down"],
                        "read_bytes": after["read_bytes"] - before["read_bytes"],
                        "reads": after["reads"] - before["reads"], "rss_bytes": m.rss(),
                        "daemon_cpu": None if cpu0 is None or cpu1 is None else cpu1 - cpu0}

            return self.interleaved(f"[{wl.name}] casfs hot", list(mounts), one)

    # -- the store's traces ---------------------------------------------------------

    def list_keys(self, sub: str) -> list[str]:
        bucket, _, prefix = self.store.removeprefix("s3://").partition("/")
        client = s3_client(self.svc.seaweed.endpoint_url)
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=f"{prefix}/{sub}"):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def clear_traces(self) -> int:
        """Delete every trace and the packs traces wrote (docs/format.md: traces/,
        packs/), so the next workload's boots see only their own recording. The
        directory packs `casfs index` wrote stay: they are part of the indexed image."""
        bucket, _, prefix = self.store.removeprefix("s3://").partition("/")
        client = s3_client(self.svc.seaweed.endpoint_url)
        keys = self.list_keys("traces/")
        for key in self.list_keys("traces/m/"):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            pack = json.loads(decompress(body, 1 << 30, key)).get("pack")
            if isinstance(pack, str):
                keys.append(f"{prefix}/packs/{pack}")
        for key in dict.fromkeys(keys):
            client.delete_object(Bucket=bucket, Key=key)
        return len(keys)

    # -- driving --------------------------------------------------------------------

    def guarded(self, what: str, fn: Any, *a: Any) -> Any:
        """Run one scenario; a failure becomes an "error" row, not the end of the run."""
        busy = wait_for_quiet(self.args.quiet_wait) if self.args.quiet_wait > 0 else None
        load = os.getloadavg()[0]
        log(what + (f" (CPUs {busy:.0%} busy with other work)" if busy and busy > 0.25 else ""))
        try:
            out = fn(*a)
            res = out[0] if isinstance(out, tuple) else out
            if isinstance(res, dict) and "status" in res:
                res["loadavg_start"], res["cpu_busy_start"] = load, busy
            return out
        except Exception as exc:  # noqa: BLE001 - every failure is reported in the results
            msg = f"{what}: {exc}"
            log("ERROR " + msg)
            if self.args.verbose:
                traceback.print_exc()
            self.errors.append(msg)
            return {"status": "error", "note": str(exc)[:300]}

    def run(self, workloads: list[Workload]) -> list[dict[str, Any]]:
        scen: dict[str, dict[str, Any]] = {wl.name: {} for wl in workloads}
        # Per workload and mode, the casfs scenarios.
        per_mode: dict[str, dict[str, dict[str, Any]]] = {
            wl.name: {mode: {} for mode in self.modes} for wl in workloads}
        for wl in workloads:
            verify_workload(self.meta, self.root, wl, self.home)
            scen[wl.name]["native_cold"] = self.guarded(
                f"[{wl.name}] native cold", self.native_cold, wl)
            scen[wl.name]["native_warm"] = self.guarded(
                f"[{wl.name}] native warm", self.native_warm, wl)
        pulls = self.guarded("full pull", self.full_pull, workloads)
        for wl in workloads:
            scen[wl.name]["full_pull"] = (pulls.get(wl.name) if pulls.get("status") != "error"
                                          else pulls)
        for wl in workloads:
            pm = per_mode[wl.name]
            live = [mode for mode in self.modes if self.unsupported.get(mode) is None]
            for mode in self.modes:
                if mode not in live:
                    note = f"{mode} mode not measurable here: {self.unsupported[mode]}"
                    for key in ("casfs_first", "casfs_prefetched", "casfs_warm", "casfs_hot"):
                        pm[mode][key] = na(note)
            if not live:
                continue
            # Scenario by scenario, the modes side by side: first boots, warm and hot boots
            # take turns run by run; prefetched boots replay a trace of their own mode, so
            # each mode records and replays in turn.
            if self.prefetch:
                self.guarded("deleting traces and packs from the store", self.clear_traces)
            first, caches = self.casfs_first(wl, live)
            for mode in live:
                pm[mode]["casfs_first"] = first[mode]
            if self.args.no_prefetch_row:
                for mode, res in self.casfs_noprefetch(wl, live).items():
                    pm[mode]["casfs_noprefetch"] = res
            for mode in live:
                pm[mode]["casfs_prefetched"] = self.guarded(
                    f"[{wl.name}] {mode}: casfs prefetched boot", self.casfs_prefetched, wl,
                    mode)
            warm_caches = {m: caches[m] for m in live if first[m].get("status") == "ok"}
            for mode in live:
                if mode not in warm_caches:
                    pm[mode]["casfs_warm"] = pm[mode]["casfs_hot"] = {
                        "status": "error", "note": "no cache: the first boot failed"}
            if warm_caches:
                for mode, res in self.casfs_warm(wl, warm_caches).items():
                    pm[mode]["casfs_warm"] = res
                for mode, res in self.casfs_hot(wl, warm_caches).items():
                    pm[mode]["casfs_hot"] = res
            for cache in caches.values():
                shutil.rmtree(cache, ignore_errors=True)
        out = []
        for i, wl in enumerate(workloads):
            modes = {mode: {"scenarios": per_mode[wl.name][mode],
                            "targets": evaluate_mode(scen[wl.name], per_mode[wl.name], mode)}
                     for mode in self.modes}
            out.append({"name": wl.name, "code": wl.code, "primary": i == 0,
                        "scenarios": scen[wl.name], "modes": modes})
        return out


def evaluate_mode(reference: dict[str, Any], per_mode: dict[str, dict[str, Any]],
                  mode: str) -> list[dict[str, Any]]:
    """One mode's targets against the run's natives. Kernel mode's byte ratios take "the
    bytes the import reads" from the FUSE first boot of the same run (a kernel-mode mount
    counts only what its view serves)."""
    scenarios = {**reference, **per_mode[mode]}
    if mode == "kernel" and "fuse" in per_mode:
        scenarios[report.READS_REFERENCE] = per_mode["fuse"].get("casfs_first") or {}
    return report.evaluate_targets(scenarios)


def kernel_counters(stats: dict[str, Any]) -> dict[str, int]:
    """The kernel-mode counters of `casfs stats --json` ("kernel" section), prefixed."""
    k = stats.get("kernel")
    if not isinstance(k, dict):
        return {}
    return {f"kernel_{key}": int(v) for key, v in k.items() if isinstance(v, int | float)}


def _kernel_note(r: dict[str, Any]) -> str:
    if "kernel_native_opens" not in r:
        return ""
    return (f"; opens: {r['kernel_native_opens']} native, {r.get('kernel_view_opens', 0)} "
            f"through the view")


def view_log_size(cache: Path) -> int:
    """Where the node view's log ends now (kernel mode; 0 when there is none yet)."""
    try:
        return (cache / "logs" / "view.log").stat().st_size
    except OSError:
        return 0


_OBJECTS_RE = re.compile(r" (\S+): (\d+) objects made whole after the boot")


def objects_made_whole(m: Mounted, offset: int) -> int | None:
    """How many objects the node view made whole after this mount's boot (from its log,
    past ``offset``); None while it has not said."""
    if m.cache_dir is None:
        return None
    try:
        with open(m.cache_dir / "logs" / "view.log", "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    mnt = os.path.realpath(m.mountpoint)
    for where, n in _OBJECTS_RE.findall(text):
        if where == mnt:
            return int(n)
    return None


def upload_layers(svc: Services, meta: dict[str, Any]) -> None:
    client = s3_client(svc.seaweed.endpoint_url)
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou,
                             client.exceptions.BucketAlreadyExists):
        client.create_bucket(Bucket=OCI_BUCKET)
    for layer in meta["layers"]:
        client.upload_file(str(layer_blob_path(meta, layer)), OCI_BUCKET, layer["digest"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.coldstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="the small image (numpy alone), 2 runs per scenario")
    p.add_argument("--image", choices=sorted(IMAGES), help="override the image "
                   "(default: big, or small with --quick)")
    p.add_argument("--latency-ms", type=float, default=20.0,
                   help="added per request by the proxy in front of SeaweedFS (default 20)")
    p.add_argument("--runs", type=int, help="runs per scenario (default 3, --quick 2)")
    p.add_argument("--workloads", help="comma-separated workload names (default: all)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="serving modes to measure every casfs scenario in, side by side "
                   "(`casfs mount --mode`; default kernel,fuse)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    p.add_argument("--work", type=Path, default=WORK, help="cache of built images, scratch")
    p.add_argument("--stem", help="results file name stem (default <date>-coldstart[-quick])")
    p.add_argument("--rebuild", action="store_true", help="rebuild the image")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per workload run")
    p.add_argument("--no-prefetch-row", action="store_true",
                   help="also measure boots with --no-prefetch (plain lazy loading)")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="before each scenario, wait up to this many seconds for other work to "
                   "leave the CPUs idle (0: don't)")
    p.add_argument("--cold-agent", action="store_true",
                   help="leave casfs's own code out of the page cache too after each drop "
                   "(default: re-warm it with a throwaway mount, as on a node running casfs)")
    p.add_argument("--trace-idle", type=float,
                   help="--trace-idle for the recording boot (default: casfs's own)")
    p.add_argument("--trace-wait", type=float, default=120,
                   help="seconds to wait for a recording boot's trace to be saved")
    p.add_argument("-v", "--verbose", action="store_true")
    add_product_args(p)
    args = p.parse_args(argv)
    try:
        args.modes = parse_modes(args.modes)
    except ValueError as exc:
        p.error(str(exc))
    if args.runs is None:
        args.runs = 2 if args.quick else 3
    if args.image is None:
        args.image = "small" if args.quick else "big"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    exit_on_sigterm()
    t_start = time.perf_counter()
    spec = IMAGES[args.image]
    workloads = list(spec.workloads)
    if args.workloads:
        names = args.workloads.split(",")
        workloads = [w for w in workloads if w.name in names]
        if not workloads:
            raise SystemExit(f"no such workload in image {spec.name}: {args.workloads}")
    args.work.mkdir(parents=True, exist_ok=True)
    product = select_product(args.casfs_src, args.casfs_rev, args.work)
    log(f"casfs under test: {product['source']}")
    runs_base = args.work / "runs"
    cleanup_stale_runs(runs_base)
    meta = build_image(spec, args.work, rebuild=args.rebuild)
    root = native_root(meta, args.work)
    run_dir = fresh_dir(runs_base / f"coldstart-{os.getpid()}")
    machine = machine_info()
    results: dict[str, Any] = {"benchmark": "coldstart", "date": now_iso()}
    try:
        with services(args.latency_ms) as svc:
            bucket = svc.seaweed.make_bucket("casfs-bench")
            store = f"s3://{bucket}/casfs"
            log(f"indexing image {spec.name} into {store} (directly, not through the proxy)")
            idx = casfs_index(Path(meta["oci_dir"]), TAG, store, svc.env_direct)
            log(f"indexed in {idx.seconds:.1f}s: {idx.ref}")
            upload_layers(svc, meta)
            bench = ColdStart(args, spec, meta, root, svc, store, idx.ref, run_dir)
            wl_results = bench.run(workloads)
            results.update({
                "machine": machine,
                "revision": product["revision"],
                "product": product,
                "config": {"latency_ms": args.latency_ms, "runs": args.runs, "quick": args.quick,
                           "cold_agent": args.cold_agent,
                           "modes": bench.modes,
                           "modes_unsupported": {m: r for m, r in bench.unsupported.items()
                                                 if r},
                           "image": spec.name, "store": svc.note,
                           "workloads": [w.name for w in workloads],
                           "pull_concurrency": PULL_CONCURRENCY},
                "image": {**{k: v for k, v in meta.items() if k != "oci_dir"},
                          "manifest_ref": idx.ref, "index_seconds": idx.seconds},
                "page_cache": bench.pc.report(),
                "prefetch": {"supported": bench.prefetch,
                             "note": "casfs mount has --no-prefetch: prefetched rows measured"
                             if bench.prefetch else "not built yet (no --no-prefetch flag)"},
                "workloads": wl_results,
                "errors": bench.errors + INCIDENTS,
            })
    finally:
        cleanup_mounts_under(run_dir)
        stop_started_daemons()
        shutil.rmtree(run_dir, ignore_errors=True)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    results["machine"]["loadavg_end"] = os.getloadavg()
    stem = args.stem or report.unique_stem(
        args.out, f"{today()}-coldstart" + ("-quick" if args.quick else ""))
    paths = report.write_reports(results, args.out, stem)
    print(report.render_console(results))
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    log(f"coldstart finished in {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
