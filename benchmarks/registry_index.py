"""Indexing from a registry versus from the OCI layout on disk: wall time and peak RSS.

    python -m benchmarks.registry_index [--reps 3] [--random-mb 256] [--out DIR] [--no-drop]

The image (built once, cached under benchmarks/work/registry-index/): the Python prefix
(stdlib), numpy's installed tree, and one layer holding a file of incompressible random
data, all gzip: a few hundred MB. It is pushed with skopeo (digests preserved) into Debian's
docker-registry, started here on a free port (filesystem storage, plain http, same machine:
no network latency) and stopped by PID.

Each run is a fresh `casfs index … -q` process into a fresh file store; wall time is the
whole process (interpreter start-up included), peak RSS is the process's ru_maxrss (from
wait4). The page cache is dropped before each run (unless --no-drop), so the layout path
reads its blobs from disk and the registry reads them from disk too. Also measured: a
re-index from the registry into the same store (layer records exist: no layer download),
and peak RSS of registry indexing for single-layer images of two sizes (zstd, random
data), which should not grow with the layer.

Writes ``<out>/<date>-registry-index.{json,md}`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    WORK,
    PageCache,
    casfs_argv,
    log,
    machine_info,
    now_iso,
    summarize,
    today,
)
from casfs.testing import ocibuild as ob
from casfs.testing.registry import FaultProxy, RegistryServer, registry_available, skopeo_push

BENCH_WORK = WORK / "registry-index"
TAG = "v1"
BUILD_VERSION = 1


def _random_bytes(n: int, seed: int) -> bytes:
    """n incompressible bytes, reproducibly (SHAKE-256 of the seed)."""
    out = bytearray()
    block = 64 << 20
    for i in range(0, n, block):
        out += hashlib.shake_256(f"{seed}-{i}".encode()).digest(min(block, n - i))
    return bytes(out)


def _cached_layout(name: str, key: str, build: Any) -> Path:
    base = BENCH_WORK / "images" / name
    stamp = base / "key"
    if stamp.exists() and stamp.read_text() == key and (base / "oci" / "index.json").exists():
        log(f"image {name}: cached")
        return base / "oci"
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    t0 = time.perf_counter()
    build(base / "oci")
    stamp.write_text(key)
    log(f"image {name}: built in {time.perf_counter() - t0:.0f}s")
    return base / "oci"


def build_main_image(random_mb: int) -> Path:
    import numpy

    numpy_dir = Path(numpy.__file__).parent
    key = hashlib.sha256(json.dumps([BUILD_VERSION, random_mb, sys.version, str(numpy_dir),
                                     numpy.__version__]).encode()).hexdigest()[:16]

    def build(oci: Path) -> None:
        site = "usr/lib/python3/site-packages"
        log("collecting the Python prefix")
        prefix = ob.python_prefix_layer(include_pycache=True)
        log("collecting numpy")
        numpy_members = ob.parent_dirs(f"{site}/numpy") + ob.layer_from_directory(
            numpy_dir, f"{site}/numpy", mtime=ob.DEFAULT_MTIME)
        log(f"generating {random_mb} MB of random data")
        data = [*ob.parent_dirs("data/x"), ob.file("data/weights.bin", _random_bytes(random_mb << 20, 7))]
        layers = []
        for label, members in (("prefix", prefix), ("numpy", numpy_members), ("random", data)):
            log(f"compressing layer {label}")
            layer = ob.Layer.from_members(members, "gzip")
            _ = layer.blob
            layers.append(layer)
        ob.write_oci_layout(oci, layers, tag=TAG)

    return _cached_layout(f"main-{random_mb}", key, build)


def build_single_layer(mb: int) -> Path:
    key = f"{BUILD_VERSION}-{mb}"

    def build(oci: Path) -> None:
        members = [*ob.parent_dirs("data/x"), ob.file("data/blob.bin", _random_bytes(mb << 20, mb))]
        ob.write_oci_layout(oci, [ob.Layer.from_members(members, "zstd")], tag=TAG)

    return _cached_layout(f"single-{mb}", key, build)


def build_quad() -> Path:
    """Four 48 MB layers of random data (zstd): for parallel downloads."""
    def build(oci: Path) -> None:
        layers = [[*ob.parent_dirs("data/x"), ob.file(f"data/part{i}.bin", _random_bytes(48 << 20, 100 + i))]
                  for i in range(4)]
        ob.write_oci_layout(oci, [ob.Layer.from_members(m, "zstd") for m in layers], tag=TAG)

    return _cached_layout("quad", f"{BUILD_VERSION}", build)


def layout_info(oci: Path) -> dict[str, Any]:
    index = json.loads((oci / "index.json").read_text())
    mdigest = index["manifests"][0]["digest"]
    manifest = json.loads((oci / "blobs" / "sha256" / mdigest[7:]).read_text())
    return {"manifest_digest": mdigest, "layers": len(manifest["layers"]),
            "compressed_bytes": sum(lay["size"] for lay in manifest["layers"])}


# Forks and execs argv from a small process, so that the child's ru_maxrss is its own: a
# child forked straight from this process would report this process's RSS at exec time.
_WRAPPER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
sys.stderr.write("\\n" + json.dumps({"rc": os.waitstatus_to_exitcode(status),
    "seconds": time.perf_counter() - t0, "maxrss": usage.ru_maxrss * 1024}) + "\\n")
"""


