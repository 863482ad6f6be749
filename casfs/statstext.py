"""`casfs stats` for people: a running mount's counters (the JSON `--json` prints) as a few
lines, one idea each, with units. Tolerant of fields a mode or an older daemon lacks."""

from __future__ import annotations

from typing import Any

from casfs.progress import human_bytes


def count(n: float) -> str:
    return f"{int(n):,}"


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """'1 layer', '3 layers', '1,024 chunks'."""
    return f"{count(n)} {noun if n == 1 else (nouns or noun + 's')}"


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def stats_lines(stats: dict[str, Any]) -> list[str]:
    mount, m = stats.get("mount", {}), stats.get("metrics", {})
    cache, pf, kern = stats.get("cache", {}), stats.get("prefetch", {}), stats.get("kernel")
    mode = mount.get("mode", "fuse")
    out = [f"{'mount':<12} blake3:{mount.get('digest', '?')}",
           f"{'':<12} {mode} mode, pid {mount.get('pid', '?')}, up "
           f"{duration(mount.get('uptime_seconds', 0))}"
           + ("" if mode != "fuse" or mount.get("kernel_no_open", True) else
              "; pyfuse3 without casfs's patch: every open and listing reaches the daemon")]
    if kern is not None:
        out.append(f"{'kernel':<12} {plural(kern.get('native_opens', 0), 'file')} opened from "
                   f"the node's disk, {count(kern.get('view_opens', 0))} through the view; "
                   f"{plural(kern.get('objects_completed', 0), 'object')} made whole")
        out.append(f"{'view reads':<12} {plural(m.get('reads', 0), 'read')}, "
                   f"{human_bytes(m.get('read_bytes', 0))}")
    else:
        out.append(f"{'requests':<12} {plural(m.get('reads', 0), 'read')} "
                   f"({human_bytes(m.get('read_bytes', 0))}), "
                   f"{plural(m.get('lookups', 0), 'lookup')} "
                   f"({count(m.get('negative_lookups', 0))} of missing names), "
                   f"{plural(m.get('readdirs', 0), 'listing')}, "
                   f"{plural(m.get('opens', 0), 'open')}")
    hits, misses = m.get("cache_hits", 0), m.get("cache_misses", 0)
    rate = f" ({100 * hits / (hits + misses):.1f}% hit)" if hits + misses else ""
    out.append(f"{'cache':<12} {plural(hits, 'chunk')} read from the node cache, "
               f"{count(misses)} missing{rate}")
    if "bytes" in cache:
        out.append(f"{'':<12} node cache holds {human_bytes(cache['bytes'])} of "
                   f"{human_bytes(cache.get('max_bytes', 0))}"
                   + (f"; {plural(cache['evictions'], 'eviction')}" if cache.get("evictions")
                      else ""))
    lat = m.get("fetch_latency", {})
    mean = lat.get("sum_seconds", 0) / lat["count"] * 1000 if lat.get("count") else 0.0
    out.append(f"{'fetched':<12} {plural(m.get('fetches', 0), 'chunk')} on demand "
               f"({human_bytes(m.get('fetched_bytes', 0))}, mean {mean:.1f} ms a request), "
               f"{count(m.get('fetch_joined', 0))} joined a fetch in flight")
    out.append(f"{'prefetched':<12} {plural(m.get('prefetch_chunks', 0), 'chunk')} "
               f"({human_bytes(m.get('prefetch_bytes', 0))}) in "
               f"{plural(m.get('prefetch_requests', 0), 'request')}; "
               f"{count(m.get('prefetch_hits', 0))} then read")
    state = pf.get("state", "off")
    if state == "off":
        out.append(f"{'replay':<12} off (--no-prefetch)")
    elif pf.get("traces"):
        out.append(f"{'replay':<12} {state}: {plural(pf['traces'], 'trace')} merged (from "
                   f"{pf.get('source') or '?'}), {count(pf.get('done_chunks', 0))} of "
                   f"{plural(pf.get('planned_chunks', 0), 'chunk')} planned "
                   f"({human_bytes(pf.get('planned_bytes', 0))}), "
                   f"{count(pf.get('local_chunks', 0))} already on the node"
                   + (", stopped at the cache cap" if pf.get("stopped_at_cap") else ""))
    else:
        out.append(f"{'replay':<12} {state}: no trace of this image yet (first boot: guessing)")
    if "heuristic_requests" in pf:
        out.append(f"{'guesses':<12} {plural(pf['heuristic_requests'], 'request')} "
                   f"({count(pf.get('heuristic_ranges', 0))} ranged GETs of directory packs)")
    if "recorded_chunks" in pf:
        saved = pf.get("trace_saved")
        out.append(f"{'recording':<12} {plural(pf['recorded_chunks'], 'chunk')} first read; "
                   + (f"trace {saved} saved" if saved else "the boot is still on"))
    problems = [f"{plural(m.get('fetch_errors', 0), 'failed fetch', 'failed fetches')}",
                f"{plural(m.get('io_errors', 0), 'I/O error')}",
                f"{plural(pf.get('rejected_traces', 0), 'rejected trace')}",
                f"{plural(pf.get('failures', 0), 'prefetch failure')}"]
    out.append(f"{'errors':<12} " + ", ".join(problems))
    return out
