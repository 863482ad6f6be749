"""Model weights: loading a multi-GB safetensors model from casfs, from local disk and
from a direct download of the same files, all from the same SeaweedFS behind the latency
proxy.

    python -m benchmarks.weights [--size-gb 2.2] [--shards 4] [--latency-ms 20]
                                 [--modes fuse,kernel] [--runs 1]

In one run:
- a synthetic model made on the spot (numpy + safetensors, no download): --shards
  safetensors files of float16 tensors (4096 x 4096 and smaller, like a transformer's),
  --size-gb in all, with a config.json and a tokenizer.json beside them;
- indexed twice: as a directory (`casfs index tree:<dir> --tag ...`) and inside an OCI
  image (one layer holding the same directory): the same chunks, so the second index
  uploads nothing new;
- loaded, in a fresh Python process per load (the interpreter and the imports are not
  timed), two ways: every tensor through safetensors' memory-mapped reader into numpy
  arrays ("mmap"), and `safetensors.torch.load_file` into torch tensors ("torch");
  plus one tensor out of the many (`safe_open(...).get_tensor(name)`: a partial read);
- from: local disk with the page cache dropped; casfs first read (empty cache dir, fresh
  mount, page cache dropped: mount time reported apart); casfs warm (cache dir kept, fresh
  mount, page cache dropped); casfs hot (same mount, page cache warm); and a direct
  download of the shards from the same store with boto3's transfer manager (the code a
  user would write instead: `download_file`, 8 MiB parts, 10 threads) followed by the
  load from the downloaded files. casfs rows in each serving mode asked for (--modes).
Writes ``<out>/<date>-weights.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    WORK,
    PageCache,
    Services,
    add_product_args,
    casfs_mount,
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
    today,
    wait_for_quiet,
)
from benchmarks.report import fmt_bytes, publish, unique_stem

MODEL_DIR = "models/synthetic"  # where the model sits inside the image
TREE_TAG = "weights-synthetic-v1"
IMAGE_TAG = "weights-image-v1"
RAW_BUCKET = "raw-weights"
HIDDEN = 4096
LOADERS = ("mmap", "torch")

# -- the model -----------------------------------------------------------------------------


def _tensor_plan(total_bytes: int, shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensor names and shapes per shard: transformer-like layers (attention and MLP
    matrices, norms) until total_bytes of float16."""
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[] for _ in range(shards)]
    per_shard = total_bytes / shards
    sizes = [0] * shards
    layer = 0
    shard = 0
    while sum(sizes) < total_bytes:
        block = [
            (f"model.layers.{layer}.input_layernorm.weight", (HIDDEN,)),
            (f"model.layers.{layer}.self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (f"model.layers.{layer}.self_attn.k_proj.weight", (HIDDEN // 4, HIDDEN)),
            (f"model.layers.{layer}.self_attn.v_proj.weight", (HIDDEN // 4, HIDDEN)),
            (f"model.layers.{layer}.self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (f"model.layers.{layer}.post_attention_layernorm.weight", (HIDDEN,)),
            (f"model.layers.{layer}.mlp.down_proj.weight", (HIDDEN, HIDDEN * 2)),
        ]
        for name, shape in block:
            n = 2
            for d in shape:
                n *= d
            plan[shard].append((name, shape))
            sizes[shard] += n
        if sizes[shard] >= per_shard and shard < shards - 1:
            shard += 1
        layer += 1
    return plan


def build_model(work: Path, size_gb: float, shards: int, seed: int = 1) -> dict[str, Any]:
    """The synthetic model under work/weights-<key>/model (made once, then reused)."""
    import numpy as np
    from safetensors.numpy import save_file

    key = hashlib.sha256(f"v1 {size_gb} {shards} {seed}".encode()).hexdigest()[:12]
    base = work / f"weights-{key}"
    model = base / "model"
    meta_path = base / "meta.json"
    if meta_path.exists() and model.is_dir():
        meta = json.loads(meta_path.read_text())
        meta["probe"] = _probe(model)
        return meta
    if base.exists():
        shutil.rmtree(base)
    model.mkdir(parents=True)
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    plan = _tensor_plan(int(size_gb * 1e9), shards)
    files: list[dict[str, Any]] = []
    index: dict[str, str] = {}
    for i, tensors in enumerate(plan):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        arrays = {}
        for tname, shape in tensors:
            arrays[tname] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)
            index[tname] = name
        save_file(arrays, str(model / name), metadata={"format": "pt"})
        files.append({"name": name, "bytes": (model / name).stat().st_size,
                      "tensors": len(tensors)})
        del arrays
        log(f"  {name}: {fmt_bytes(files[-1]['bytes'])}, {len(tensors)} tensors")
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(f["bytes"] for f in files)}, "weight_map": index},
        indent=1))
    (model / "config.json").write_text(json.dumps(
        {"architectures": ["SyntheticForCausalLM"], "hidden_size": HIDDEN,
         "num_hidden_layers": len(index) // 7, "torch_dtype": "float16"}, indent=1))
    (model / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {f"tok{i}": i for i in range(20000)}}}))
    meta = {"dir": str(model), "files": files, "probe": _probe(model), "key": key,
            "bytes": sum(f.stat().st_size for f in model.iterdir()),
            "tensors": len(index), "build_seconds": round(time.perf_counter() - t0, 1)}
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


