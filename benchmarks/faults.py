"""The reliability suite at larger counts: faults survived, hostile input refused, fuzzing.

    python -m benchmarks.faults [--quick] [--fuzz-seconds N] [--seed N] [--out DIR]
                                [--only SECTION[,SECTION...]]

Runs the scenarios of casfs.testing.faults (the functions tests/test_faults.py runs at
small counts, here more and bigger runs), against a real SeaweedFS behind the
fault-injecting proxy (casfs.testing.proxy), with real FUSE mounts, and every byte read
compared with the source data:

  faults       boots (mount + read every file, empty cache) and indexes under injected
               500/503s, connection resets and stalls past the read timeout, at several
               rates; a first boot and boots replaying its trace
  altered      blobs and packs altered in the store: EIO and a log line, never wrong bytes
  kill_index   kill -9 of `casfs index` at seeded random points (file store and SeaweedFS):
               no partial object, re-runs give the clean manifest
  kill_daemon  kill -9 of the daemon mid-boot: the next mount works, the cache is consistent
  disk_full    the cache on a 2 MiB tmpfs: served uncached, no crash
  many_mounts  many mounts, one cache, many reader threads: no corruption, no deadlock
  hostile      tests/test_hostile.py + tests/test_bad_input.py re-run, and a corpus of
               hostile layers and manifests through the CLI with a check that nothing is
               written outside the store and cache
  fuzz         the manifest reader and layer ingestion (plain, gzip, zstd; directory packs
               included), mutational and hypothesis-driven, for a fixed time budget
               (casfs.testing.fuzz); every seed must be accepted first

Writes benchmarks/results/<date>-faults[-quick].json and .md. Exits 1 if any wrong byte
was served, any hostile input was accepted or wrote outside its bounds, any fuzz input
crashed (an exception other than a casfs error) or any scenario failed; the failures are
listed in the results. A broken harness (a fuzz seed not accepted, a double that no longer
matches what casfs calls, an error in the harness's own code) is a HARNESS ERROR: the
fuzzing stops at once and the run fails with it at the top of the report, instead of
counting its errors as executions.

Owns: the sections' runs and counts, the hostile-input CLI checks and the report. The
scenarios, hostile inputs and fuzz targets live in casfs.testing (nothing here imports
from tests/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import RESULTS, git_revision, log, machine_info, now_iso, today  # noqa: E402
from casfs.testing import faults as sc  # noqa: E402
from casfs.testing import fuzz  # noqa: E402
from casfs.testing.hostile import hostile_layers, hostile_manifests  # noqa: E402
from casfs.testing.mounting import (  # noqa: E402
    CASFS,
    clear_leftovers,
    cli,
    fuse_unavailable_reason,
    is_mounted,
)
from casfs.testing.proxy import LatencyProxy  # noqa: E402
from casfs.testing.seaweed import s3_env  # noqa: E402

STORE_NOTE = ("SeaweedFS (weed server, single node, 127.0.0.1) behind casfs.testing.proxy."
              "LatencyProxy injecting faults (500/503 answers, connection resets, delays)")
SECTIONS = ("faults", "altered", "kill_index", "kill_daemon", "disk_full", "many_mounts",
            "hostile", "fuzz")


class Config:
    def __init__(self, quick: bool, fuzz_seconds: float | None, seed: int) -> None:
        self.quick = quick
        self.seed = seed
        self.rates = [0.0, 0.10, 0.30] if quick else [0.0, 0.05, 0.10, 0.30]
        self.reps = 1 if quick else 2  # fresh buckets per rate (each with a first boot)
        self.boots = 2 if quick else 3  # per rep: a first boot, then replays of its trace
        self.boot_files = 300 if quick else 600
        self.altered_seeds = [1] if quick else [1, 2, 3]
        self.kill_rounds_file = 1 if quick else 4
        self.kill_rounds_s3 = 1 if quick else 3
        self.daemon_kills = [20, 120] if quick else [5, 20, 60, 120, 200, 280]
        self.many_rounds = 1 if quick else 3
        self.many_mounts = [8] if quick else [8, 12]
        self.fuzz_seconds = fuzz_seconds if fuzz_seconds is not None else (30 if quick else 180)


# -- running sections ---------------------------------------------------------------------

class Run:
    """Collects each section's figures and every violation."""

    def __init__(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {}
        self.violations: list[str] = []
        self.harness_errors: list[str] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[dict[str, Any]]:
        figures: dict[str, Any] = {}
        entry: dict[str, Any] = {"status": "ok", "figures": figures}
        self.sections[name] = entry
        log(f"== {name}")
        t0 = time.monotonic()
        try:
            yield figures
        except sc.Unavailable as exc:  # e.g. no tmpfs
            entry["status"] = "skipped"
            entry["note"] = str(exc)
        except fuzz.HarnessError as exc:  # the harness is broken, not casfs: say so loudly
            entry["status"] = "HARNESS ERROR"
            entry["error"] = str(exc)[:6000]
            self.harness_errors.append(f"{name}: {exc}")
            self.violations.append(f"{name}: HARNESS ERROR: {str(exc)[:1500]}")
            log(f"!! {name}: HARNESS ERROR (the harness, not casfs): {str(exc)[:2000]}")
        except Exception as exc:  # AssertionError (a violation) or anything else
            entry["status"] = "FAILED"
            entry["error"] = f"{type(exc).__name__}: {exc}"[:4000]
            entry["traceback"] = traceback.format_exc()[-6000:]
            self.violations.append(f"{name}: {entry['error'][:500]}")
            log(f"!! {name} FAILED: {entry['error'][:300]}")
        entry["seconds"] = round(time.monotonic() - t0, 1)
        log(f"== {name}: {entry['status']} in {entry['seconds']:.0f}s")


def attempt(run: Run, section: str, what: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """One scenario run inside a section: its failure is recorded and the section goes on."""
    try:
        return fn()
    except sc.Unavailable:
        raise
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        run.violations.append(f"{section}: {what}: {msg[:500]}")
        run.sections[section]["status"] = "FAILED"
        run.sections[section].setdefault("failures", []).append(
            {"what": what, "error": msg[:4000], "traceback": traceback.format_exc()[-4000:]})
        log(f"!! {section}: {what} FAILED: {msg[:300]}")
        return None


# -- faults ---------------------------------------------------------------------------------

def section_faults(run: Run, cfg: Config, seaweed: Any, tmp: Path, fig: dict[str, Any]) -> None:
    image = sc.write_image(tmp / "boot-image", [sc.boot_files(n_small=cfg.boot_files,
                                                              n_big=6, seed=cfg.seed)])
    clean_ref = sc.index_cli(image, f"file://{tmp / 'boot-clean'}")
    fig["image"] = {"files": len(image.files), "bytes": sum(map(len, image.files.values()))}
    rows = {}
    for name, profile in sc.profiles(cfg.rates):
        agg: dict[str, Any] = {"profile": profile, "boots": 0, "first_boots": 0,
                               "replay_boots": 0, "files_read": 0, "bytes_read": 0,
                               "wrong_bytes": 0, "fetch_errors": 0, "io_errors": 0,
                               "boot_requests": 0, "index_requests": 0, "indexes": 0,
                               "injected_errors": 0, "injected_resets": 0, "injected_delays": 0,
                               "boot_seconds": [], "index_seconds": [], "failed_runs": 0}
        for rep in range(cfg.reps):
            seed = cfg.seed * 100 + rep
            log(f"faults {name} rep {rep}: index + {cfg.boots} boots")
            out = attempt(run, "faults", f"{name} rep {rep}", lambda p=profile, s=seed:
                          sc.boot_under_faults(seaweed, image, clean_ref, tmp / "runs", p,
                                               boots=cfg.boots, seed=s, index=True))
            if out is None:
                agg["failed_runs"] += 1
                if "WRONG BYTES" in run.sections["faults"]["failures"][-1]["error"]:
                    agg["wrong_bytes"] += 1
                continue
            agg["indexes"] += 1
            agg["index_requests"] += out["index"]["requests"]
            agg["index_seconds"].append(out["index"]["seconds"])
            for k in ("injected_errors", "injected_resets", "injected_delays"):
                agg[k] += out["injected"][k]
            for i, b in enumerate(out["boots"]):
                agg["boots"] += 1
                agg["first_boots" if i == 0 else "replay_boots"] += 1
                agg["files_read"] += b["files"]
                agg["bytes_read"] += b["bytes_read"]
                agg["boot_requests"] += b["requests"]
                agg["boot_seconds"].append(b["seconds"])
                agg["fetch_errors"] += b["fetch_errors"]
                agg["io_errors"] += b["io_errors"]
        faults = agg["injected_errors"] + agg["injected_resets"] + agg["injected_delays"]
        agg["faults_injected"] = faults
        agg["requests"] = agg["boot_requests"] + agg["index_requests"]
        # answered by the store (not turned into an error or a reset by the proxy)
        agg["served_by_store"] = agg["requests"] - agg["injected_errors"] - agg["injected_resets"]
        rows[name] = agg
    fig["profiles"] = rows


# -- a store that lies ---------------------------------------------------------------------

def section_altered(run: Run, cfg: Config, seaweed: Any, tmp: Path, fig: dict[str, Any]) -> None:
    blobs: list[dict[str, Any]] = []
    packs: list[dict[str, Any]] = []
    for seed in cfg.altered_seeds:
        url = f"s3://{seaweed.make_bucket()}/casfs"
        with sc.s3_environment(seaweed):
            out = attempt(run, "altered", f"blobs seed {seed}", lambda u=url, s=seed:
                          sc.altered_blobs_scenario(seaweed, u, tmp / "altered", n_files=40,
                                                    n_altered=12, seed=s))
            if out:
                blobs.append(out)
            url = f"s3://{seaweed.make_bucket()}/casfs"
            out = attempt(run, "altered", f"pack seed {seed}", lambda u=url, s=seed:
                          sc.altered_pack_scenario(seaweed, u, tmp / "altered", n_files=30,
                                                   n_altered=3, seed=s))
            if out:
                packs.append(out)
    kinds: dict[str, int] = {}
    for b in blobs:
        for k, n in b["kinds"].items():
            kinds[k] = kinds.get(k, 0) + n
    fig["blobs"] = {"runs": len(blobs), "altered": sum(b["altered"] for b in blobs),
                    "eio": sum(b["eio"] for b in blobs), "kinds": kinds,
                    "files_right": sum(b["files_right"] for b in blobs), "wrong_bytes": 0}
    fig["packs"] = {"runs": len(packs),
                    "frames_altered": sum(p["pack_frames_altered"] for p in packs),
                    "chunks_rejected": sum(p["pack_chunks_rejected"] for p in packs),
                    "files_right": sum(p["files_right"] for p in packs),
                    "blobs_altered": sum(p["blobs_altered"] for p in packs),
                    "eio": sum(p["eio"] for p in packs), "wrong_bytes": 0}


# -- kill -9 --------------------------------------------------------------------------------

def section_kill_index(run: Run, cfg: Config, seaweed: Any, tmp: Path, fig: dict[str, Any]) -> None:
    image, clean_ref, seconds, blobs = sc.build_kill_image(tmp / "kill-image")
    fig["image"] = {"bytes": sum(map(len, image.files.values())), "files": len(image.files),
                    "layers": image.layers, "blobs": blobs, "clean_index_seconds": round(seconds, 2)}
    rounds: list[dict[str, Any]] = []

    def one(kind: str, r: int) -> dict[str, Any]:
        seed = cfg.seed * 1000 + r + (500 if kind == "s3" else 0)
        if kind == "file":
            url = f"file://{tmp / f'kill-store-{r}'}"
            out = sc.kill_index_at_random_points(image, url, clean_ref, kills=6, seed=seed,
                                                 clean_seconds=seconds, total_blobs=blobs)
        else:
            url = f"s3://{seaweed.make_bucket()}/casfs"
            with sc.s3_environment(seaweed), \
                    LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=20) as proxy:
                out = sc.kill_index_at_random_points(image, url, clean_ref, kills=6, seed=seed,
                                                     clean_seconds=seconds, total_blobs=blobs,
                                                     env=sc.proxy_env(seaweed, proxy))
        out["store"] = kind
        return out

    for kind, n in (("file", cfg.kill_rounds_file), ("s3", cfg.kill_rounds_s3)):
        for r in range(n):
            log(f"kill_index {kind} round {r}")
            out = attempt(run, "kill_index", f"{kind} round {r}", lambda k=kind, r=r: one(k, r))
            if out:
                rounds.append(out)
    kills = [k for r in rounds for k in r["kills"]]
    by_kind: dict[str, dict[str, int]] = {}
    for k in kills:
        kind = k["point"].split(":")[0]
        d = by_kind.setdefault(kind, {"tried": 0, "landed": 0})
        d["tried"] += 1
        d["landed"] += int(k["killed"])
    fig["rounds"] = len(rounds)
    fig["kills_tried"] = len(kills)
    fig["kills_landed"] = sum(int(k["killed"]) for k in kills)
    fig["by_kind"] = by_kind
    fig["store_problems"] = 0  # any would have failed the round
    fig["reruns_identical"] = len(rounds)
    fig["gc_refused_with_stale_locks"] = sum(
        1 for r in rounds if r["stale_index_locks"] and r["gc_with_stale_locks"]["exit"] == 9)
    fig["rounds_with_stale_locks"] = sum(1 for r in rounds if r["stale_index_locks"])
    fig["details"] = rounds


def section_kill_daemon(run: Run, cfg: Config, seaweed: Any, tmp: Path, fig: dict[str, Any]) -> None:
    image = sc.write_image(tmp / "daemon-image", [sc.boot_files(seed=cfg.seed + 7)])
    url = f"s3://{seaweed.make_bucket()}/casfs"
    sc.index_cli(image, url, tag="img", env=s3_env(seaweed))
    outs = []
    with sc.s3_environment(seaweed), \
            LatencyProxy("127.0.0.1", seaweed.s3_port, latency_ms=5) as proxy:
        for i, after in enumerate(cfg.daemon_kills):
            log(f"kill_daemon after {after} chunks")
            out = attempt(run, "kill_daemon", f"kill after {after} chunks", lambda a=after, i=i:
                          sc.kill_daemon_during_boot(image, url, tmp / "daemon", seed=i,
                                                     kill_after_chunks=a,
                                                     env=sc.proxy_env(seaweed, proxy),
                                                     require_inflight=False))
            if out:
                out["kill_after_chunks"] = after
                outs.append(out)
    fig["kills"] = len(outs)
    fig["killed_mid_boot"] = sum(1 for o in outs if o["killed_mid_boot"])
    fig["reads_failed_by_kills"] = sum(o["reads_failed_by_kill"] for o in outs)
    fig["remounts_all_right"] = sum(1 for o in outs if o["remount"]["files_ok"] == len(image.files))
    fig["orphans_left_by_kills"] = sum(o["cache_after_kill"]["orphans"] for o in outs)
    fig["details"] = outs


# -- disk full, many mounts ------------------------------------------------------------------

def section_disk_full(run: Run, cfg: Config, tmp: Path, fig: dict[str, Any]) -> None:
    fig.update(sc.disk_full_scenario(tmp / "disk", rounds=2 if cfg.quick else 4,
                                     seed=cfg.seed))


def section_many_mounts(run: Run, cfg: Config, tmp: Path, fig: dict[str, Any]) -> None:
    runs = []
    for n in cfg.many_mounts:
        log(f"many_mounts: {n} mounts")
        out = attempt(run, "many_mounts", f"{n} mounts", lambda n=n:
                      sc.many_mounts_scenario(tmp / f"many-{n}", mounts=n, n_images=3,
                                              threads=max(24, 3 * n), rounds=cfg.many_rounds,
                                              seed=cfg.seed + n))
        if out:
            runs.append(out)
    fig["runs"] = runs


# -- hostile input ----------------------------------------------------------------------------

def _tree(root: Path, skip: set[Path]) -> dict[str, tuple[int, int]]:
    """Every file under root (but the skipped directories): path -> (size, mtime)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) not in skip]
        for name in filenames + dirnames:
            p = Path(dirpath, name)
            with contextlib.suppress(OSError):
                st = p.lstat()
                out[str(p.relative_to(root))] = (st.st_size, int(st.st_mtime_ns))
    return out


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str | None:
    """Why a refusal is not clean, or None: non-zero, one `casfs: error:` line, no traceback."""
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == 0:
        return "accepted (exit 0)"
    if len(lines) != 1 or not lines[0].startswith("casfs: error: "):
        return f"not one clear error line: {proc.stderr.strip()[-500:]!r}"
    return None


def section_hostile(run: Run, cfg: Config, tmp: Path, fig: dict[str, Any]) -> None:
    from casfs.store import open_store
    from casfs.testing import ocibuild as ob

    # 1. the hostile-input test files, re-run
    junit = tmp / "hostile-junit.xml"
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_hostile.py",
                           "tests/test_bad_input.py", "-q", "-p", "no:cacheprovider",
                           f"--junitxml={junit}"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    counts = {"tried": 0, "refused": 0, "failed": 0, "skipped": 0}
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            counts["tried"] += 1
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["refused"] += 1
    counts["seconds"] = round(time.monotonic() - t0, 1)
    fig["test_files"] = counts
    if proc.returncode != 0 or counts["failed"]:
        run.violations.append(f"hostile: the hostile-input tests failed:\n{proc.stdout[-3000:]}")
        run.sections["hostile"]["status"] = "FAILED"

    # 2. hostile layers through `casfs index`, with a check of everything outside the store
    token = os.urandom(4).hex()
    sandbox = tmp / "hostile"
    sandbox.mkdir(parents=True, exist_ok=True)
    outside = Path(tempfile.gettempdir()) / f"casfs-escape-{token}"
    store_dir, cwd = sandbox / "store", sandbox / "cwd"
    cwd.mkdir(exist_ok=True)
    url = f"file://{store_dir}"
    ob.write_oci_layout(sandbox / "good", [[ob.file("etc/os-release", "ID=casfs\n")]], tag="t")
    assert cli("index", f"oci:{sandbox / 'good'}:t", "--store", url, "--tag", "good").returncode == 0
    store = open_store(url)
    results = []
    for name, layer, expect, env in hostile_layers(token, outside):
        layout = sandbox / "layouts" / re.sub(r"\W+", "-", name)
        ob.write_oci_layout(layout, [[ob.file("base", "base")], layer], tag="t")
        visible = {p: set(store.backend.list(p)) for p in ("manifests/", "tags/", "layers/")}
        before = _tree(sandbox, {store_dir, sandbox / "layouts"})
        full_env = dict(os.environ, **env)
        full_env.pop("CASFS_STORE", None)
        p = subprocess.run([*CASFS, "index", f"oci:{layout}:t", "--store", url, "--tag", "h"],
                           cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
        after = _tree(sandbox, {store_dir, sandbox / "layouts"})
        problems = []
        if before != after:
            problems.append(f"wrote outside the store: {sorted(set(after) ^ set(before))[:5]}")
        if outside.exists():
            problems.append(f"created {outside}")
        if expect == "refused":
            why = _one_line_error(p)
            if why:
                problems.append(why)
            now = {q: set(store.backend.list(q)) for q in ("manifests/", "tags/", "layers/")}
            if now != visible:
                problems.append("left a manifest, tag or layer record in the store")
            outcome = "refused" if not problems else "ACCEPTED" if p.returncode == 0 else "unclean"
        else:  # contained: accepted, with the entry at that path inside the image
            inside = expect.partition(":")[2]
            ref = p.stdout.strip().splitlines()[-1] if p.returncode == 0 else ""
            ls = cli("ls", ref, inside, "--store", url) if ref else None
            if p.returncode != 0 and not _one_line_error(p):
                outcome = "refused"
            elif ls is None or ls.returncode != 0 or inside not in ls.stdout:
                problems.append(f"accepted, but {inside} is not in the image: "
                                f"{p.stderr[-300:]} {ls.stderr if ls else ''}")
                outcome = "unclean"
            else:
                outcome = "contained"
            with contextlib.suppress(Exception):
                store.backend.delete("tags/h")
        results.append({"input": name, "expect": expect, "outcome": outcome,
                        "exit": p.returncode, "error": p.stderr.strip()[-300:],
                        "problems": problems})
        if problems:
            run.violations.append(f"hostile: layer {name!r}: {'; '.join(problems)}")
            run.sections["hostile"]["status"] = "FAILED"
    shutil.rmtree(sandbox / "layouts", ignore_errors=True)
    fig["layers"] = results

    # 3. hostile manifests through `casfs mount`
    mnt, cache = sandbox / "mnt", sandbox / "cache"
    mnt.mkdir(exist_ok=True)
    mres = []
    for name, data in hostile_manifests():
        digest = store.put_manifest(data)
        store.set_tag("evil", digest)
        before = _tree(sandbox, {store_dir, cache})
        p = cli("mount", "evil", str(mnt), "--store", url, "--cache-dir", str(cache), timeout=60)
        problems = []
        why = _one_line_error(p)
        if why:
            problems.append(why)
        if (cache / "manifests" / digest).exists():
            problems.append("kept in the cache")
        if is_mounted(mnt):
            problems.append("mounted")
            clear_leftovers(mnt)
        if _tree(sandbox, {store_dir, cache}) != before:
            problems.append("wrote outside the store and cache")
        mres.append({"input": name, "outcome": "refused" if not problems else "ACCEPTED",
                     "exit": p.returncode, "error": p.stderr.strip()[-300:], "problems": problems})
        if problems:
            run.violations.append(f"hostile: manifest {name!r}: {'; '.join(problems)}")
            run.sections["hostile"]["status"] = "FAILED"
    # a manifest object altered in the store (its bytes no longer match its name)
    good = store.get_tag("good")
    key = f"manifests/{good}"
    original = store.backend.get(key)
    from casfs.store.content import compress

    store.backend.put(key, compress(store.get_manifest(good)[:-1] + b"\x01"))
    p = cli("mount", "good", str(mnt), "--store", url, "--cache-dir", str(sandbox / "cache2"))
    problems = [why] if (why := _one_line_error(p)) else []
    if is_mounted(mnt):
        problems.append("mounted")
        clear_leftovers(mnt)
    mres.append({"input": "manifest object altered in the store", "exit": p.returncode,
                 "outcome": "refused" if not problems else "ACCEPTED",
                 "error": p.stderr.strip()[-300:], "problems": problems})
    if problems:
        run.violations.append(f"hostile: altered manifest object: {problems}")
        run.sections["hostile"]["status"] = "FAILED"
    store.backend.put(key, original)
    fig["manifests"] = mres
    fig["summary"] = {
        "layers_tried": len(results),
        "layers_refused": sum(r["outcome"] == "refused" for r in results),
        "layers_contained": sum(r["outcome"] == "contained" for r in results),
        "manifests_tried": len(mres),
        "manifests_refused": sum(r["outcome"] == "refused" for r in mres),
        "accepted_or_unclean": sum(r["outcome"] not in ("refused", "contained")
                                   for r in results + mres),
        "writes_outside": sum(any("outside" in q or "created" in q for q in r["problems"])
                              for r in results + mres),
    }


# -- fuzzing -----------------------------------------------------------------------------------

def section_fuzz(run: Run, cfg: Config, tmp: Path, crash_dir: Path, fig: dict[str, Any]) -> None:
    fuzz.register_harness(__file__)
    targets = fuzz.fuzz_targets()
    fuzz.check_seeds(targets)  # a seed not accepted: HarnessError, before any counting
    per = cfg.fuzz_seconds / len(targets)
    sandbox = tmp / "fuzz-cwd"
    sandbox.mkdir(parents=True, exist_ok=True)
    old_cwd = os.getcwd()
    os.chdir(sandbox)
    try:
        for i, target in enumerate(targets):
            log(f"fuzz {target.name}: {per:.0f}s")
            fuzz.fuzz_target(target, per, random.Random(cfg.seed * 7919 + i), crash_dir,
                             cfg.seed, hypothesis_home=tmp / "hypothesis-home")
    finally:
        os.chdir(old_cwd)
        fig["targets"] = {t.name: {**t.stats, "crash_inputs": t.crashes} for t in targets}
    written = [p.name for p in sandbox.rglob("*")]
    fig["seconds"] = round(sum(t.stats["seconds"] for t in targets), 1)
    fig["executions"] = sum(t.stats["executions"] for t in targets)
    fig["crashes"] = sum(t.stats["crashes"] + t.stats["timeouts"] for t in targets)
    fig["files_written_by_inputs"] = written
    for t in targets:
        for c in t.crashes:
            run.violations.append(f"fuzz: {t.name}: {c['error'][:300]} (input kept at {c['input']})")
    if fig["crashes"] or written:
        run.sections["fuzz"]["status"] = "FAILED"
        if written:
            run.violations.append(f"fuzz: inputs wrote files: {written[:5]}")


# -- report ----------------------------------------------------------------------------------

def _fmt(n: float | int) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def render_md(res: dict[str, Any]) -> str:
    m = res["machine"]
    s = res["sections"]
    out = [f"# casfs reliability suite ({'quick' if res['quick'] else 'full'})", "",
           f"- date: {res['date']}; revision {res['revision']}",
           f"- machine: {m['nproc']} CPUs ({m['cpu']}), {m['mem_bytes'] / 2**30:.0f} GiB, "
           f"kernel {m['kernel']}, Python {m['python']}",
           f"- store: {res['store']}",
           f"- total time: {res['seconds'] / 60:.1f} min; result: "
           f"**{'PASS' if not res['violations'] else 'FAIL'}** "
           f"({len(res['violations'])} violations)", ""]
    for h in res.get("harness_errors", []):
        out += ["**HARNESS ERROR** (the benchmark's harness is broken, not casfs; its "
                "section measured nothing):", "", "```", h[:3000], "```", ""]
    f = s.get("faults", {}).get("figures", {})
    if f.get("profiles"):
        img = f["image"]
        out += ["## Boots and indexes under injected faults", "",
                f"Image: {img['files']} files, {img['bytes'] / 1e6:.1f} MB. Each run: `casfs index` "
                "through the faulty proxy (its manifest must equal a clean index's), then boots with "
                "an empty cache reading every file (the first records a trace, the others replay it).",
                "",
                "| profile | indexes | boots (first + replay) | requests | answered by the store "
                "| faults injected (5xx / resets / delays) | files read | MB read | runs with wrong bytes "
                "| fetch / io errors | failed runs | median boot s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, a in f["profiles"].items():
            med = sorted(a["boot_seconds"])[len(a["boot_seconds"]) // 2] if a["boot_seconds"] else 0
            out.append(f"| {name} | {a['indexes']} | {a['boots']} ({a['first_boots']} + "
                       f"{a['replay_boots']}) | {_fmt(a['requests'])} | {_fmt(a['served_by_store'])} | "
                       f"{_fmt(a['faults_injected'])} "
                       f"({a['injected_errors']} / {a['injected_resets']} / {a['injected_delays']}) | "
                       f"{_fmt(a['files_read'])} | {a['bytes_read'] / 1e6:.1f} | {a['wrong_bytes']} | "
                       f"{a['fetch_errors']} / {a['io_errors']} | {a['failed_runs']} | {med:.1f} |")
        out += ["", "Profiles: N% = N% of requests answered 500 (503 from 20%), N/3% connections "
                "reset, min(N,10)% delayed 200 ms; stalls = 5% of requests held 2.5 s past a 1 s "
                "read timeout (`CASFS_S3_READ_TIMEOUT=1`).", ""]
    a = s.get("altered", {}).get("figures", {})
    if a.get("blobs"):
        b, p = a["blobs"], a["packs"]
        out += ["## A store that lies", "",
                f"- blobs altered in the store: {b['altered']} ({', '.join(f'{k}: {n}' for k, n in b['kinds'].items())}); "
                f"reads answered EIO with a log line naming the digest: {b['eio']}; other files read right: "
                f"{b['files_right']}; wrong bytes: {b['wrong_bytes']}",
                f"- packs altered (every frame a valid zstd frame of other bytes): {p['runs']} packs, "
                f"{p['frames_altered']} frames; chunks the prefetch rejected: {p['chunks_rejected']}; "
                f"files read right from the blobs: {p['files_right']}; pack and blob altered: "
                f"{p['blobs_altered']} → EIO {p['eio']}; wrong bytes: {p['wrong_bytes']}", ""]
    k = s.get("kill_index", {}).get("figures", {})
    if k.get("kills_tried"):
        kinds = ", ".join(f"{n}: {d['landed']}/{d['tried']}" for n, d in k["by_kind"].items())
        out += ["## kill -9 of `casfs index`", "",
                f"Image: {k['image']['bytes'] / 1e6:.1f} MB, {k['image']['files']} files in "
                f"{k['image']['layers']} layers, {k['image']['blobs']} blobs. {k['rounds']} rounds "
                "of 6 kills on one store each (file store, and SeaweedFS behind a 20 ms proxy).", "",
                f"- kills: {k['kills_tried']} tried, {k['kills_landed']} landed on a running index "
                f"({kinds})",
                f"- partial or dangling objects found after a kill: {k['store_problems']}",
                f"- re-runs completing with the clean manifest digest: {k['reruns_identical']}/{k['rounds']}",
                f"- rounds leaving stale `locks/index-*`: {k['rounds_with_stale_locks']}; "
                f"`casfs gc` refused (exit 9) while they were fresh: {k['gc_refused_with_stale_locks']}",
                ""]
    d = s.get("kill_daemon", {}).get("figures", {})
    if d.get("kills"):
        out += ["## kill -9 of the daemon mid-boot", "",
                f"- kills: {d['kills']} ({d['killed_mid_boot']} with reads in flight; "
                f"{d['reads_failed_by_kills']} reads failed by the kills)",
                f"- remounts on the same path serving every file right: {d['remounts_all_right']}",
                f"- cache inconsistencies: 0; orphan chunk files left by kills (removed by "
                f"`casfs cache prune`): {d['orphans_left_by_kills']}", ""]
    df = s.get("disk_full", {})
    if df.get("figures"):
        g = df["figures"]
        out += ["## The cache's disk full", "",
                f"- 2 MiB tmpfs cache, {g['image_bytes'] / 1e6:.1f} MB image: "
                f"{g['filling']['reads']} reads ({g['filling']['bytes_read'] / 1e6:.0f} MB) all right, "
                f"{g['filling']['insert_failures']} chunks served uncached, "
                f"{g['filling']['warnings']} warning line(s) (at most one per 10 s), io errors 0",
                f"- disk full before the mount (manifest cached): {g['full_before_mount']['reads']} "
                "reads all right",
                f"- new cache directory on the full disk: {g['new_cache_on_full_disk']}", ""]
    elif df.get("status") == "skipped":
        out += ["## The cache's disk full", "", f"skipped: {df.get('note')}", ""]
    mm = s.get("many_mounts", {}).get("figures", {})
    if mm.get("runs"):
        out += ["## Many mounts, one cache", "",
                "| mounts | reader threads | reads | GB read | seconds | evictions | wrong bytes |",
                "|---|---|---|---|---|---|---|"]
        for r in mm["runs"]:
            out.append(f"| {r['mounts']} | {r['threads']} | {_fmt(r['reads'])} | "
                       f"{r['bytes_read'] / 1e9:.2f} | {r['seconds']} | {_fmt(r['evictions'])} | 0 |")
        out.append("")
    h = s.get("hostile", {}).get("figures", {})
    if h.get("summary"):
        t, sm = h["test_files"], h["summary"]
        out += ["## Hostile input", "",
                f"- tests/test_hostile.py + tests/test_bad_input.py: {t['tried']} cases, "
                f"{t['refused']} passed (refused as specified), {t['failed']} failed, "
                f"{t['skipped']} skipped",
                f"- hostile layers through `casfs index`: {sm['layers_tried']} tried, "
                f"{sm['layers_refused']} refused with one error line, {sm['layers_contained']} "
                "contained (entries under a symlinked parent, resolved inside the image root as "
                "Docker and umoci do: an absolute target starts at the root, `..` stops there)",
                f"- hostile manifests through `casfs mount`: {sm['manifests_tried']} tried, "
                f"{sm['manifests_refused']} refused",
                f"- accepted or unclean: {sm['accepted_or_unclean']}; wrote outside the store "
                f"and cache: {sm['writes_outside']}", "",
                "| input | outcome | error |", "|---|---|---|"]
        for r in h["layers"] + h["manifests"]:
            err = r["error"].replace("|", "\\|").replace("\n", " ")[:140]
            out.append(f"| {r['input']} | {r['outcome']} | {err} |")
        out.append("")
    fz = s.get("fuzz", {}).get("figures", {})
    if fz.get("targets"):
        out += ["## Fuzzing", "",
                f"{fz['seconds']:.0f} s, {_fmt(fz['executions'])} executions, {fz['crashes']} crashes.",
                "", "| target | seconds | executions (mutational / hypothesis) | refused | "
                "accepted | crashes | timeouts |", "|---|---|---|---|---|---|---|"]
        for name, t in fz["targets"].items():
            out.append(f"| {name} | {t['seconds']} | {_fmt(t['executions'])} ({_fmt(t['mutational'])} / "
                       f"{_fmt(t['hypothesis'])}) | {_fmt(t['refused'])} | {_fmt(t['accepted'])} | "
                       f"{t['crashes']} | {t['timeouts']} |")
        out.append("")
    out += ["## Sections", "", "| section | status | seconds |", "|---|---|---|"]
    for name, e in s.items():
        out.append(f"| {name} | {e['status']} | {e.get('seconds', 0)} |")
    if res["violations"]:
        out += ["", "## Violations", ""] + [f"- {v[:600]}" for v in res["violations"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer and smaller runs (~5 min)")
    p.add_argument("--fuzz-seconds", type=float, help="fuzzing budget (default 180; quick 30)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--only", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", help="results file name stem (default <date>-faults[-quick])")
    args = p.parse_args(argv)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    unknown = only - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    reason = fuse_unavailable_reason()
    if reason:
        print(f"benchmarks.faults: FUSE unavailable: {reason}", file=sys.stderr)
        return 2
    cfg = Config(args.quick, args.fuzz_seconds, args.seed)
    # Every casfs subprocess runs this tree, whatever its working directory (an editable
    # install elsewhere must not answer for it).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    stem = args.stem or f"{today()}-faults{'-quick' if args.quick else ''}"
    run = Run()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="casfs-faults-"))
    crash_dir = args.out / f"{stem}-crashes"
    try:
        from casfs.testing.seaweed import SeaweedServer

        needs_s3 = only & {"faults", "altered", "kill_index", "kill_daemon", "disk_full",
                           "many_mounts"}
        with SeaweedServer(tmp / "seaweed") if needs_s3 else contextlib.nullcontext() as seaweed:
            if seaweed is not None:
                log(f"SeaweedFS up on :{seaweed.s3_port}; work dir {tmp}")
            if "faults" in only:
                with run.section("faults") as fig:
                    section_faults(run, cfg, seaweed, tmp, fig)
            if "altered" in only:
                with run.section("altered") as fig:
                    section_altered(run, cfg, seaweed, tmp, fig)
            if "kill_index" in only:
                with run.section("kill_index") as fig:
                    section_kill_index(run, cfg, seaweed, tmp, fig)
            if "kill_daemon" in only:
                with run.section("kill_daemon") as fig:
                    section_kill_daemon(run, cfg, seaweed, tmp, fig)
            if "disk_full" in only:
                with run.section("disk_full") as fig:
                    section_disk_full(run, cfg, tmp, fig)
            if "many_mounts" in only:
                with run.section("many_mounts") as fig:
                    section_many_mounts(run, cfg, tmp, fig)
        if "hostile" in only:
            with run.section("hostile") as fig:
                section_hostile(run, cfg, tmp, fig)
        if "fuzz" in only:
            with run.section("fuzz") as fig:
                section_fuzz(run, cfg, tmp, crash_dir, fig)
    finally:
        left = clear_leftovers(tmp)
        if left:
            run.violations.append(f"mounts left behind (cleared): {left}")
        # a tmpfs the disk-full scenario could not unmount keeps its directory
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
    wrong = [v for v in run.violations if "WRONG BYTES" in v]
    res = {
        "benchmark": "faults", "date": now_iso(), "quick": args.quick, "seed": args.seed,
        "machine": machine_info(), "revision": git_revision(), "store": STORE_NOTE,
        "config": {k: v for k, v in vars(cfg).items()},
        "seconds": round(time.monotonic() - t0, 1),
        "wrong_bytes_served": bool(wrong),
        "harness_errors": run.harness_errors,
        "sections": run.sections, "violations": run.violations,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = render_md(res)
    (args.out / f"{stem}.md").write_text(md)
    print(md)
    log(f"wrote {args.out / stem}.json and .md")
    if run.harness_errors:
        print(f"benchmarks.faults: HARNESS ERROR in {len(run.harness_errors)} section(s); "
              "fix the harness, the figures of those sections are void", file=sys.stderr)
    return 1 if run.violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
