"""Container start: time from the command to the app's first line (issue 16, point 4).

The benchmark image (`big`: a Python prefix with torch, numpy and pandas; `--quick`:
`small`, numpy) plus a base layer with the C libraries its interpreter and extension
modules link (collected with ldd from this machine), pushed to Debian's docker-registry
and indexed into SeaweedFS. Registry and store are both behind a latency-injecting proxy
(`--latency-ms`, default 20 per request), so the two paths pay the same network. The app
is `python3 -c "import torch; print('ready')"` (numpy for --quick); every run starts
with the page cache dropped. In one run:

- `casfs run`, first boot: empty node cache, no trace for the image in the store;
- `casfs run`, prefetched: empty node cache, the first boot's trace in the store;
- `casfs run`, warm: the image's content on the node (the previous run's cache);
- containerd + the casfs snapshotter: pull (manifest and config only, the layers
  reported present by the snapshotter) with casfs.snapshotter.containerd, then `ctr run`,
  empty node cache, the image's trace in the store;
- containerd plain: `ctr images pull` (every layer downloaded, then unpacked by the
  overlayfs snapshotter) then `ctr run`, from an empty containerd.

Usage: python -m benchmarks.run [--quick] [--latency-ms 20] [--runs 1]. Results go to
benchmarks/results/<date>-run-<image>-<rev>.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    WORK,
    BenchError,
    PageCache,
    casfs_index,
    exit_on_sigterm,
    git_revision,
    log,
    machine_info,
    now_iso,
    services,
    summarize,
    today,
)
from benchmarks.images import IMAGES, TAG, build_image, native_root
from casfs.testing import ocibuild as ob

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


# -- the runnable image ---------------------------------------------------------------------


def _libraries(root: Path, prefix: str) -> dict[str, Path]:
    """name -> node path of every library outside the image that its interpreter and
    ELF files link (ldd with the image's own lib dir first)."""
    files = [root / prefix.lstrip("/") / "bin" / "python3"]
    for path in root.rglob("*.so*"):
        if path.is_file() and not path.is_symlink():
            files.append(path)
    env = {**os.environ, "LD_LIBRARY_PATH": str(root / prefix.lstrip("/") / "lib")}
    found: dict[str, Path] = {}
    for i in range(0, len(files), 200):
        out = subprocess.run(["ldd", *map(str, files[i:i + 200])], capture_output=True,
                             text=True, env=env).stdout
        for line in out.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+) \(", line) or re.match(r"\s*(/\S+) \(", line)
            if not m:
                continue
            src = Path(m.group(m.lastindex or 1))
            if str(src).startswith(str(root)):
                continue
            found.setdefault(Path(m.group(1)).name, src)
    return found


def base_members(root: Path, prefix: str) -> list[ob.Member]:
    members = [ob.directory("etc"),
               ob.file("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
               ob.file("etc/group", "root:x:0:\n"), ob.directory("tmp", mode=0o1777),
               ob.directory("proc"), ob.directory("sys"), ob.directory("dev"),
               ob.directory("root", mode=0o755)]
    members += ob.parent_dirs("usr/lib/x86_64-linux-gnu/x") + ob.parent_dirs("usr/lib64/x")
    members += [ob.symlink("lib", "usr/lib"), ob.symlink("lib64", "usr/lib64")]
    for name, src in sorted(_libraries(root, prefix).items()):
        where = "usr/lib64" if name.startswith("ld-linux") else "usr/lib/x86_64-linux-gnu"
        members.append(ob.file(f"{where}/{name}", Path(os.path.realpath(src)).read_bytes(),
                               mode=0o755))
    return members


def runnable_layout(meta: dict[str, Any], code: str) -> Path:
    """An OCI layout: a base layer (etc, C libraries) under the benchmark image's layers
    (the same blobs), its Cmd the app. Cached by the image's digest and the app."""
    key = hashlib.sha256(f"{meta['digest']} {code} 1".encode()).hexdigest()[:12]
    out = WORK / "images" / f"run-{meta['name']}-{key}"
    if (out / "index.json").exists():
        return out
    src = Path(meta["oci_dir"])
    index = json.loads((src / "index.json").read_text())
    blob = lambda d: src / "blobs" / "sha256" / d.split(":")[1]  # noqa: E731
    manifest = json.loads(blob(index["manifests"][0]["digest"]).read_text())
    config = json.loads(blob(manifest["config"]["digest"]).read_text())
    log("collecting the C libraries the image links (base layer)")
    base = ob.Layer.from_members(base_members(native_root(meta), meta["python"]["prefix"]),
                                 "gzip")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        (tmp / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        return digest, len(data)

    base_digest, base_size = put(base.blob)
    layers = [{"mediaType": GZIP_LAYER, "digest": base_digest, "size": base_size}]
    for layer in manifest["layers"]:
        os.link(blob(layer["digest"]), tmp / "blobs" / "sha256" / layer["digest"].split(":")[1])
        layers.append(layer)
    config["rootfs"]["diff_ids"] = [base.diff_id, *config["rootfs"]["diff_ids"]]
    config.setdefault("history", []).insert(0, {"created_by": "benchmarks.run base layer"})
    config["config"] = {**config.get("config", {}), "Cmd": ["python3", "-c", code],
                        "Env": [f"PATH={meta['python']['prefix']}/bin:/usr/bin:/bin",
                                "OMP_NUM_THREADS=1", "PYTHONDONTWRITEBYTECODE=1"]}
    cfg_digest, cfg_size = put(json.dumps(config).encode())
    man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": OCI_CONFIG, "digest": cfg_digest, "size": cfg_size},
           "layers": layers}
    man_digest, man_size = put(json.dumps(man).encode())
    (tmp / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (tmp / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": man_digest,
                                           "size": man_size, "annotations": {
                                               "org.opencontainers.image.ref.name": TAG}}]}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# -- timing a command to its first line ---------------------------------------------------


def first_line(argv: list[str], env: dict[str, str], expect: str, t0: float | None = None,
               timeout: float = 900) -> dict[str, Any]:
    """Seconds from t0 (default: now) to the line `expect` on the command's stdout, and
    to its exit."""
    load = os.getloadavg()[0]  # a shared machine: say how busy it was
    t0 = time.perf_counter() if t0 is None else t0
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         stdin=subprocess.DEVNULL, text=True)
    assert p.stdout is not None
    seen = None
    lines = []
    deadline = time.monotonic() + timeout
    for line in p.stdout:
        lines.append(line)
        if seen is None and line.strip() == expect:
            seen = time.perf_counter() - t0
        if time.monotonic() > deadline:
            p.kill()
            break
    _, err = p.communicate(timeout=timeout)
    done = time.perf_counter() - t0
    if seen is None or p.returncode != 0:
        raise BenchError(f"{' '.join(argv[:4])}... exited {p.returncode} without "
                         f"{expect!r}: {''.join(lines)[-1000:]} {err[-2000:]}")
    return {"first_line_seconds": round(seen, 3), "exit_seconds": round(done, 3),
            "load_average_1m": round(load, 2)}


# -- containerd ----------------------------------------------------------------------------


@contextlib.contextmanager
def containerd(work: Path, snapshotter_sock: Path | None = None) -> Iterator[Path]:
    """A containerd of its own (state, sockets), stopped by PID."""
    sock_dir = Path(tempfile.mkdtemp(prefix="casfs-bench-ctd-"))
    sock = sock_dir / "ctd.sock"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    proxy = ""
    if snapshotter_sock is not None:
        proxy = (f'[proxy_plugins]\n  [proxy_plugins.casfs]\n    type = "snapshot"\n'
                 f'    address = "{snapshotter_sock}"\n')
    config = work / "containerd.toml"
    config.write_text(f'version = 2\nroot = "{work / "root"}"\nstate = "{sock_dir / "state"}"\n'
                      f'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                      f'[grpc]\n  address = "{sock}"\n[ttrpc]\n  address = "{sock}.ttrpc"\n'
                      f'[debug]\n  address = "{sock_dir / "debug.sock"}"\n{proxy}')
    log_file = open(work / "containerd.log", "ab")
    proc = subprocess.Popen([CONTAINERD, "--config", str(config)], stdout=log_file,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    log_file.close()
    try:
        _wait_for(sock, proc, "containerd")
        yield sock
    finally:
        _stop(proc)
        shutil.rmtree(sock_dir, ignore_errors=True)


@contextlib.contextmanager
def snapshotter(work: Path, store: str, cache: Path, env: dict[str, str]) -> Iterator[Path]:
    sock_dir = Path(tempfile.mkdtemp(prefix="casfs-bench-snap-"))
    sock = sock_dir / "snap.sock"
    log_file = open(work / "snapshotter.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "casfs.cli", "snapshotter", "--address", str(sock),
                             "--root", str(work / "snapshotter"), "--store", store,
                             "--cache-dir", str(cache)], stdout=log_file,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    log_file.close()
    try:
        _wait_for(sock, proc, "casfs snapshotter")
        yield sock
    finally:
        _stop(proc)
        for mnt in (work / "snapshotter" / "images").glob("*/rootfs"):
            subprocess.run([sys.executable, "-m", "casfs.cli", "umount", str(mnt)],
                           capture_output=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _wait_for(sock: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    import socket

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            return
        time.sleep(0.05)
    raise BenchError(f"{what} did not listen on {sock}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# -- the benchmark ------------------------------------------------------------------------


def run_argv() -> list[str]:
    """`casfs run`."""
    return [sys.executable, "-m", "casfs.cli", "run"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the small (numpy) image")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--runs", type=int, default=1, help="runs of each warm-able scenario")
    p.add_argument("--keep", action="store_true",
                   help="keep the work dir (casfs, snapshotter and containerd logs, caches)")
    p.add_argument("--skip-plain", action="store_true",
                   help="leave out containerd's plain pull (its row is then missing)")
    args = p.parse_args(argv)
    exit_on_sigterm()
    if os.geteuid() != 0:
        raise SystemExit("benchmarks.run needs root (mounts, containers)")
    spec = IMAGES["small" if args.quick else "big"]
    module = "numpy" if args.quick else "torch"
    code = f"import {module}; print('ready', flush=True)"
    meta = build_image(spec)
    layout = runnable_layout(meta, code)
    work = WORK / "runs" / f"run-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pages = PageCache()
    results: dict[str, Any] = {"suite": "run", "image": spec.name, "app": code,
                               "latency_ms": args.latency_ms, "started": now_iso(),
                               "revision": git_revision(), "machine": machine_info(),
                               "scenarios": {}}
    from casfs.snapshotter.containerd import Containerd
    from casfs.testing.proxy import LatencyProxy
    from casfs.testing.registry import RegistryServer, skopeo_push

    try:
        with services(args.latency_ms) as svc, RegistryServer(work / "registry") as reg:
            reg_proxy = LatencyProxy("127.0.0.1", reg.port, args.latency_ms).start()
            try:
                log(f"pushing {layout} to the registry")
                skopeo_push(layout, TAG, f"{reg.host}/bench:{TAG}")
                bucket = svc.seaweed.make_bucket("casfs-run-bench")
                store = f"s3://{bucket}/casfs"
                log("indexing into SeaweedFS")
                idx = casfs_index(layout, TAG, store, svc.env_direct, name_tag="bench")
                results["index_seconds"] = round(idx.seconds, 1)
                env = svc.env_proxy
                run = run_argv()
                scen = results["scenarios"]

                def casfs_run(cache: Path, name: str) -> None:
                    pages.drop()
                    r = first_line([*run, "--rm", "--store", store, "--cache-dir", str(cache),
                                    "--state-dir", str(work / "state"), "bench"], env, "ready")
                    scen.setdefault(name, []).append(r)
                    log(f"{name}: {r}")

                casfs_run(work / "cache-first", "casfs run, first boot")
                for i in range(args.runs):
                    cache = work / f"cache-prefetched-{i}"
                    casfs_run(cache, "casfs run, prefetched")
                for _ in range(args.runs):
                    casfs_run(work / "cache-prefetched-0", "casfs run, warm")

                host = f"127.0.0.1:{reg_proxy.port}"
                # containerd with the casfs snapshotter: metadata pull, then ctr run
                for i in range(args.runs):
                    cwork = work / f"ctd-casfs-{i}"
                    cwork.mkdir()
                    with snapshotter(cwork, store, cwork / "cache", env) as snap, \
                            containerd(cwork / "containerd", snap) as sock:
                        pages.drop()
                        t0 = time.perf_counter()
                        client = Containerd(str(sock))
                        pulled = client.pull(host, "bench", TAG)
                        client.close()
                        pulled_at = time.perf_counter() - t0
                        if pulled.downloaded_layers:
                            raise BenchError("the casfs snapshotter did not serve the layers")
                        r = first_line([CTR, "--address", str(sock), "run", "--rm",
                                        "--snapshotter", "casfs", pulled.name, f"b{i}"],
                                       dict(os.environ), "ready", t0)
                        r["pull_seconds"] = round(pulled_at, 3)
                        scen.setdefault("containerd + casfs snapshotter, prefetched",
                                        []).append(r)
                        log(f"containerd + casfs: {r}")
                # containerd plain: full pull and unpack, then run
                for i in range(0 if args.skip_plain else args.runs):
                    with containerd(work / f"ctd-plain-{i}") as sock:
                        pages.drop()
                        t0 = time.perf_counter()
                        name = f"{host}/bench:{TAG}"
                        pull = subprocess.run([CTR, "--address", str(sock), "images", "pull",
                                               "--plain-http", name], capture_output=True,
                                              text=True, timeout=1800)
                        if pull.returncode != 0:
                            raise BenchError(f"ctr pull failed: {pull.stderr[-2000:]}")
                        pulled_at = time.perf_counter() - t0
                        r = first_line([CTR, "--address", str(sock), "run", "--rm", name,
                                        f"p{i}"], dict(os.environ), "ready", t0)
                        r["pull_seconds"] = round(pulled_at, 3)
                        scen.setdefault("containerd plain (pull + unpack + run)", []).append(r)
                        log(f"containerd plain: {r}")
                results["proxy_note"] = (f"{svc.note}; the registry behind the same proxy "
                                         f"({args.latency_ms:g} ms per request)")
            finally:
                reg_proxy.stop()
    except BaseException:
        log(f"failed: logs kept under {work}")
        raise
    else:
        if args.keep:
            log(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        results["page_cache"] = pages.report()
        results["finished"] = now_iso()
    summary = {k: summarize([r["first_line_seconds"] for r in v])
               for k, v in results["scenarios"].items()}
    results["summary"] = summary
    write_results(results)
    return 0


def write_results(results: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    rev = (results.get("revision") or "norev").replace("+", "-")
    stem = RESULTS / f"{today()}-run-{results['image']}-{rev}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plain = results["summary"].get("containerd plain (pull + unpack + run)", {}).get("median")
    loads = [r.get("load_average_1m", 0.0) for v in results["scenarios"].values() for r in v]
    lines = [f"# Container start: command to the app's first line ({results['image']} image)",
             "", f"App: `{results['app']}`. {results.get('proxy_note', '')}. Page cache "
             "dropped before every run. " + ("" if results["page_cache"]["ok"] else
                                               "**The page cache could not be dropped.**"),
             f"Load average (1 min) at the runs' starts: {min(loads, default=0):.1f} to "
             f"{max(loads, default=0):.1f} on {os.cpu_count()} cores (a machine shared with "
             "other work: compare rows of one run, not runs).",
             "", "| scenario | first line (s, median) | runs | vs containerd plain |",
             "|---|---|---|---|"]
    for name, s in results["summary"].items():
        rel = f"{s['median'] / plain:.2f}x" if plain else ""
        lines.append(f"| {name} | {s['median']:.2f} | {s['n']} | {rel} |")
    lines += ["", f"Revision {results.get('revision')}, {results['started']}."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"results in {stem}.json and .md")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
