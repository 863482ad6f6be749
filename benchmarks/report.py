"""Turning a cold-start results dict into what people read: the console summary, the
Markdown table, the JSON file and the PNG chart, plus the brief's targets evaluated
against the measured ratios (reported, never enforced).

The results dict (written as JSON verbatim) looks like::

    {"benchmark": "coldstart", "date": ..., "machine": {...}, "config": {..., "modes": [..]},
     "image": {... sizes, file counts ...}, "page_cache": {...}, "prefetch": {...},
     "workloads": [{"name": "torch", "code": "import torch", "primary": true,
                    "scenarios": {"native_cold": {"status": "ok", "runs": [...],
                                                  "wall": {"median": ..}, ...},
                                  "native_warm": ..., "full_pull": ...},
                    "modes": {"kernel": {"scenarios": {"casfs_first": ..., ...},
                                         "targets": [...]},
                              "fuse": {...}}}]}

The natives and the full pull are measured once per run (``scenarios``); the casfs
scenarios once per serving mode (``modes``), and each mode's targets are evaluated against
the same natives. Results written before the mode column (no ``modes``: the casfs
scenarios in ``scenarios``, the targets in ``targets``) render as one unnamed mode.

Every scenario has a ``status`` ("ok", "n/a" or "error") and a ``note``; ok scenarios have
``runs`` (one dict per run) and a summary (median/min/max) for each numeric field of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCENARIOS: list[tuple[str, str, str]] = [
    ("native_cold", "native cold", "image extracted to local disk, page cache dropped"),
    ("native_warm", "native warm", "local disk, page cache warm"),
    ("full_pull", "full pull", "download every layer blob through the proxy, decompress, "
     "extract, then import"),
    ("casfs_first", "casfs first boot", "empty cache dir, fresh mount, page cache dropped, "
     "no trace"),
    ("casfs_noprefetch", "casfs --no-prefetch", "empty cache dir, fresh mount, page cache "
     "dropped, trace replay and readahead/sibling heuristics off"),
    ("casfs_prefetched", "casfs prefetched boot", "empty cache dir, fresh mount, page cache "
     "dropped, trace recorded by an earlier boot"),
    ("casfs_warm", "casfs warm cache", "cache dir kept, fresh mount, page cache dropped"),
    ("casfs_hot", "casfs hot", "same mount, page cache warm"),
]
LABELS = {key: label for key, label, _ in SCENARIOS}
REFERENCE = ("native_cold", "native_warm", "full_pull")  # measured once, whatever the mode

# (description, numerator, denominator, limit); numerator/denominator are functions of a
# workload's scenarios returning a number or None.
Getter = Callable[[dict[str, Any]], float | None]


def _med(scenario: str, field: str = "wall") -> Getter:
    def get(sc: dict[str, Any]) -> float | None:
        s = sc.get(scenario) or {}
        if s.get("status") != "ok":
            return None
        return (s.get(field) or {}).get("median")
    get.scenario, get.field = scenario, field  # type: ignore[attr-defined]
    return get


# "The bytes the import reads": the FUSE daemon's read_bytes on a first boot. A kernel-mode
# mount only counts what its view serves (the kernel reads the rest itself), so a kernel-mode
# evaluation is given the same run's FUSE first boot as READS_REFERENCE.
READS_REFERENCE = "reads_reference"


def _reads() -> Getter:
    def get(sc: dict[str, Any]) -> float | None:
        ref = _med(READS_REFERENCE, "read_bytes")(sc)
        return ref if ref is not None else _med("casfs_first", "read_bytes")(sc)
    return get


# The brief's table ("The numbers we aim at").
TARGETS: list[tuple[str, Getter, Getter, float]] = [
    ("prefetched boot ≤ 1.2× native cold", _med("casfs_prefetched"), _med("native_cold"), 1.2),
    ("first boot (no trace) ≤ 2.2× native cold", _med("casfs_first"), _med("native_cold"), 2.2),
    ("first boot (no trace) ≤ 0.5× full pull", _med("casfs_first"), _med("full_pull"), 0.5),
    ("warm cache ≤ 1.1× native cold", _med("casfs_warm"), _med("native_cold"), 1.1),
    ("prefetched boot ≤ 0.2× full pull", _med("casfs_prefetched"), _med("full_pull"), 0.2),
    ("bytes fetched on a prefetched boot ≤ 1.3× bytes the import reads",
     _med("casfs_prefetched", "fetched_bytes"), _reads(), 1.3),
]
# Shown beside the targets for context; not targets of the brief.
INFO: list[tuple[str, Getter, Getter]] = [
    ("hot (page cache warm) vs native warm", _med("casfs_hot"), _med("native_warm")),
    ("chunk bytes brought to the node on a prefetched boot (uncompressed) vs bytes the "
     "import reads", _med("casfs_prefetched", "cache_bytes"), _reads()),
    ("bytes fetched on a first boot vs bytes the import reads",
     _med("casfs_first", "fetched_bytes"), _reads()),
]
# Context in seconds (not ratios): CPU of the process serving the mount during the import.
CPU_INFO: list[tuple[str, Getter]] = [
    ("daemon CPU during a warm boot's import (FUSE daemon / node view service)",
     _med("casfs_warm", "daemon_cpu")),
]
RSS_LIMIT = 150e6


def evaluate_targets(scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with its measured ratio and whether it is met (None: not measurable).
    ``scenarios``: the natives, one mode's casfs scenarios and, for kernel mode, the FUSE
    first boot as READS_REFERENCE (what the import reads)."""
    out = []
    for desc, num, den, limit in TARGETS:
        r = _ratio(num(scenarios), den(scenarios))
        row = {"target": desc, "limit": limit, "measured": r,
               "met": None if r is None else r <= limit}
        scen = getattr(num, "scenario", None)
        if getattr(num, "field", None) == "wall" and scen and scen.startswith("casfs"):
            # The same ratio without the `casfs mount` start-up: the data path alone.
            row["measured_import"] = _ratio(_med(scen, "import")(scenarios), den(scenarios))
        out.append(row)
    rss = [(scenarios.get(k) or {}).get("rss_bytes", {}).get("max")
           for k in ("casfs_first", "casfs_noprefetch", "casfs_prefetched", "casfs_warm", "casfs_hot")
           if (scenarios.get(k) or {}).get("status") == "ok"]
    rss = [v for v in rss if v is not None]
    peak = max(rss) if rss else None
    out.append({"target": "daemon RSS ≤ 150 MB (image mounted, after the import)",
                "limit": RSS_LIMIT, "measured": peak, "unit": "bytes",
                "met": None if peak is None else peak <= RSS_LIMIT})
    for desc, num, den in INFO:
        r = _ratio(num(scenarios), den(scenarios))
        out.append({"target": desc, "limit": None, "measured": r, "met": None, "info": True})
    for desc, get in CPU_INFO:
        out.append({"target": desc, "limit": None, "measured": get(scenarios), "unit": "s",
                    "met": None, "info": True})
    return out