def _probe(model: Path) -> dict[str, Any]:
    """The tensor a partial load reads: the middle query projection (4096 x 4096, 32 MiB)
    of the middle shard, found from the shard's safetensors header."""
    shards = sorted(p for p in model.iterdir() if p.name.endswith(".safetensors"))
    shard = shards[len(shards) // 2]
    with open(shard, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    names = sorted((k for k in header if k.endswith("q_proj.weight")),
                   key=lambda k: header[k]["data_offsets"][0])
    name = names[len(names) // 2]
    start, end = header[name]["data_offsets"]
    return {"file": shard.name, "tensor": name, "bytes": end - start}


def build_image(meta: dict[str, Any]) -> Path:
    """An OCI layout holding the model directory as one uncompressed layer, under
    /models/synthetic (weights do not compress: a gzip layer only costs CPU)."""
    model = Path(meta["dir"])
    oci = model.parent / "oci"
    if (oci / "index.json").exists():
        return oci
    if oci.exists():
        shutil.rmtree(oci)
    blobs = oci / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    tmp = oci / "layer.tmp"
    with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w",
                                            format=tarfile.PAX_FORMAT) as tar:
        parts = MODEL_DIR.split("/")
        for i in range(len(parts)):
            info = tarfile.TarInfo("/".join(parts[: i + 1]))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
            tar.addfile(info)
        for path in sorted(model.iterdir()):
            info = tar.gettarinfo(str(path), f"{MODEL_DIR}/{path.name}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as src:
                tar.addfile(info, src)
    layer_digest = _sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, blobs / layer_digest)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
    }).encode()
    config_digest = _put_blob(blobs, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": f"sha256:{config_digest}", "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": f"sha256:{layer_digest}", "size": size}],
    }).encode()
    manifest_digest = _put_blob(blobs, manifest)
    (oci / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (oci / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": f"sha256:{manifest_digest}", "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}))
    return oci


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(8 << 20):
            h.update(data)
    return h.hexdigest()


def _put_blob(blobs: Path, data: bytes) -> str:
    digest = hashlib.sha256(data).hexdigest()
    (blobs / digest).write_bytes(data)
    return digest


# -- loading ------------------------------------------------------------------------------

LOADER = r"""
import json, os, sys, time
mode, root = sys.argv[1], sys.argv[2]
from safetensors import safe_open
if mode in ("torch", "one"):
    import torch
    from safetensors.torch import load_file
import numpy
files = sorted(p for p in os.listdir(root) if p.endswith(".safetensors"))
t0 = time.perf_counter()
n = 0
count = 0
# Every byte is read: a tensor over the file's mapping is copied once into memory of its
# own (what moving it to a device does), so nothing lazily mapped goes unread.
if mode == "mmap":
    for name in files:
        with safe_open(os.path.join(root, name), framework="np") as f:
            for key in f.keys():
                a = numpy.array(f.get_tensor(key), copy=True)
                n += a.nbytes
                count += 1
                del a
elif mode == "torch":
    for name in files:
        tensors = {k: t.clone() for k, t in load_file(os.path.join(root, name)).items()}
        n += sum(t.numel() * t.element_size() for t in tensors.values())
        count += len(tensors)
        del tensors
else:
    with safe_open(os.path.join(root, sys.argv[3]), framework="pt") as f:
        t = f.get_tensor(sys.argv[4]).clone()
        n, count = t.numel() * t.element_size(), 1
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": n, "tensors": count}))
"""


