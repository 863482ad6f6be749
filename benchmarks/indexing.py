"""Indexing throughput: `casfs index` of the big image into the file store and into
SeaweedFS, and a re-index of the same image (which should read only layer records).

    python -m benchmarks.indexing [--image big] [--latency-ms 0] [--out DIR]

Throughput is MB/s of uncompressed layer data over the wall time of the whole
`casfs index` process (interpreter start-up included: it is what a user waits for). The
indexer's own figure (its "in N s") and the CPU seconds the process used are reported
beside it. The page cache is dropped before each first index. SeaweedFS is written
directly, or through the latency proxy with --latency-ms > 0; a tiny image is indexed into
the bucket first so SeaweedFS's one-off volume allocation for a new bucket is not counted.
Writes ``<out>/<date>-indexing.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    WORK,
    PageCache,
    add_product_args,
    casfs_index,
    exit_on_sigterm,
    fresh_dir,
    log,
    machine_info,
    now_iso,
    select_product,
    services,
    today,
    wait_for_quiet,
)
from benchmarks.images import IMAGES, TAG, build_image
from benchmarks.report import fmt_bytes, publish, unique_stem

THROUGHPUT_TARGET = 100e6  # bytes/s of uncompressed layer data
REINDEX_TARGET = 0.10  # re-index time / first index time

# casfs index's summary: "... 2 layers (0 already indexed), 98.1 MB, 2,883 new blobs
# (33.2 MB stored) in 2.57s" (sizes as casfs.progress.human_bytes writes them)
_LINE = re.compile(r"indexed .*?: ([\d,]+) layers? \(([\d,]+) already indexed\), "
                   r"([\d.]+ [KMGT]?B), ([\d,]+) new blobs? \(([\d.]+ [KMGT]?B) stored\) "
                   r"in ([\d.]+)s")
_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _size(text: str) -> int:
    """'98.1 MB' -> 98100000 (to the precision casfs printed)."""
    number, unit = text.split()
    return int(float(number) * _UNITS[unit])


def _int(text: str) -> int:
    return int(text.replace(",", ""))


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def index_once(oci_dir: Path, store: str, env: dict[str, str], uncompressed: int,
               label: str) -> dict[str, Any]:
    cpu0 = _children_cpu()
    run = casfs_index(oci_dir, TAG, store, env)
    cpu = _children_cpu() - cpu0
    m = _LINE.search(run.stdout)
    out: dict[str, Any] = {"label": label, "wall": run.seconds, "cpu_seconds": cpu,
                           "ref": run.ref, "mb_per_s": uncompressed / run.seconds / 1e6}
    if m:
        out.update({"layers": _int(m[1]), "layers_reused": _int(m[2]), "bytes": _size(m[3]),
                    "new_blobs": _int(m[4]), "stored_bytes": _size(m[5]),
                    "indexer_seconds": float(m[6])})
    log(f"  {label}: {run.seconds:.1f}s wall ({out['mb_per_s']:.0f} MB/s), "
        f"{cpu:.1f} CPU s" + (f", {out.get('new_blobs')} new blobs" if m else ""))
    return out


def bench_store(name: str, store: str, env: dict[str, str], meta: dict[str, Any],
                pc: PageCache) -> dict[str, Any]:
    oci = Path(meta["oci_dir"])
    wait_for_quiet(60)
    pc.drop()
    first = index_once(oci, store, env, meta["uncompressed_bytes"], f"{name}: first index")
    again = index_once(oci, store, env, meta["uncompressed_bytes"], f"{name}: re-index")
    return {"store": name, "first": first, "reindex": again,
            "reindex_ratio": again["wall"] / first["wall"]}


def render(res: dict[str, Any]) -> str:
    img = res["image"]
    lines = [
        f"# casfs indexing benchmark, {res['date']}",
        "",
        f"Image **{img['name']}** ({img['description']}): "
        f"{fmt_bytes(img['uncompressed_bytes'])} uncompressed in {len(img['layers'])} layers "
        f"({fmt_bytes(img['compressed_bytes'])} gzip), {img['files']:,} files. Machine: "
        f"{res['machine']['nproc']} CPUs, kernel {res['machine']['kernel']}. casfs "
        f"{res['product']['source']}. SeaweedFS: {res['seaweed_note']}.",
        "",
        "| store | first index s | MB/s (uncompressed) | CPU s | indexer's own s | new blobs | "
        "stored | re-index s | re-index / first |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["stores"]:
        f, a = r["first"], r["reindex"]
        lines.append(
            f"| {r['store']} | {f['wall']:.1f} | {f['mb_per_s']:.0f} | {f['cpu_seconds']:.1f} | "
            f"{f.get('indexer_seconds', float('nan')):.1f} | {f.get('new_blobs', '?'):,} | "
            f"{fmt_bytes(f.get('stored_bytes'))} | {a['wall']:.2f} | {r['reindex_ratio']:.1%} |")
    lines += ["", "| target (brief) | measured | |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | {t['measured_text']} | "
                     f"{'met' if t['met'] else 'NOT met'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.indexing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", choices=sorted(IMAGES), default="big")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="index into SeaweedFS through the proxy with this latency (default: "
                   "directly)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--stem", help="results file name stem (default <date>-indexing)")
    add_product_args(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    product = select_product(args.casfs_src, args.casfs_rev, args.work)
    meta = build_image(IMAGES[args.image], args.work)
    toy = build_image(IMAGES["toy"], args.work)
    pc = PageCache()
    run_dir = fresh_dir(args.work / "runs" / f"indexing-{os.getpid()}")
    stores = []
    try:
        log("file store")
        stores.append(bench_store("file", f"file://{run_dir}/store", None, meta, pc))
        shutil.rmtree(run_dir / "store", ignore_errors=True)
        with services(args.latency_ms) as svc:
            bucket = svc.seaweed.make_bucket("casfs-index")
            env = svc.env_proxy if args.latency_ms > 0 else svc.env_direct
            note = (f"through the proxy ({args.latency_ms:g} ms per request)"
                    if args.latency_ms > 0 else "written directly (no proxy)")
            casfs_index(Path(toy["oci_dir"]), TAG, f"s3://{bucket}/warmup", env)  # volumes
            log(f"SeaweedFS, {note}")
            stores.append(bench_store("SeaweedFS", f"s3://{bucket}/casfs", env, meta, pc))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    first = max(s["first"]["wall"] for s in stores)
    worst_mbps = min(s["first"]["mb_per_s"] for s in stores)
    worst_ratio = max(s["reindex_ratio"] for s in stores)
    targets = [
        {"target": "indexing ≥ 100 MB/s of uncompressed layer data (slowest store)",
         "measured": worst_mbps * 1e6, "measured_text": f"{worst_mbps:.0f} MB/s",
         "met": worst_mbps * 1e6 >= THROUGHPUT_TARGET},
        {"target": "re-index ≤ 10% of the first index (worst store)",
         "measured": worst_ratio, "measured_text": f"{worst_ratio:.1%}",
         "met": worst_ratio <= REINDEX_TARGET},
    ]
    res = {"benchmark": "indexing", "date": now_iso(), "machine": machine_info(),
           "product": product, "seaweed_note": note,
           "image": {k: v for k, v in meta.items() if k != "oci_dir"},
           "stores": stores, "targets": targets, "page_cache": pc.report(),
           "slowest_first_index_seconds": first,
           "seconds": round(time.perf_counter() - t_start, 1)}
    publish(res, args.out, args.stem or unique_stem(args.out, f"{today()}-indexing"), render)
    log(f"indexing finished in {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