def mode_views(wl: dict[str, Any]) -> list[tuple[str | None, dict[str, Any], list[dict[str, Any]]]]:
    """Per serving mode: (mode, the natives and that mode's casfs scenarios, its targets).
    A result from before the mode column is one view, mode None."""
    modes = wl.get("modes")
    if not modes:
        return [(None, wl["scenarios"], wl.get("targets", []))]
    return [(mode, {**wl["scenarios"], **(mv.get("scenarios") or {})}, mv.get("targets") or [])
            for mode, mv in modes.items()]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# -- formatting -------------------------------------------------------------------------


def fmt_s(summary: dict[str, Any] | None, digits: int = 2) -> str:
    """'1.23 (1.20–1.31)' from a summary; one value alone when n == 1."""
    if not summary or summary.get("median") is None:
        return "–"
    med, lo, hi = summary["median"], summary["min"], summary["max"]
    if summary.get("n", 1) <= 1 or lo == hi:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}–{hi:.{digits}f})"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_int(n: float | None) -> str:
    return "–" if n is None else f"{n:,.0f}"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _median(sc: dict[str, Any], field: str) -> float | None:
    return (sc.get(field) or {}).get("median")


def _target_line(t: dict[str, Any]) -> tuple[str, str, str]:
    if t.get("unit") == "bytes":
        measured = fmt_bytes(t["measured"])
    elif t.get("unit") == "s":
        measured = "–" if t["measured"] is None else f"{t['measured']:.2f} s"
    else:
        measured = fmt_ratio(t["measured"])
    if t.get("measured_import") is not None:
        measured += f" ({fmt_ratio(t['measured_import'])} without mount)"
    if t.get("info"):
        verdict = "(context, not a target)"
    elif t["met"] is None:
        verdict = "n/a"
    else:
        verdict = "met" if t["met"] else "NOT met"
    return t["target"], measured, verdict


