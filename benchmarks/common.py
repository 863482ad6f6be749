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
    pid: int | None  # the FUSE daemon's, or (kernel mode) the node view service's
    seconds: float
    output: str
    env: dict[str, str] = field(repr=False, default_factory=dict)
    mode: str | None = None  # "kernel" or "fuse", as `casfs mount` reported it
    cache_dir: Path | None = None

    def stats(self) -> dict[str, Any]:
        return casfs_stats(self.mountpoint, self.env)

    def rss(self) -> int | None:
        return rss_bytes(self.pid)


_PID_RE = re.compile(r"daemon pid (\d+)")
_MODE_RE = re.compile(r"\((kernel|fuse) mode\b")
MODES = ("kernel", "fuse")

# Every daemon / view service pid a `casfs mount` of this process reported, until it is
# seen gone: what a benchmark stops in its finally block (stop_started_daemons).
STARTED_PIDS: set[int] = set()
# Daemons or services that did not exit on their own after `casfs umount` and had to be
# signalled: a casfs bug the results should show (each benchmark copies these into its
# errors).
INCIDENTS: list[str] = []


def mode_support() -> dict[str, str | None]:
    """Per serving mode, why this casfs / node cannot measure it (None: it can)."""
    help_text = casfs_help("mount")
    if "--mode" not in help_text:
        return {"kernel": "this casfs has no `casfs mount --mode`", "fuse": None}
    from casfs.kernel.support import unsupported_reason

    return {"kernel": unsupported_reason(), "fuse": None}


def parse_modes(text: str) -> list[str]:
    """`--modes kernel,fuse` -> ["kernel", "fuse"] (order kept, duplicates dropped)."""
    modes = list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"--modes takes a comma-separated subset of {','.join(MODES)}, "
                         f"not {text!r}")
    return modes


def mode_flags(mode: str | None) -> list[str]:
    """The `casfs mount` arguments selecting a mode (none for a casfs without --mode)."""
    return [] if mode is None else ["--mode", mode]


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    # fields[0] is the state (field 3 of stat(5)); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    out = p.stdout + p.stderr
    m = _PID_RE.search(out)
    mode = _MODE_RE.search(out)
    pid = int(m.group(1)) if m else None
    if pid:
        STARTED_PIDS.add(pid)
    return Mounted(mountpoint, pid, seconds, p.stdout.strip(), env,
                   mode.group(1) if mode else None, cache_dir)


def casfs_umount(mounted: Mounted, timeout: float = 180, last: bool = True) -> None:
    """Unmount cleanly; if that fails, detach lazily and stop the daemon we started.

    ``last``: this was the last mount its daemon serves, so it must exit (a kernel-mode
    mount's pid is the node view service, which serves every kernel-mode mount of its
    cache dir and exits with the last one): wait for the pid to be gone, signalling it
    (and recording an incident) if it lingers. With ``last=False`` the service is left
    running for the mounts still up."""
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
        detach(mnt)
    if mounted.pid and (last or not ok):
        how = _stop_pid(mounted.pid, clean=ok)
        if how != "exited":
            what = "view service" if mounted.mode == "kernel" else "daemon"
            msg = (f"{what} {mounted.pid} of {mnt} did not exit after `casfs umount` "
                   f"({'umount ok' if ok else 'umount failed'}): {how}")
            log("WARNING: " + msg)
            INCIDENTS.append(msg)
        STARTED_PIDS.discard(mounted.pid)


def _stop_pid(pid: int, clean: bool) -> str:
    """Wait for a daemon we started to exit; TERM, then KILL it if it lingers. Returns
    how it ended: "exited" (on its own), "SIGTERM", "SIGKILL" or "still running"."""
    if clean and _wait_exit(pid, 10):
        return "exited"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_exit(pid, 5):
            return sig.name
    return "still running"


def stop_started_daemons() -> None:
    """Stop every daemon / view service this process's mounts started that is still
    running (a benchmark's finally block, after detaching its mounts)."""
    for pid in sorted(STARTED_PIDS):
        if _alive(pid):
            log(f"stopping casfs process {pid} left running")
            _stop_pid(pid, clean=False)
    STARTED_PIDS.clear()


def detach(mountpoint: str) -> None:
    """Lazily detach a mount: fusermount3 for FUSE, umount for overlayfs and the rest."""
    fstype = mount_fstype(mountpoint)
    if fstype is not None and fstype.startswith("fuse"):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    else:
        subprocess.run(["umount", "-l", mountpoint], capture_output=True)


def mount_fstype(path: str) -> str | None:
    """The filesystem type of the mount at ``path`` (None: not a mountpoint)."""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if pre.split()[4].replace("\\040", " ") == real:
                return post.split()[0]
    return None


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
                env: dict[str, str], extra: Sequence[str] = (),
                last: bool = True) -> Iterator[Mounted]:
    mounted = casfs_mount_start(ref, mountpoint, store, cache_dir, env, extra)
    try:
        yield mounted
    finally:
        casfs_umount(mounted, last=last)


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


def cleanup_stale_runs(runs_base: Path) -> None:
    """Detach the mounts and remove the scratch dirs of earlier runs that were
    interrupted: run dirs are named ``<suite>-<pid>``, and a dir whose pid still runs
    belongs to a benchmark running now (another engineer's, on a shared machine) and is
    left alone."""
    if not runs_base.exists():
        return
    for d in sorted(runs_base.iterdir()):
        m = re.fullmatch(r"[a-z_]+-(\d+)", d.name)
        if m is None or not d.is_dir():
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and _alive(pid):
            continue
        cleanup_mounts_under(d)
        shutil.rmtree(d, ignore_errors=True)


def cleanup_mounts_under(base: Path) -> None:
    """Detach any mount left under ``base`` by an earlier interrupted run (ours only):
    FUSE daemons' mounts, kernel-mode overlays and node views. Overlays first (they hold
    the node views they read through), deepest paths first."""
    if not base.exists():
        return
    real = os.path.realpath(base)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    points = [p for p in points if p.startswith(real + "/")]
    overlays = [p for p in points if mount_fstype(p) == "overlay"]
    rest = [p for p in points if p not in overlays]
    for p in [*overlays, *sorted(rest, key=len, reverse=True)]:
        log(f"detaching stale mount {p}")
        detach(p)