def load(mode: str, root: Path, probe: dict[str, Any] | None = None) -> dict[str, Any]:
    """One load in a fresh interpreter; its own timing (imports excluded)."""
    argv = [sys.executable, "-c", LOADER, mode, str(root)]
    if mode == "one":
        assert probe is not None
        argv += [probe["file"], probe["tensor"]]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"loader {mode} on {root} failed: {p.stderr[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_wall"] = wall
    out["mb_per_s"] = out["bytes"] / out["seconds"] / 1e6
    return out


# -- the run --------------------------------------------------------------------------------


class Weights:
    def __init__(self, args: argparse.Namespace, svc: Services, run_dir: Path,
                 meta: dict[str, Any]) -> None:
        self.args = args
        self.svc = svc
        self.run_dir = run_dir
        self.meta = meta
        self.pc = PageCache()
        self.bucket = svc.seaweed.make_bucket("casfs-weights")
        self.store = f"s3://{self.bucket}/casfs"
        self.rows: list[dict[str, Any]] = []

    def row(self, scenario: str, loader: str, r: dict[str, Any], **extra: Any) -> None:
        r = {"scenario": scenario, "loader": loader, **r, **extra}
        self.rows.append(r)
        log(f"  {scenario:38s} {loader:5s} {r['seconds']:7.2f} s  {r['mb_per_s']:7.0f} MB/s"
            + (f"  fetched {fmt_bytes(r['fetched_bytes'])}" if "fetched_bytes" in r else ""))

    def index(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for what, ref, tag in (("tree", f"tree:{self.meta['dir']}", TREE_TAG),
                               ("image", f"oci:{build_image(self.meta)}:latest", IMAGE_TAG)):
            t0 = time.perf_counter()
            p = run_casfs(["index", ref, "--store", self.store, "--tag", tag],
                          self.svc.env_direct)
            seconds = time.perf_counter() - t0
            out[what] = {"seconds": seconds, "ref": p.stdout.strip().splitlines()[-1],
                         "summary": p.stdout.strip().splitlines()[0],
                         "mb_per_s": self.meta["bytes"] / seconds / 1e6}
            log(f"indexed the {what} in {seconds:.1f}s: {out[what]['summary']}")
        # Re-index of the directory with one shard changed (a fine-tune of one layer):
        # only that shard's changed chunks are uploaded.
        return out

    def local(self) -> None:
        root = Path(self.meta["dir"])
        for loader in LOADERS:
            self.pc.drop()
            self.row("local disk, page cache dropped", loader, load(loader, root))
        self.pc.drop()
        self.row("local disk, page cache dropped", "one", load("one", root, self.meta["probe"]))

    def download(self) -> None:
        """boto3's transfer manager from the same store through the same proxy."""
        from boto3.s3.transfer import TransferConfig

        direct = s3_client(self.svc.seaweed.endpoint_url)
        direct.create_bucket(Bucket=RAW_BUCKET)
        root = Path(self.meta["dir"])
        for f in sorted(root.iterdir()):
            direct.upload_file(str(f), RAW_BUCKET, f"model/{f.name}")
        proxied = s3_client(self.svc.proxy.url, max_pool=64)
        config = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=10)
        for loader in (*LOADERS, "one"):
            dest = fresh_dir(self.run_dir / "download")
            self.pc.drop()
            self.svc.proxy.reset()
            t0 = time.perf_counter()
            names = [f.name for f in sorted(root.iterdir())]
            if loader == "one":  # what a user downloads to read one tensor: its shard
                names = [self.meta["probe"]["file"]]
            for name in names:
                proxied.download_file(RAW_BUCKET, f"model/{name}", str(dest / name),
                                      Config=config)
            dl = time.perf_counter() - t0
            r = load(loader, dest, self.meta["probe"])
            fetched = self.svc.proxy_counters()["body_bytes_down"]
            r.update({"download_seconds": dl, "load_seconds": r["seconds"],
                      "fetched_bytes": fetched})
            r["seconds"] = dl + r["load_seconds"]
            r["mb_per_s"] = r["bytes"] / r["seconds"] / 1e6
            self.row("direct download (boto3 transfer manager) + load", loader, r)
            shutil.rmtree(dest, ignore_errors=True)

    def casfs(self, ref: str, what: str, mode: str, hot: bool = True) -> None:
        mnt = self.run_dir / "mnt"
        cache = self.run_dir / f"cache-{what}-{mode}"
        flags = ["--no-trace", "--mode", mode]
        inside = mnt / (MODEL_DIR if what == "image" else "")
        label = f"casfs {what}, {mode}"
        for loader in (*LOADERS, "one"):
            fresh_dir(cache)
            self.pc.drop()
            self.svc.proxy.reset()
            t0 = time.perf_counter()
            with casfs_mount(ref, mnt, self.store, cache, self.svc.env_proxy, flags) as m:
                mount_s = time.perf_counter() - t0
                r = load(loader, inside, self.meta["probe"])
                r.update(self._counters(m), mount_seconds=mount_s)
            self.row(f"{label}: first read (empty cache)", loader, r)
        # The cache of the last first read holds the probe only: fill it for warm runs.
        fresh_dir(cache)
        with casfs_mount(ref, mnt, self.store, cache, self.svc.env_proxy, flags):
            load("mmap", inside)
        for loader in (*LOADERS, "one"):
            self.pc.drop()
            self.svc.proxy.reset()
            t0 = time.perf_counter()
            with casfs_mount(ref, mnt, self.store, cache, self.svc.env_proxy, flags) as m:
                mount_s = time.perf_counter() - t0
                r = load(loader, inside, self.meta["probe"])
                r.update(self._counters(m), mount_seconds=mount_s)
                self.row(f"{label}: warm (cache on disk)", loader, r)
                if hot:
                    r = load(loader, inside, self.meta["probe"])
                    r.update(self._counters(m))
                    self.row(f"{label}: hot (same mount, page cache)", loader, r)
        shutil.rmtree(cache, ignore_errors=True)

    def _counters(self, m: Any) -> dict[str, Any]:
        pc = self.svc.proxy_counters()
        out: dict[str, Any] = {"requests": pc["requests"], "fetched_bytes": pc["body_bytes_down"]}
        try:
            c = stat_counters(m.stats())
            out["daemon_read_bytes"] = c["read_bytes"]
        except Exception:  # noqa: BLE001 - a kernel-mode mount's stats may differ
            pass
        out["rss"] = m.rss()
        return out

    def reindex_one_changed(self) -> dict[str, Any]:
        """Re-index the directory after one tensor of one shard changed in place."""
        src = Path(self.meta["dir"])
        copy = self.run_dir / "model-v2"
        shutil.copytree(src, copy)
        shard = copy / self.meta["probe"]["file"]
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            f.write(os.urandom(4096))
        t0 = time.perf_counter()
        p = run_casfs(["index", f"tree:{copy}", "--store", self.store, "--tag",
                       "weights-synthetic-v2"], self.svc.env_direct)
        seconds = time.perf_counter() - t0
        shutil.rmtree(copy, ignore_errors=True)
        summary = p.stdout.strip().splitlines()[0]
        log(f"re-index with one tensor changed: {seconds:.1f}s: {summary}")
        return {"seconds": seconds, "summary": summary}