def workload_table(wl: dict[str, Any], image_bytes: int | None,
                   casfs_only: bool = False) -> list[str]:
    """Markdown rows for one workload's scenarios (``wl["scenarios"]``: the natives and one
    mode's casfs scenarios); ``casfs_only`` leaves the natives and the pull out."""
    rows = [
        "| scenario | wall s, median (min–max) | × native cold | mount s | import s | "
        "import × native cold | requests | fetched (proxy) | FUSE read bytes | read / image "
        "| daemon RSS | daemon CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    scen = wl["scenarios"]
    base = _median(scen.get("native_cold", {}), "wall")
    for key, label, _ in SCENARIOS:
        sc = scen.get(key)
        if sc is None or (casfs_only and key in REFERENCE):
            continue
        if sc.get("status") != "ok":
            rows.append(f"| {label} | {sc.get('status')}: {sc.get('note', '')} |" + " |" * 11)
            continue
        wall = _median(sc, "wall")
        read = _median(sc, "read_bytes")
        rows.append("| " + " | ".join([
            label,
            fmt_s(sc.get("wall")),
            fmt_ratio(_ratio(wall, base)),
            fmt_s(sc.get("mount")) if sc.get("mount") else "–",
            fmt_s(sc.get("import")) if sc.get("mount") else "–",
            fmt_ratio(_ratio(_median(sc, "import"), base)) if sc.get("mount") else "–",
            fmt_int(_median(sc, "requests")),
            fmt_bytes(_median(sc, "fetched_bytes")),
            fmt_bytes(read),
            f"{100 * read / image_bytes:.1f}%" if read and image_bytes else "–",
            fmt_bytes(_median(sc, "rss_bytes")),
            fmt_s(sc.get("daemon_cpu")) if sc.get("daemon_cpu") else "–",
        ]) + " |")
    return rows


def reference_table(wl: dict[str, Any]) -> list[str]:
    """The natives and the full pull: measured once per run, whatever the mode."""
    scen = wl["scenarios"]
    base = _median(scen.get("native_cold", {}), "wall")
    rows = ["| reference | wall s, median (min–max) | × native cold | requests | fetched (proxy) |",
            "|---|---|---|---|---|"]
    for key in REFERENCE:
        sc = scen.get(key)
        if sc is None:
            continue
        if sc.get("status") != "ok":
            rows.append(f"| {LABELS[key]} | {sc.get('status')}: {sc.get('note', '')} | | | |")
            continue
        rows.append(f"| {LABELS[key]} | {fmt_s(sc.get('wall'))} | "
                    f"{fmt_ratio(_ratio(_median(sc, 'wall'), base))} | "
                    f"{fmt_int(_median(sc, 'requests'))} | "
                    f"{fmt_bytes(_median(sc, 'fetched_bytes'))} |")
    return rows


def _base_for(key: str) -> str:
    """What a scenario's side-by-side ratio is against: a hot boot (page cache warm)
    against native warm, every other against native cold."""
    return "native_warm" if key == "casfs_hot" else "native_cold"


def modes_table(wl: dict[str, Any]) -> list[str]:
    """The casfs scenarios with the modes side by side: per mode the wall time, its ratio
    to the same run's native figure (cold; warm for hot), the ratio without `casfs mount`,
    and the serving process's CPU during the import; with two modes, the first's wall
    time over the second's."""
    views = [(m, sc) for m, sc, _ in mode_views(wl)]
    names = [m or "casfs" for m, _ in views]
    head = "| casfs scenario | " + " | ".join(
        f"{n}: wall s | {n}: × native | {n}: × native, without mount | {n}: daemon CPU s"
        for n in names)
    pair = len(views) == 2
    head += f" | {names[0]} ÷ {names[1]} (wall) |" if pair else " |"
    rows = [head, "|---|" + "---|---|---|---|" * len(views) + ("---|" if pair else "")]
    keys = [k for k, _, _ in SCENARIOS if k not in REFERENCE
            and any(k in sc for _, sc in views)]
    for key in keys:
        label = LABELS[key] + (" (× native warm)" if key == "casfs_hot" else "")
        cells, walls = [], []
        for _, sc in views:
            s = sc.get(key) or {}
            if s.get("status") != "ok":
                cells += [f"{s.get('status', '–')}", "–", "–", "–"]
                walls.append(None)
                continue
            base = _median(sc.get(_base_for(key)) or {}, "wall")
            wall = _median(s, "wall")
            walls.append(wall)
            cells += [fmt_s(s.get("wall")), fmt_ratio(_ratio(wall, base)),
                      fmt_ratio(_ratio(_median(s, "import"), base)) if s.get("mount") else "–",
                      fmt_s(s.get("daemon_cpu")) if s.get("daemon_cpu") else "–"]
        row = f"| {label} | " + " | ".join(cells)
        row += f" | {fmt_ratio(_ratio(walls[0], walls[1]))} |" if pair else " |"
        rows.append(row)
    return rows


def targets_table(wl: dict[str, Any]) -> list[str]:
    """The brief's targets with the modes side by side."""
    views = mode_views(wl)
    names = [m or "measured" for m, _, _ in views]
    rows = ["| target (brief) | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(views)]
    by_desc: dict[str, list[str]] = {}
    for i, (_, _, targets) in enumerate(views):
        for t in targets:
            desc, measured, verdict = _target_line(t)
            cells = by_desc.setdefault(desc, ["–"] * len(views))
            cells[i] = f"{measured} {verdict}".strip() if not t.get("info") else measured
    for desc, cells in by_desc.items():
        rows.append(f"| {desc} | " + " | ".join(cells) + " |")
    return rows


KERNEL_FIELDS = (("kernel_native_opens", "native opens"),
                 ("kernel_view_opens", "opens through the view"),
                 ("kernel_files_through_view", "files read through the view"),
                 ("kernel_objects_completed", "objects made whole"))


def kernel_table(scen: dict[str, Any]) -> list[str]:
    """Kernel mode's counters per scenario (`casfs stats` "kernel" section; medians)."""
    rows = ["| scenario | " + " | ".join(label for _, label in KERNEL_FIELDS)
            + " | bytes read through the view |", "|---|" + "---|" * (len(KERNEL_FIELDS) + 1)]
    any_row = False
    for key, label, _ in SCENARIOS:
        sc = scen.get(key) or {}
        if sc.get("status") != "ok" or not sc.get("kernel_native_opens"):
            continue
        any_row = True
        rows.append(f"| {label} | " + " | ".join(fmt_int(_median(sc, f)) for f, _ in KERNEL_FIELDS)
                    + f" | {fmt_bytes(_median(sc, 'read_bytes'))} |")
    return rows if any_row else []


def pull_table(wl: dict[str, Any]) -> list[str]:
    sc = wl["scenarios"].get("full_pull") or {}
    if sc.get("status") != "ok":
        return []
    phases = ("download", "decompress", "extract", "import")
    rows = ["| " + " | ".join(phases) + " | total | requests | bytes downloaded |",
            "|" + "---|" * (len(phases) + 3)]
    rows.append("| " + " | ".join(fmt_s(sc.get(p)) for p in phases) + f" | {fmt_s(sc.get('wall'))}"
                f" | {fmt_int(_median(sc, 'requests'))} | {fmt_bytes(_median(sc, 'fetched_bytes'))} |")
    return rows


def render_markdown(res: dict[str, Any], chart_name: str | None = None) -> str:
    cfg, mach, img = res["config"], res["machine"], res["image"]
    lines = [
        f"# casfs cold-start benchmark, {res['date']}",
        "",
        f"Store: **{cfg['store']}**. Image **{img['name']}** ({img['description']}): "
        f"{fmt_bytes(img['uncompressed_bytes'])} uncompressed, "
        f"{fmt_bytes(img['compressed_bytes'])} compressed, {img['files']:,} files "
        f"({img['entries']:,} entries), {len(img['layers'])} layers.",
        "",
        f"Machine: {mach['nproc']} CPUs ({mach.get('cpu', '')}), "
        f"{mach['mem_bytes'] / 2**30:.0f} GiB RAM, kernel {mach['kernel']}, Python "
        f"{mach['python']}; load average at start {_load(mach)}. casfs {res.get('revision')}. "
        f"{cfg['runs']} run(s) per scenario{' (quick mode)' if cfg.get('quick') else ''}; "
        f"page cache drops: {_drops(res)}. Prefetch: {res['prefetch']['note']}.",
        "",
        "Wall time is process start to exit of `python -c <workload>` run by the image's own "
        "interpreter; for casfs boots (first, prefetched, warm) it also includes `casfs mount` "
        "(shown separately); a full pull's includes download, decompression and extraction. "
        "*requests* and *fetched* are counted by the latency proxy (so they include the "
        "manifest and store checks at mount); *FUSE read bytes* is the daemon's `read_bytes` "
        "counter: what the kernel asked the mount for, readahead and mmap page faults "
        "included.",
        "",
        "Page cache: dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`) before every cold "
        "run. " + ("Before each casfs boot casfs's own code is then brought back into it by a "
                   "throwaway mount that reads nothing: a worker node runs casfs all the time, "
                   "the image's content is what is cold."
                   if not cfg.get("cold_agent") else
                   "casfs's own code is left cold too (--cold-agent)."),
        "",
    ]
    if cfg.get("modes"):
        lines += [_modes_note(cfg), ""]
    for wl in res["workloads"]:
        lines += [f"## `{wl['code']}`" + (" (primary)" if wl.get("primary") else ""), ""]
        if wl.get("modes"):
            lines += _workload_by_mode(wl, img.get("uncompressed_bytes"))
            continue
        lines += workload_table(wl, img.get("uncompressed_bytes"))
        pt = pull_table(wl)
        if pt:
            lines += ["", "Full pull, by phase (seconds):", ""] + pt
        if wl.get("targets"):
            lines += ["", "| target (brief) | measured | |", "|---|---|---|"]
            lines += ["| " + " | ".join(_target_line(t)) + " |" for t in wl["targets"]]
        lines.append("")
    lines += ["## Image", "", "| layer | compressed | uncompressed | files | entries |",
              "|---|---|---|---|---|"]
    for layer in img["layers"]:
        lines.append(f"| {layer['name']} | {fmt_bytes(layer['compressed_bytes'])} | "
                     f"{fmt_bytes(layer['uncompressed_bytes'])} | {layer['files']:,} | "
                     f"{layer['entries']:,} |")
    if img.get("installed"):
        lines += ["", "Installed: " + ", ".join(img["installed"]) + "."]
    if chart_name:
        lines += ["", f"![wall time per scenario]({chart_name})"]
    if res.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in res["errors"]]
    return "\n".join(lines) + "\n"


def _modes_note(cfg: dict[str, Any]) -> str:
    modes = cfg.get("modes") or []
    text = ("Serving modes, side by side in this run: " + ", ".join(f"**{m}**" for m in modes)
            + ". *kernel*: `casfs mount --mode kernel`, an EROFS image of the manifest built on "
            "the node and overlayfs with data-only layers (the cache's chunk files, completed "
            "objects, and the node view service's FUSE view behind what the node lacks); "
            "*fuse*: every request through the casfs daemon. Each mode has cache dirs of its "
            "own; the node view service is gone (its pid waited for) between boots. First, "
            "warm and hot boots take turns between the modes run by run; prefetched boots "
            "replay a trace recorded in their own mode. Warm boots start from the last first "
            "boot's cache after one more boot let run to its end (trace-idle), so what casfs "
            "does after a boot is done (kernel mode: the boot's multi-chunk files made whole "
            "objects), and replay those boots' traces. *daemon CPU s* is utime + stime of "
            "the FUSE daemon, or of the node view service, over the import.")
    for mode, why in (cfg.get("modes_unsupported") or {}).items():
        text += f" {mode} mode could not be measured here: {why}."
    return text


def _workload_by_mode(wl: dict[str, Any], image_bytes: int | None) -> list[str]:
    lines = reference_table(wl)
    pt = pull_table(wl)
    if pt:
        lines += ["", "Full pull, by phase (seconds):", ""] + pt
    lines += ["", "casfs, the modes side by side (ratios against this run's native figures):",
              ""] + modes_table(wl)
    lines += [""] + targets_table(wl)
    for mode, scen, _ in mode_views(wl):
        lines += ["", f"### {mode} mode", ""]
        lines += workload_table({"scenarios": scen}, image_bytes, casfs_only=True)
        kt = kernel_table(scen)
        if kt:
            lines += ["", "Kernel mode's counters (medians):", ""] + kt
    lines.append("")
    return lines


def _load(mach: dict[str, Any]) -> str:
    la = mach.get("loadavg") or ()
    return ", ".join(f"{x:.2f}" for x in la) if la else "?"


def _drops(res: dict[str, Any]) -> str:
    pc = res.get("page_cache") or {}
    if pc.get("ok", True):
        return f"{pc.get('drops', 0)} ok"
    return f"{pc.get('failures')} FAILED ({pc.get('error')}): cold figures are not cold"


def render_console(res: dict[str, Any]) -> str:
    """A compact plain-text summary for stdout."""
    out = [f"casfs cold start, {res['date']}; store: {res['config']['store']}; "
           f"image {res['image']['name']} ({fmt_bytes(res['image']['uncompressed_bytes'])}, "
           f"{res['image']['files']:,} files)"]
    for wl in res["workloads"]:
        out.append("")
        out.append(f"== {wl['code']}")
        views = mode_views(wl)
        base = _median(wl["scenarios"].get("native_cold", {}), "wall")
        for key, label, _ in SCENARIOS:
            for mode, scen, _ in views:
                sc = scen.get(key)
                if sc is None:
                    continue
                if mode is not None and key not in REFERENCE:
                    label_m = f"{label} [{mode}]"
                elif mode is not None and mode != views[0][0]:
                    continue  # the natives and the pull once
                else:
                    label_m = label
                if sc.get("status") != "ok":
                    out.append(f"  {label_m:<31} {sc.get('status')}: {sc.get('note', '')}")
                    continue
                wall = _median(sc, "wall")
                extra = ""
                if _median(sc, "requests") is not None:
                    extra = (f"  {fmt_int(_median(sc, 'requests'))} req, "
                             f"{fmt_bytes(_median(sc, 'fetched_bytes'))} fetched")
                if _median(sc, "read_bytes"):
                    extra += f", {fmt_bytes(_median(sc, 'read_bytes'))} read via FUSE"
                if _median(sc, "daemon_cpu") is not None:
                    extra += f", daemon CPU {_median(sc, 'daemon_cpu'):.2f}s"
                out.append(f"  {label_m:<31} {fmt_s(sc.get('wall')):<24} "
                           f"{fmt_ratio(_ratio(wall, base)):>7}{extra}")
        for mode, _, targets in views:
            for t in targets:
                desc, measured, verdict = _target_line(t)
                tag = f"[{mode}] " if mode else ""
                out.append(f"  target: {tag}{desc:<66} {measured:>30}  {verdict}")
    return "\n".join(out)


SEGMENT_COLORS = {"download": "#cc7a00", "decompress": "#e8a33d", "extract": "#f3c77f",
                  "mount": "#9ec5e8", "import": "#1f6fb4", "native": "#888888"}


def _segments(key: str, sc: dict[str, Any]) -> list[tuple[str, float]]:
    """What a bar is made of: a full pull's phases, a boot's mount and import, or the wall."""
    if key == "full_pull":
        names = ["download", "decompress", "extract", "import"]
    elif sc.get("mount"):
        names = ["mount", "import"]
    else:
        return [("native" if key.startswith("native") else "import", _median(sc, "wall") or 0.0)]
    return [(n, _median(sc, n) or 0.0) for n in names]


MODE_HATCHES = {"kernel": "///", "fuse": None}


def chart_rows(wl: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], str | None]]:
    """The bars of one workload's panel: (scenario key, label, scenario, hatch); the
    natives and the pull once, then each casfs scenario once per mode, side by side."""
    views = mode_views(wl)
    rows: list[tuple[str, str, dict[str, Any], str | None]] = []
    for key, label, _ in SCENARIOS:
        if key in REFERENCE:
            if key in wl["scenarios"]:
                rows.append((key, label, wl["scenarios"][key], None))
            continue
        for mode, scen, _ in views:
            if key in scen:
                rows.append((key, f"{label} · {mode}" if mode else label, scen[key],
                             MODE_HATCHES.get(mode or "")))
    return rows


