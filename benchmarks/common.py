"""What every benchmark shares: where things live, dropping the page cache, summarising
repeated runs, describing the machine, driving the `casfs` command line (index, mount,
stats, umount) and the remote store (SeaweedFS behind the latency-injecting proxy).

Everything that starts something (a server, a proxy, a mount) is a context manager that
stops it in a ``finally``, so an interrupted benchmark leaves nothing mounted or running.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "work"
RESULTS = REPO / "benchmarks" / "results"
STORE_NOTE = "SeaweedFS behind a latency-injecting proxy ({latency:g} ms per request)"


def log(msg: str) -> None:
    """Progress on stderr (stdout carries the tables)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so `kill <pid>` of a benchmark still runs its finally
    blocks (unmount, stop SeaweedFS and the proxy)."""
    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def today() -> str:
    return _dt.date.today().isoformat()


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


# -- page cache -------------------------------------------------------------------------


class PageCache:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``, remembering whether it ever failed.

    A benchmark keeps going when it cannot drop caches (not root, a container without
    /proc/sys write access); the failure is counted and reported, because "cold" figures
    are then really warm ones.
    """

    def __init__(self, path: str = "/proc/sys/vm/drop_caches") -> None:
        self.path = path
        self.drops = 0
        self.failures = 0
        self.error: str | None = None

    def drop(self) -> bool:
        os.sync()
        try:
            with open(self.path, "w") as f:
                f.write("3\n")
        except OSError as exc:
            self.failures += 1
            if self.error is None:
                self.error = f"{self.path}: {exc.strerror or exc}"
                log(f"WARNING: cannot drop the page cache ({self.error}); cold runs are not cold")
            return False
        self.drops += 1
        return True

    def report(self) -> dict[str, Any]:
        return {"ok": self.failures == 0, "drops": self.drops, "failures": self.failures,
                "error": self.error}


# -- numbers ----------------------------------------------------------------------------


def summarize(values: Sequence[float | int]) -> dict[str, Any]:
    """Median, min, max and the raw values of repeated measurements."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"n": 0, "median": None, "min": None, "max": None, "values": []}
    return {"n": len(vals), "median": statistics.median(vals), "min": min(vals),
            "max": max(vals), "values": list(vals)}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def mb(n: float | int | None) -> float | None:
    return None if n is None else n / 1e6


# -- the machine ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg": os.getloadavg(),
        "hostname": platform.node(),
    }


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "casfs", "indexer", "prefetch"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rev = out.stdout.strip() or None
    if rev and dirty.stdout.strip():
        rev += "+dirty"
    return rev


def add_product_args(p: Any) -> None:
    """--casfs-src / --casfs-rev: which casfs the benchmark runs (default: as installed)."""
    p.add_argument("--casfs-src", type=Path, help="run casfs from this source tree (holding "
                   "casfs/, indexer/, prefetch/) instead of the installed one")
    p.add_argument("--casfs-rev", help="run casfs as committed at this git revision (exported "
                   "with git archive under the work dir): a stable product while the working "
                   "tree is being edited")


def select_product(src: Path | None, rev: str | None, work: Path) -> dict[str, Any]:
    """Point every casfs subprocess at the chosen source (via PYTHONPATH, which comes
    before the editable install's finder); returns what was chosen, for the results."""
    if rev:
        sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", rev + "^{commit}"],
                             capture_output=True, text=True, check=True).stdout.strip()
        src = work / "src" / sha[:12]
        if not (src / "casfs" / "cli.py").exists():
            tmp = Path(tempfile.mkdtemp(dir=work, prefix="src-"))
            archive = subprocess.run(["git", "-C", str(REPO), "archive", sha, "casfs",
                                      "indexer", "prefetch"], capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive.stdout, check=True)
            src.parent.mkdir(parents=True, exist_ok=True)
            if src.exists():
                shutil.rmtree(src)
            os.replace(tmp, src)
        chosen = {"source": f"git {sha[:12]} ({rev})", "path": str(src), "revision": sha[:12]}
    elif src:
        chosen = {"source": str(src), "path": str(src), "revision": None}
    else:
        return {"source": "installed (working tree)", "path": None, "revision": git_revision()}
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src) + (os.pathsep + old if old else "")
    return chosen


