"""Failover under a reader, as tests and benchmarks run it (casfs.failover): a node agent
for a test's cache directory, an image of many small files and importable modules, a
reader process that keeps reading files it never read, re-reading others with their
pages dropped, and importing modules it never imported (every one of which reaches the
serving process), and checks every byte; serving processes killed under it; the stalls
it saw.

Owns: `running_agent`, `agent_held`, `wait_served`, `failover_image`, `Reader`,
`killed_under_reader` (the SIGKILL loop and its figures) and `read_now` (a read issued
while the serving process is dead, timed).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from casfs.testing import ocibuild as ob
from casfs.testing.mounting import (
    build_and_index,
    cli,
    process_alive,
    wait_gone,
)

# -- the agent ----------------------------------------------------------------------------------


@contextlib.contextmanager
def running_agent(cache: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[int]:
    """`casfs agent start` for the block; the agent killed after it (its mounts are the
    test's to take down)."""
    out = cli("agent", "start", "--cache-dir", str(cache), *args, env=env, check=True).stdout
    found = re.search(r"pid (\d+)", out)
    assert found, out
    pid = int(found.group(1))
    try:
        yield pid
    finally:
        stop_agent_of(cache, pid)


def stop_agent_of(cache: Path, pid: int | None = None) -> None:
    """Stop whatever agent serves cache (and pid, if it still runs)."""
    from casfs.agent import agent_status

    for candidate in {pid, agent_status(str(cache))} - {None}:
        assert candidate is not None
        if process_alive(candidate):
            with contextlib.suppress(ProcessLookupError):
                os.kill(candidate, signal.SIGTERM)
            if not wait_gone(candidate, 10):
                os.kill(candidate, signal.SIGKILL)
                wait_gone(candidate, 10)


def agent_held(cache: Path, key: str) -> dict[str, Any] | None:
    """What the agent of cache says about the connection it holds under key (a FUSE
    mount's mountpoint, or "view"), or None."""
    from casfs.agent import agent_report

    report = agent_report(str(cache))
    for held in (report or {}).get("held", []):
        if held["key"] == key:
            return dict(held)
    return None


def wait_served(cache: Path, key: str, not_pid: int = 0, linked: bool = True,
                timeout: float = 15.0) -> dict[str, Any]:
    """Wait until the agent holds key served by a process other than not_pid (linked,
    when asked); what it says then."""
    deadline = time.monotonic() + timeout
    held = None
    while time.monotonic() < deadline:
        held = agent_held(cache, key)
        if held and held["state"] == "serving" and held["pid"] != not_pid and \
                (held["linked"] or not linked):
            return held
        time.sleep(0.01)
    raise AssertionError(f"{key} not served by a new process in {timeout}s: {held}")


# -- the image --------------------------------------------------------------------------------------


@dataclass
class FailoverImage:
    ref: str
    files: dict[str, bytes]  # path -> content
    modules: dict[str, int]  # importable module -> its VALUE
    spare: list[str]  # files the reader never reads (for reads issued by the test)


def failover_image(root: Path, store_url: str, n_files: int = 1500, n_modules: int = 400,
                   n_spare: int = 40, seed: int = 7) -> FailoverImage:
    """Small files (one chunk), a few of several chunks, a package of modules."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    for i in range(n_files + n_spare):
        size = rng.choice((600, 3000, 9000, 30000)) if i % 100 else 700_000
        files[f"data/d{i % 20:02}/f{i:05}"] = rng.randbytes(size)
    modules = {f"fopkg.m{i:04}": rng.randrange(1 << 30) for i in range(n_modules)}
    sources = {f"lib/fopkg/m{i:04}.py": f"VALUE = {modules[f'fopkg.m{i:04}']}\n".encode()
               for i in range(n_modules)}
    sources["lib/fopkg/__init__.py"] = b""
    dirs = sorted({p.rsplit("/", 1)[0] for p in [*files, *sources]})
    parents = sorted({"/".join(d.split("/")[:k]) for d in dirs
                      for k in range(1, d.count("/") + 2)})
    members = [*map(ob.directory, parents), *(ob.file(p, d) for p, d in files.items()),
               *(ob.file(p, d) for p, d in sources.items())]
    ref = build_and_index(root, [members], store_url)
    names = sorted(files)
    spare = names[-n_spare:] if n_spare else []
    return FailoverImage(ref, files, modules, spare)


# -- the reader -------------------------------------------------------------------------------------

_READER = r"""
import blake3, importlib, json, os, sys, time
sys.dont_write_bytecode = True
mnt, spec_path, out_path, stop_path = sys.argv[1:5]
spec = json.load(open(spec_path))
sys.path.insert(0, os.path.join(mnt, "lib"))
fresh = list(spec["files"])
mods = list(spec["modules"])
seen = []
ops, errors, wrong = [], [], []
pause = spec.get("pause", 0.004)
started = time.time()
open(out_path + ".started", "w").close()

def read(rel, want, drop):
    t0 = time.time()
    path = os.path.join(mnt, rel)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if drop:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            chunks = []
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(fd)
        ok = blake3.blake3(b"".join(chunks)).hexdigest() == want
        if not ok:
            wrong.append(rel)
    except OSError as exc:
        errors.append([rel, exc.errno, str(exc)])
        ok = False
    ops.append(["reread" if drop else "read", rel, t0, time.time(), ok])

i = 0
while not os.path.exists(stop_path):
    if fresh:
        rel, want = fresh.pop(0)
        read(rel, want, False)
        seen.append((rel, want))
    if seen:
        rel, want = seen[(i * 7919) % len(seen)]
        read(rel, want, True)
    if mods:
        name, value = mods.pop(0)
        t0 = time.time()
        try:
            ok = importlib.import_module(name).VALUE == value
            if not ok:
                wrong.append(name)
        except Exception as exc:
            errors.append([name, getattr(exc, "errno", None), repr(exc)])
            ok = False
        ops.append(["import", name, t0, time.time(), ok])
    i += 1
    time.sleep(pause)
json.dump({"ops": ops, "errors": errors, "wrong": wrong, "fresh_left": len(fresh),
           "modules_left": len(mods)}, open(out_path, "w"))
"""


class Reader:
    """The reader process over a mount; `stop()` returns what it saw."""

    def __init__(self, mountpoint: Path, image: FailoverImage, workdir: Path,
                 pause: float = 0.004, files: list[str] | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.out = workdir / "reader.json"
        self.stopfile = workdir / "reader.stop"
        names = files if files is not None else \
            [p for p in sorted(image.files) if p not in set(image.spare)]
        spec = {"files": [[p, blake3.blake3(image.files[p]).hexdigest()] for p in names],
                "modules": sorted(image.modules.items()), "pause": pause}
        (workdir / "reader.spec").write_text(json.dumps(spec))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _READER, str(mountpoint), str(workdir / "reader.spec"),
             str(self.out), str(self.stopfile)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not Path(str(self.out) + ".started").exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the reader did not start"
            time.sleep(0.01)

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        self.stopfile.touch()
        try:
            _out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError("the reader hung") from None
        assert self.proc.returncode == 0, err
        return dict(json.loads(self.out.read_text()))


def read_now(path: Path, want: bytes) -> dict[str, Any]:
    """Read a file in a thread started now (while the serving process is dead); wait
    for it. Its result: ok, seconds, error."""
    result: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            result["ok"] = path.read_bytes() == want
        except OSError as exc:
            result["ok"], result["error"] = False, f"{exc.errno}: {exc}"
        result["seconds"] = time.monotonic() - t0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), f"a read of {path} hung"
    return result


# -- the kill loop -----------------------------------------------------------------------------------


@dataclass
class Kill:
    killed_pid: int
    successor: int
    agent_stall: float  # from the agent seeing the death to the successor serving
    dead_read: dict[str, Any]  # a read issued right after the kill
    successor_requests: int  # requests the successor had answered once that read returned
    resent: int  # requests the kernel resent it


@dataclass
class KillReport:
    kills: list[Kill] = field(default_factory=list)
    reader: dict[str, Any] = field(default_factory=dict)

    def reader_stalls(self, kill_times: list[float]) -> list[float]:
        """For each kill, the longest reader operation that spanned it."""
        out = []
        for t in kill_times:
            spans = [op[3] - op[2] for op in self.reader["ops"] if op[2] <= t <= op[3]]
            out.append(max(spans, default=0.0))
        return out


def killed_under_reader(cache: Path, key: str, mountpoint: Path, image: FailoverImage,
                        stats: Any, kills: int = 10, seed: int = 3,
                        workdir: Path | None = None) -> tuple[KillReport, list[float]]:
    """Kill the process serving `key` (SIGKILL) `kills` times while a reader runs on
    mountpoint; each time also read a file never read before, at once. `stats()` gives
    the serving process's stats. The report and the kill times (time.time())."""
    rng = random.Random(seed)
    report = KillReport()
    kill_times: list[float] = []
    spare = list(image.spare)
    reader = Reader(mountpoint, image, workdir or cache.parent / "reader")
    try:
        time.sleep(0.5)
        for _ in range(kills):
            held = wait_served(cache, key)
            time.sleep(rng.uniform(0.2, 0.5))
            victim = int(held["pid"])
            kill_times.append(time.time())
            os.kill(victim, signal.SIGKILL)
            rel = spare.pop(0)
            dead = read_now(mountpoint / rel, image.files[rel])
            now = wait_served(cache, key, not_pid=victim)
            st = stats()
            metrics = st.get("metrics") or {}
            failover = st.get("failover") or st.get("view") or {}
            report.kills.append(Kill(victim, int(now["pid"]), float(now["stalls"][-1]), dead,
                                     int(metrics.get("reads", 0)) +
                                     int(metrics.get("lookups", 0)),
                                     int(failover.get("resent_requests", 0))))
    finally:
        report.reader = reader.stop()
    return report, kill_times