def chart(res: dict[str, Any], path: Path) -> Path | None:
    """Horizontal bars of median wall time per scenario, split into phases (a full pull's
    download/decompress/extract/import, a boot's mount/import), whiskers min–max of the
    total; one panel per workload. Returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    wls = res["workloads"]
    height = max(len(chart_rows(wl)) for wl in wls) * 0.32 + 0.3
    fig, axes = plt.subplots(len(wls), 1, figsize=(10, 1.4 + height * len(wls)), squeeze=False)
    used: set[str] = set()
    for ax, wl in zip(axes[:, 0], wls, strict=True):
        rows = chart_rows(wl)
        totals: list[tuple[float, float] | None] = []  # (median, max) per row
        for y, (key, _label, sc, hatch) in enumerate(rows):
            if sc.get("status") != "ok" or _median(sc, "wall") is None:
                totals.append(None)
                continue
            left = 0.0
            for name, value in _segments(key, sc):
                ax.barh(y, value, left=left, color=SEGMENT_COLORS[name], height=0.7,
                        hatch=hatch, edgecolor="white" if hatch else None, linewidth=0)
                used.add(name)
                left += value
            w = sc["wall"]
            ax.errorbar(w["median"], y, xerr=[[w["median"] - w["min"]], [w["max"] - w["median"]]],
                        color="black", capsize=3, linewidth=1)
            totals.append((w["median"], w["max"]))
        ax.set_yticks(range(len(rows)), [label for _, label, _, _ in rows])
        ax.invert_yaxis()
        top = max([t[1] for t in totals if t] or [1.0])
        for y, t in enumerate(totals):
            ax.text(t[1] + top * 0.01 if t else 0, y, f" {t[0]:.2f} s" if t else " n/a",
                    va="center", fontsize=8)
        ax.set_xlim(0, top * 1.12)
        ax.set_xlabel("wall time, s (median; whiskers: min–max)")
        ax.set_title(f"{wl['code']}", fontsize=10, loc="left")
    handles = [Patch(color=SEGMENT_COLORS[n], label=n) for n in SEGMENT_COLORS if n in used]
    modes = [m for wl in wls for m in (wl.get("modes") or {})]
    for mode in dict.fromkeys(modes):
        hatch = MODE_HATCHES.get(mode)
        handles.append(Patch(facecolor="#cccccc", hatch=hatch, edgecolor="white",
                             label=f"{mode} mode"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8,
               frameon=False)
    fig.suptitle(f"casfs cold start, {res['date'][:10]}: image {res['image']['name']}; store: "
                 f"{res['config']['store']}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_reports(res: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    png = chart(res, out_dir / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    write_json(res, paths["json"])
    paths["md"].write_text(render_markdown(res, png.name if png else None))
    return paths


def unique_stem(out_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... so an earlier run's files are never replaced."""
    n, candidate = 1, stem
    while any(out_dir.glob(candidate + ".*")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def publish(res: dict[str, Any], out: Path, stem: str,
            render: Callable[[dict[str, Any]], str]) -> None:
    """Write <out>/<stem>.json and .md, and print the table and where they went."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(res, out / f"{stem}.json")
    md = render(res)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"json: {out / f'{stem}.json'}\nmd: {out / f'{stem}.md'}")


def write_json(res: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(res, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
