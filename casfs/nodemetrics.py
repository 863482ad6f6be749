"""Node metrics: one Prometheus endpoint per node, served by the node agent, with every
mount's series labelled by its image, digest, serving mode and mountpoint.

What each serving process measures it keeps itself (MountMetrics, and `OpTimes`: the
latency of every FUSE request it answers, per operation); the agent asks every process
it holds for its stats over their failover links (casfs.failover) at scrape time and
renders them here, with what only the agent knows (restarts, failover stalls):

    casfs_mount_info{image,digest,mode,mountpoint,pid}          1 per mount
    casfs_mount_up{...}                                         0 while failing over
    casfs_<counter>_total{...}                                  MountMetrics counters
    casfs_fetch_latency_seconds{...}                            store fetches (histogram)
    casfs_fuse_request_duration_seconds{...,op}                 FUSE requests (histogram)
    casfs_cache_hit_ratio{...}                                  hits / (hits + misses)
    casfs_prefetch_used_ratio{...}                              prefetched chunks later read
    casfs_reads_waited_ratio{...}                               reads that waited on the store
    casfs_prefetch_<field>{...}                                 the replay's plan and progress
    casfs_kernel_<field>_total{...}                             kernel mode: opens, objects
    casfs_daemon_restarts_total{...,reason}                     crash | handover
    casfs_failover_stall_seconds{...}                           death to successor serving
    casfs_resent_requests_total{...}                            answered after FUSE_NOTIFY_RESEND
    casfs_cache_bytes, casfs_cache_max_bytes                    the node cache
    casfs_agent_info{version,code}, casfs_held_connections      the agent

Kernel-mode mounts are reported by the node view (one process, several mounts); the
view's own requests (lookups of objects) are series of the pseudo-mount
`image="(node view)"`. Counters restart from zero with each new serving process, as
Prometheus counters may.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

# FUSE round trips take tens of microseconds; a fetch from the store, tens of ms.
OP_BUCKETS = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
              0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
VIEW_IMAGE = "(node view)"


class OpTimes:
    """Latency histograms of the FUSE requests a process answers, per operation: plain
    lists bumped on the hot path (about a microsecond a request)."""

    def __init__(self) -> None:
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, op: str, seconds: float) -> None:
        counts = self.counts.get(op)
        if counts is None:
            counts = self.counts[op] = [0] * (len(OP_BUCKETS) + 1)
            self.sums[op] = 0.0
        counts[bisect.bisect_left(OP_BUCKETS, seconds)] += 1
        self.sums[op] += seconds

    def as_dict(self) -> dict[str, Any]:
        return {op: {"count": sum(counts), "sum_seconds": round(self.sums[op], 6),
                     "buckets": [*counts]}
                for op, counts in self.counts.items()}


@dataclass
class MountSample:
    """One mount as the agent saw it at a scrape."""

    labels: dict[str, str]  # image, digest, mode, mountpoint
    stats: dict[str, Any] | None  # what its serving process answered (None: nothing)
    up: bool = True
    restarts: dict[str, int] = field(default_factory=dict)  # reason -> count
    stalls: list[float] = field(default_factory=list)  # seconds, each failover


@dataclass
class NodeSample:
    mounts: list[MountSample]
    version: str = ""
    code: str = ""
    held: int = 0
    cache: dict[str, int] | None = None


LABELS = ("image", "digest", "mode", "mountpoint")


def render(sample: NodeSample) -> bytes:
    """The Prometheus text exposition of a node sample."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(sample))
    return bytes(generate_latest(registry))