def _run_measured(argv: list[str]) -> tuple[int, str, str, float, int]:
    """Run argv; (returncode, stdout, stderr, seconds, peak RSS bytes of argv's process)."""
    proc = subprocess.run([sys.executable, "-S", "-c", _WRAPPER, *argv], capture_output=True,
                          text=True)
    err, _, last = proc.stderr.rstrip("\n").rpartition("\n")
    m = json.loads(last)
    return m["rc"], proc.stdout, err, m["seconds"], m["maxrss"]


def index_once(ref: str, store: Path, extra: list[str]) -> dict[str, Any]:
    argv = [*casfs_argv(), "index", ref, "--store", f"file://{store}", *extra]
    rc, out, err, seconds, rss = _run_measured(argv)
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({rc}): {err.strip()[-2000:]}")
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return {"seconds": seconds, "maxrss_bytes": rss, "ref": lines[-1], "summary": lines[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--random-mb", type=int, default=256, help="size of the random-data layer")
    p.add_argument("--rss-sizes", default="64,512", help="single-layer sizes (MB) for the RSS check")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--no-drop", action="store_true", help="keep the page cache between runs")
    p.add_argument("--link-mbps", type=float, default=20.0,
                   help="per-connection bandwidth of the throttled proxy (MB/s) for the "
                   "parallel-download comparison")
    args = p.parse_args(argv)
    why = registry_available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    cache = PageCache()
    main_oci = build_main_image(args.random_mb)
    singles = {int(s): build_single_layer(int(s)) for s in args.rss_sizes.split(",") if s}
    quad = build_quad()
    scratch = BENCH_WORK / "runs"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    results: dict[str, Any] = {"date": now_iso(), "machine": machine_info(),
                               "image": layout_info(main_oci), "reps": args.reps}
    with RegistryServer(scratch / "registry") as reg:
        log(f"registry on {reg.host} (pid {reg.proc.pid if reg.proc else '?'})")
        t0 = time.perf_counter()
        skopeo_push(main_oci, TAG, f"{reg.host}/bench/main:{TAG}")
        for mb, oci in singles.items():
            skopeo_push(oci, TAG, f"{reg.host}/bench/single{mb}:{TAG}")
        skopeo_push(quad, TAG, f"{reg.host}/bench/quad:{TAG}")
        log(f"pushed in {time.perf_counter() - t0:.1f}s")
        sources = {
            "layout": (f"oci:{main_oci}:{TAG}", []),
            "registry": (f"docker://{reg.host}/bench/main:{TAG}", ["--tls-verify=false", "-q"]),
        }
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sources}
        reindex: list[dict[str, Any]] = []
        for rep in range(args.reps):
            for name, (ref, extra) in sources.items():
                store = scratch / f"store-{name}-{rep}"
                if not args.no_drop:
                    cache.drop()
                r = index_once(ref, store, extra if name == "registry" else [])
                log(f"{name} #{rep + 1}: {r['seconds']:.2f}s, peak RSS {r['maxrss_bytes'] / 1e6:.0f} MB"
                    f" -> {r['ref'][:26]}")
                runs[name].append(r)
                if name == "registry":
                    again = index_once(ref, store, extra)
                    log(f"registry re-index #{rep + 1}: {again['seconds']:.2f}s")
                    reindex.append(again)
                shutil.rmtree(store)
        refs = {r["ref"] for rs in runs.values() for r in rs}
        rss_by_size = {}
        for mb in singles:
            vals = []
            for rep in range(args.reps):
                store = scratch / f"store-single{mb}-{rep}"
                r = index_once(f"docker://{reg.host}/bench/single{mb}:{TAG}", store,
                               ["--tls-verify=false", "-q"])
                vals.append(r)
                shutil.rmtree(store)
            rss_by_size[mb] = {"seconds": summarize([v["seconds"] for v in vals]),
                               "maxrss_bytes": summarize([v["maxrss_bytes"] for v in vals])}
            log(f"single {mb} MB layer from the registry: peak RSS "
                f"{rss_by_size[mb]['maxrss_bytes']['median'] / 1e6:.0f} MB")
        # Parallel layer downloads, over links of limited bandwidth per connection (a proxy
        # that sleeps per 64 KiB relayed): 1 layer at a time versus the default.
        parallel: dict[str, Any] = {}
        with FaultProxy(reg.host) as proxy:
            proxy.throttle = (64 << 10) / (args.link_mbps * 1e6)
            for jobs in (1, 3):
                vals = []
                for rep in range(args.reps):
                    store = scratch / f"store-quad-{jobs}-{rep}"
                    vals.append(index_once(f"docker://{proxy.host}/bench/quad:{TAG}", store,
                                           ["--tls-verify=false", "-q", "--layer-jobs", str(jobs)]))
                    shutil.rmtree(store)
                parallel[str(jobs)] = {"seconds": summarize([v["seconds"] for v in vals]),
                                       "maxrss_bytes": summarize([v["maxrss_bytes"] for v in vals])}
                log(f"quad image over {args.link_mbps:g} MB/s links, {jobs} layer(s) at once: "
                    f"{parallel[str(jobs)]['seconds']['median']:.2f}s")
        results["parallel"] = {"link_mbps": args.link_mbps, "image": layout_info(quad),
                               "by_jobs": parallel}
    summary = runs["layout"][0]["summary"]
    results.update({
        "same_manifest": len(refs) == 1,
        "manifest_ref": sorted(refs),
        "layout_summary": summary,
        "layout": {"seconds": summarize([r["seconds"] for r in runs["layout"]]),
                   "maxrss_bytes": summarize([r["maxrss_bytes"] for r in runs["layout"]])},
        "registry": {"seconds": summarize([r["seconds"] for r in runs["registry"]]),
                     "maxrss_bytes": summarize([r["maxrss_bytes"] for r in runs["registry"]])},
        "registry_reindex": {"seconds": summarize([r["seconds"] for r in reindex]),
                             "maxrss_bytes": summarize([r["maxrss_bytes"] for r in reindex])},
        "rss_by_layer_mb": rss_by_size,
        "page_cache": cache.report() if not args.no_drop else "kept",
    })
    md = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"{today()}-registry-index"
    base.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    base.with_suffix(".md").write_text(md)
    print(md)
    log(f"wrote {base}.json and .md")
    return 0


def render(r: dict[str, Any]) -> str:
    lay, reg, again = r["layout"], r["registry"], r["registry_reindex"]
    ratio = reg["seconds"]["median"] / lay["seconds"]["median"]
    img = r["image"]
    lines = [
        f"Image: {img['layers']} gzip layers, {img['compressed_bytes'] / 1e6:.0f} MB compressed "
        f"({r['layout_summary'].split(': ', 1)[-1]}). Registry: Debian docker-registry on the "
        "same machine (plain http, filesystem storage, no added latency). Median of "
        f"{r['reps']} runs, each a fresh `casfs index` process into a fresh file store"
        + (", page cache dropped before each." if r["page_cache"] != "kept" else ", page cache warm."),
        "",
        "| source | wall time | peak RSS |",
        "|---|---|---|",
        f"| OCI layout on disk | {lay['seconds']['median']:.2f} s | {lay['maxrss_bytes']['median'] / 1e6:.0f} MB |",
        f"| registry | {reg['seconds']['median']:.2f} s ({ratio:.2f}× the layout) | "
        f"{reg['maxrss_bytes']['median'] / 1e6:.0f} MB |",
        f"| registry, re-index (layer records exist) | {again['seconds']['median']:.2f} s | "
        f"{again['maxrss_bytes']['median'] / 1e6:.0f} MB |",
        "",
        "Peak RSS indexing a single-layer image (random data, zstd) from the registry: "
        + ", ".join(f"{mb} MB layer: {v['maxrss_bytes']['median'] / 1e6:.0f} MB"
                    for mb, v in r["rss_by_layer_mb"].items()) + ".",
        "",
        f"Parallel layer downloads: an image of {r['parallel']['image']['layers']} layers of "
        f"{r['parallel']['image']['compressed_bytes'] / r['parallel']['image']['layers'] / 1e6:.0f} MB "
        f"(random data, zstd) from the registry through a proxy limiting each connection to "
        f"{r['parallel']['link_mbps']:g} MB/s: "
        + ", ".join(f"{jobs} layer{'s' if jobs != '1' else ''} at once "
                    f"{v['seconds']['median']:.2f} s (peak RSS {v['maxrss_bytes']['median'] / 1e6:.0f} MB)"
                    for jobs, v in r["parallel"]["by_jobs"].items()) + ".",
        "",
        f"Same casfs manifest from both sources: {'yes' if r['same_manifest'] else 'NO'} "
        f"({', '.join(x[:26] + '…' for x in r['manifest_ref'])}).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