def render(res: dict[str, Any]) -> str:
    m = res["model"]
    lines = [
        f"# casfs weights benchmark, {res['date']}",
        "",
        f"Model: synthetic, {fmt_bytes(m['bytes'])} in {len(m['files'])} safetensors shards "
        f"({m['tensors']} float16 tensors, 4096-wide), config.json and tokenizer.json beside "
        f"them. Store: **{res['store']}**. Machine: {res['machine']['nproc']} CPUs, kernel "
        f"{res['machine']['kernel']}, load average at start {res['machine']['loadavg'][0]:.1f}. "
        f"casfs {res['product']['source']}. One load per row, in a fresh Python process "
        "(imports not timed); casfs rows' seconds exclude `casfs mount` (its time is in the "
        "JSON).",
        "",
        "| from | loader | seconds | MB/s | × local disk cold | requests | fetched |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {r["loader"]: r["seconds"] for r in res["rows"]
            if r["scenario"].startswith("local disk")}
    for r in res["rows"]:
        ratio = r["seconds"] / base[r["loader"]] if base.get(r["loader"]) else None
        lines.append(
            f"| {r['scenario']} | {r['loader']} | {r['seconds']:.2f} | {r['mb_per_s']:,.0f} | "
            f"{'–' if ratio is None else f'{ratio:.2f}×'} | "
            f"{r.get('requests', '–')} | {fmt_bytes(r.get('fetched_bytes'))} |")
    idx = res.get("index", {})
    if idx:
        lines += ["", "Indexing (directly into SeaweedFS):", ""]
        for what, d in idx.items():
            lines.append(f"- {what}: {d['seconds']:.1f} s ({d['mb_per_s']:.0f} MB/s): "
                         f"`{d['summary']}`")
    if res.get("reindex"):
        d = res["reindex"]
        lines.append(f"- the directory again with one tensor changed: {d['seconds']:.1f} s: "
                     f"`{d['summary']}`")
    lines += ["", "Loaders: **mmap** = `safe_open(framework=\"np\")` and `get_tensor` of every "
              "tensor (each copied out of the mapping); **torch** = "
              "`safetensors.torch.load_file` of every shard, each tensor cloned (as a move to a "
              "device would copy it); **one** = "
              f"`get_tensor({m['probe']['tensor']!r})` ({fmt_bytes(m['probe']['bytes'])}) from "
              f"{m['probe']['file']}. The download rows time the download plus the load from "
              "the downloaded files (for **one**: the download of its shard)."]
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r["scenario"] for r in res["rows"]))
    loaders = [ld for ld in (*LOADERS, "one") if any(r["loader"] == ld for r in res["rows"])]
    fig, axes = plt.subplots(1, len(loaders), figsize=(6 * len(loaders), 0.45 * len(scenarios) + 2),
                             sharey=True)
    for ax, loader in zip(axes, loaders, strict=True):
        vals = []
        for sc in scenarios:
            found = [r["seconds"] for r in res["rows"] if r["scenario"] == sc and r["loader"] == loader]
            vals.append(found[0] if found else 0)
        ax.barh(range(len(scenarios)), vals, color=["#888" if s.startswith(("local", "direct"))
                                                     else "#2a7" for s in scenarios])
        ax.set_title(f"{loader}: seconds")
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    axes[0].set_yticks(range(len(scenarios)), scenarios, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(f"Loading a {fmt_bytes(res['model']['bytes'])} safetensors model "
                 f"({res['store']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.weights", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gb", type=float, default=2.2, help="model size, GB (default 2.2)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--modes", default="fuse,kernel", help="casfs serving modes to load from")
    p.add_argument("--no-image", action="store_true",
                   help="skip the loads from the image (the directory's are kept)")
    p.add_argument("--quiet-wait", type=float, default=30,
                   help="wait up to this long for other work to leave the CPUs idle first")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--stem", help="results file name stem (default <date>-weights)")
    add_product_args(p)
    args = p.parse_args(argv)
    exit_on_sigterm()
    t_start = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    product = select_product(args.casfs_src, args.casfs_rev, args.work)
    log(f"casfs under test: {product['source']}")
    log(f"building the synthetic model ({args.size_gb:g} GB, {args.shards} shards)")
    meta = build_model(args.work, args.size_gb, args.shards)
    run_dir = fresh_dir(args.work / "runs" / f"weights-{os.getpid()}")
    res: dict[str, Any] = {"benchmark": "weights", "date": now_iso(), "machine": machine_info(),
                           "product": product, "model": meta, "errors": []}
    try:
        with services(args.latency_ms) as svc:
            bench = Weights(args, svc, run_dir, meta)
            res["store"] = svc.note
            res["index"] = bench.index()
            res["reindex"] = bench.reindex_one_changed()
            steps: list[tuple[str, Callable[[], None]]] = [
                ("local", bench.local), ("download", bench.download)]
            for mode in filter(None, args.modes.split(",")):
                steps.append((f"tree {mode}", functools.partial(
                    bench.casfs, res["index"]["tree"]["ref"], "tree", mode)))
            if not args.no_image:
                steps.append(("image fuse", functools.partial(
                    bench.casfs, res["index"]["image"]["ref"], "image", "fuse", hot=False)))
            for name, fn in steps:
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                log(name)
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - reported, the other steps still run
                    log(f"ERROR {name}: {exc}")
                    res["errors"].append(f"{name}: {exc}")
            res["rows"] = bench.rows
            res["page_cache"] = bench.pc.report()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - t_start, 1)
    stem = args.stem or unique_stem(args.out, f"{today()}-weights")
    publish(res, args.out, stem, render)
    try:
        chart(res, args.out / f"{stem}.png")
        print(f"png: {args.out / f'{stem}.png'}")
    except Exception as exc:  # noqa: BLE001 - the tables stand without the chart
        log(f"no chart: {exc}")
    log(f"weights finished in {res['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