def cpu_busy(interval: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``interval`` seconds (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return sum(vals), idle

    t0, i0 = sample()
    time.sleep(interval)
    t1, i1 = sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def wait_for_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Wait (up to ``max_wait`` s) until other work leaves the CPUs mostly idle, so that a
    scenario is not measured while something else runs; returns the last busy fraction."""
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    warned = False
    while busy > threshold and time.monotonic() < deadline:
        if not warned:
            log(f"CPUs {busy:.0%} busy with other work: waiting up to {max_wait:.0f}s")
            warned = True
        time.sleep(2)
        busy = cpu_busy()
    return busy


def disk_device(path: str | os.PathLike[str]) -> str | None:
    """The /proc/diskstats name of the block device holding ``path`` (None if unknown)."""
    st = os.stat(path)
    major, minor = os.major(st.st_dev), os.minor(st.st_dev)
    with contextlib.suppress(OSError), open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if int(parts[0]) == major and int(parts[1]) == minor:
                return parts[2]
    return None


def disk_read_bytes(device: str | None) -> int | None:
    """Bytes read from ``device`` since boot (sectors are 512 bytes in diskstats)."""
    if device is None:
        return None
    with contextlib.suppress(OSError), open("/proc/diskstats") as f:
        for line in f:
            parts = line.split()
            if parts[2] == device:
                return int(parts[5]) * 512
    return None


def rss_bytes(pid: int | None) -> int | None:
    """VmRSS of a process, from /proc/<pid>/status."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


# -- the casfs command line -------------------------------------------------------------


class BenchError(RuntimeError):
    """A step of a benchmark failed (the message says which and why)."""


def casfs_argv() -> list[str]:
    """How to run the `casfs` console script without a pyenv shim in front of it."""
    script = Path(sys.executable).parent / "casfs"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "casfs.cli"]


def casfs_help(subcommand: str) -> str:
    p = subprocess.run([*casfs_argv(), subcommand, "--help"], capture_output=True, text=True,
                       timeout=60)
    return p.stdout + p.stderr


def run_casfs(args: Sequence[str], env: dict[str, str] | None = None,
              timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([*casfs_argv(), *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if p.returncode != 0:
        raise BenchError(f"casfs {' '.join(args)} failed ({p.returncode}): "
                         f"{(p.stderr or p.stdout).strip()[-2000:]}")
    return p


@dataclass
class IndexRun:
    ref: str
    seconds: float
    stdout: str


def casfs_index(oci_dir: Path, tag: str, store: str, env: dict[str, str],
                name_tag: str | None = None) -> IndexRun:
    """`casfs index oci:<dir>:<tag> --store URL [--tag T]`; the ref is stdout's last line."""
    args = ["index", f"oci:{oci_dir}:{tag}", "--store", store]
    if name_tag:
        args += ["--tag", name_tag]
    t0 = time.perf_counter()
    p = run_casfs(args, env)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    if not lines:
        raise BenchError(f"casfs index printed nothing; stderr: {p.stderr[-1000:]}")
    return IndexRun(lines[-1].strip(), seconds, p.stdout)


@dataclass
class Mounted:
    mountpoint: Path
    pid: int | None
    seconds: float
    output: str
    env: dict[str, str] = field(repr=False, default_factory=dict)

    def stats(self) -> dict[str, Any]:
        return casfs_stats(self.mountpoint, self.env)

    def rss(self) -> int | None:
        return rss_bytes(self.pid)


_PID_RE = re.compile(r"daemon pid (\d+)")


def casfs_mount_start(ref: str, mountpoint: Path, store: str, cache_dir: Path,
                      env: dict[str, str], extra: Sequence[str] = (),
                      timeout: float = 180) -> Mounted:
    """Run `casfs mount` and time it until it returns (it returns once the mount serves)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    args = ["mount", ref, str(mountpoint), "--store", store, "--cache-dir", str(cache_dir),
            *extra]
    t0 = time.perf_counter()
    p = subprocess.run([*casfs_argv(), *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise BenchError(f"casfs mount failed ({p.returncode}): {(p.stderr or p.stdout).strip()}")
    m = _PID_RE.search(p.stdout + p.stderr)
    return Mounted(mountpoint, int(m.group(1)) if m else None, seconds, p.stdout.strip(), env)


def casfs_umount(mounted: Mounted, timeout: float = 60) -> None:
    """Unmount cleanly; if that fails, detach lazily and stop the daemon we started."""
    mnt = str(mounted.mountpoint)
    try:
        p = subprocess.run([*casfs_argv(), "umount", mnt], capture_output=True, text=True,
                           env=mounted.env, timeout=timeout)
        ok = p.returncode == 0
        if not ok:
            log(f"WARNING: casfs umount {mnt} failed: {(p.stderr or p.stdout).strip()}")
    except subprocess.TimeoutExpired:
        ok = False
        log(f"WARNING: casfs umount {mnt} timed out after {timeout:.0f}s")
    if not ok and is_mountpoint(mnt):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if mounted.pid:
        _stop_pid(mounted.pid, clean=ok)


def _stop_pid(pid: int, clean: bool) -> None:
    """Wait for a daemon we started to exit; TERM, then KILL it if it lingers."""
    if clean and _wait_exit(pid, 10):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_exit(pid, 5):
            return


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.02)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def is_mountpoint(path: str) -> bool:
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            if line.split()[4].replace("\\040", " ") == real:
                return True
    return False


@contextlib.contextmanager
def casfs_mount(ref: str, mountpoint: Path, store: str, cache_dir: Path,
                env: dict[str, str], extra: Sequence[str] = ()) -> Iterator[Mounted]:
    mounted = casfs_mount_start(ref, mountpoint, store, cache_dir, env, extra)
    try:
        yield mounted
    finally:
        casfs_umount(mounted)


def casfs_stats(mountpoint: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    p = run_casfs(["stats", str(mountpoint), "--json"], env, timeout=60)
    return json.loads(p.stdout)


def stat_counters(stats: dict[str, Any]) -> dict[str, int]:
    """The daemon counters benchmarks report, flattened (missing ones are 0)."""
    m = stats.get("metrics", {})
    keys = ("reads", "read_bytes", "opens", "lookups", "getattrs", "fetches", "fetched_bytes",
            "cache_hits", "cache_misses", "fetch_joined", "fetch_errors", "io_errors")
    out = {k: int(m.get(k, 0)) for k in keys}
    pf = stats.get("prefetch")
    if isinstance(pf, dict):
        for k, v in pf.items():
            if isinstance(v, int | float):
                out[f"prefetch_{k}"] = v
    return out


def counter_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after}


# -- the remote store -------------------------------------------------------------------


@dataclass
class Services:
    """SeaweedFS and the latency proxy in front of it."""

    seaweed: Any
    proxy: Any
    latency_ms: float

    @property
    def env_direct(self) -> dict[str, str]:
        from casfs.testing.seaweed import s3_env

        return {**os.environ, **s3_env(self.seaweed)}

    @property
    def env_proxy(self) -> dict[str, str]:
        from casfs.testing.seaweed import s3_env

        return {**os.environ, **s3_env(self.seaweed, self.proxy.url)}

    def proxy_counters(self) -> dict[str, int]:
        s = self.proxy.stats()
        return {"requests": s["requests"], "bytes_down": s["bytes_down"],
                "body_bytes_down": s["body_bytes_down"],
                "get_requests": s["by_method"].get("GET", {}).get("requests", 0),
                "connections": s["connections"]}

    @property
    def note(self) -> str:
        return STORE_NOTE.format(latency=self.latency_ms)


@contextlib.contextmanager
def services(latency_ms: float, data_dir: Path | None = None) -> Iterator[Services]:
    """Start SeaweedFS (real, on free ports) and a LatencyProxy before it; stop both."""
    from casfs.testing.proxy import LatencyProxy
    from casfs.testing.seaweed import SeaweedServer

    own = data_dir is None
    if data_dir is None:
        data_dir = Path(tempfile.mkdtemp(prefix="casfs-bench-seaweed-"))
    server = SeaweedServer(data_dir)
    proxy = None
    try:
        log("starting SeaweedFS")
        server.start()
        proxy = LatencyProxy("127.0.0.1", server.s3_port, latency_ms).start()
        log(f"SeaweedFS S3 on :{server.s3_port}, proxy on :{proxy.port} "
            f"({latency_ms:g} ms per request)")
        yield Services(server, proxy, latency_ms)
    finally:
        if proxy is not None:
            proxy.stop()
        server.stop()
        if own:
            shutil.rmtree(data_dir, ignore_errors=True)


def s3_client(endpoint_url: str, max_pool: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    from casfs.testing.seaweed import SeaweedServer

    return boto3.client(
        "s3", endpoint_url=endpoint_url,
        aws_access_key_id=SeaweedServer.access_key,
        aws_secret_access_key=SeaweedServer.secret_key,
        region_name=SeaweedServer.region,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard"},
                      max_pool_connections=max_pool),
    )


def cleanup_mounts_under(base: Path) -> None:
    """Detach any mount left under ``base`` by an earlier interrupted run (ours only)."""
    if not base.exists():
        return
    real = os.path.realpath(base)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    for p in points:
        if p.startswith(real + "/"):
            log(f"detaching stale mount {p}")
            subprocess.run(["fusermount3", "-u", "-z", p], capture_output=True)