class _Collector:
    def __init__(self, sample: NodeSample) -> None:
        self.sample = sample

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        s = self.sample
        fams: dict[str, Any] = {}

        def fam(kind: type, name: str, doc: str, extra: tuple[str, ...] = ()) -> Any:
            if name not in fams:
                fams[name] = kind(name, doc, labels=[*LABELS, *extra])
            return fams[name]

        info = GaugeMetricFamily("casfs_mount_info", "a mount this node serves",
                                 labels=[*LABELS, "pid"])
        up = GaugeMetricFamily("casfs_mount_up", "1 when its serving process answers, 0 "
                               "while it is failing over", labels=list(LABELS))
        for m in s.mounts:
            lv = [m.labels.get(k, "") for k in LABELS]
            st = m.stats or {}
            pid = str((st.get("mount") or {}).get("pid", ""))
            info.add_metric([*lv, pid], 1)
            up.add_metric(lv, 1 if m.up and m.stats is not None else 0)
            for reason in ("crash", "handover"):
                fam(CounterMetricFamily, "casfs_daemon_restarts",
                    "serving processes replaced (crash: exited unasked; handover: an "
                    "upgrade or agent restart)", ("reason",)).add_metric(
                    [*lv, reason], m.restarts.get(reason, 0))
            if m.stalls:
                fam(HistogramMetricFamily, "casfs_failover_stall_seconds",
                    "from a serving process's end to its successor serving").add_metric(
                    lv, _buckets_of(m.stalls), sum_value=sum(m.stalls))
            if not st:
                continue
            self._mount_series(fam, lv, st)
        yield info
        yield up
        yield from fams.values()
        if s.cache:
            yield GaugeMetricFamily("casfs_cache_bytes", "bytes in the node cache",
                                    value=s.cache.get("bytes", 0))
            yield GaugeMetricFamily("casfs_cache_max_bytes", "the node cache's cap",
                                    value=s.cache.get("max_bytes", 0))
        agent = GaugeMetricFamily("casfs_agent_info", "the node agent serving this endpoint",
                                  labels=["version", "code"])
        agent.add_metric([s.version, s.code], 1)
        yield agent
        yield GaugeMetricFamily("casfs_held_connections",
                                "FUSE connections the agent holds for failover", value=s.held)

    @staticmethod
    def _mount_series(fam: Any, lv: list[str], st: dict[str, Any]) -> None:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        metrics = st.get("metrics") or {}
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            fam(CounterMetricFamily, f"casfs_{name}", f"casfs mount counter {name}") \
                .add_metric(lv, value)
        h = metrics.get("fetch_latency")
        if isinstance(h, dict) and "buckets" in h:
            fam(HistogramMetricFamily, "casfs_fetch_latency_seconds", "store fetch latency") \
                .add_metric(lv, _cumulative(h["buckets"].keys(), h["buckets"].values()),
                            sum_value=h.get("sum_seconds", 0.0))
        hits, misses = metrics.get("cache_hits", 0), metrics.get("cache_misses", 0)
        if hits + misses:
            fam(GaugeMetricFamily, "casfs_cache_hit_ratio", "reads whose chunks were on the "
                "node / all reads").add_metric(lv, hits / (hits + misses))
        if metrics.get("prefetch_chunks"):
            fam(GaugeMetricFamily, "casfs_prefetch_used_ratio", "chunks prefetch brought "
                "that reads then used").add_metric(
                lv, min(1.0, metrics.get("prefetch_hits", 0) / metrics["prefetch_chunks"]))
        if metrics.get("reads"):
            fam(GaugeMetricFamily, "casfs_reads_waited_ratio", "reads that waited on the "
                "store").add_metric(lv, metrics.get("read_waits", 0) / metrics["reads"])
        for op, hist in sorted((st.get("fuse_ops") or {}).items()):
            counts = hist.get("buckets") or []
            if len(counts) != len(OP_BUCKETS) + 1:
                continue
            fam(HistogramMetricFamily, "casfs_fuse_request_duration_seconds",
                "FUSE requests answered by the serving process, per operation", ("op",)) \
                .add_metric([*lv, op], _cumulative((*map(str, OP_BUCKETS), "+Inf"), counts),
                            sum_value=hist.get("sum_seconds", 0.0))
        prefetch = st.get("prefetch") or {}
        for key in ("planned_chunks", "planned_bytes", "done_chunks", "local_chunks",
                    "warmed_chunks", "traces"):
            if isinstance(prefetch.get(key), (int, float)):
                fam(GaugeMetricFamily, f"casfs_prefetch_{key}", f"trace replay: {key}") \
                    .add_metric(lv, prefetch[key])
        for key, value in (st.get("kernel") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                fam(CounterMetricFamily, f"casfs_kernel_{key}", f"kernel mode: {key}") \
                    .add_metric(lv, value)
        resent = (st.get("failover") or {}).get("resent_requests")
        if isinstance(resent, int):
            fam(CounterMetricFamily, "casfs_resent_requests", "requests the kernel resent "
                "after a failover (FUSE_NOTIFY_RESEND), answered by this process") \
                .add_metric(lv, resent)


STALL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _cumulative(bounds: Iterable[str], counts: Iterable[int]) -> list[tuple[str, int]]:
    """Per-bucket counts as Prometheus wants them: each bucket counts all below it."""
    out, total = [], 0
    for bound, count in zip(bounds, counts, strict=True):
        total += count
        out.append((bound, total))
    return out


def _buckets_of(values: list[float]) -> list[tuple[str, float]]:
    out = []
    for bound in STALL_BUCKETS:
        out.append((str(bound), float(sum(1 for v in values if v <= bound))))
    out.append(("+Inf", float(len(values))))
    return out
