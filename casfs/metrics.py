"""Per-mount counters: plain attributes bumped on the hot path, exported as Prometheus
metrics by a collector that reads them at scrape time, and as JSON for `casfs stats`."""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class MountMetrics:
    lookups: int = 0
    negative_lookups: int = 0
    getattrs: int = 0
    readdirs: int = 0
    opens: int = 0
    reads: int = 0
    read_bytes: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    fetches: int = 0
    fetched_bytes: int = 0  # bytes received from the store (compressed)
    fetch_errors: int = 0
    fetch_joined: int = 0  # reads that joined a fetch already in flight
    io_errors: int = 0
    prefetch_chunks: int = 0  # chunks put in the cache by prefetch
    prefetch_requests: int = 0  # store requests made by prefetch
    prefetch_bytes: int = 0  # bytes received by prefetch
    prefetch_hits: int = 0  # reads served by a chunk prefetch had fetched
    prefetch_joined: int = 0  # reads that waited on a prefetch already in flight
    warmed_chunks: int = 0  # cached chunks verified ahead of a streaming reader
    read_waits: int = 0  # reads that waited on the store (a fetch of their own or in flight)
    read_wait_seconds: float = 0.0  # the time those reads took, in all
    fetch_latency: Histogram = field(default_factory=Histogram)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        h = self.fetch_latency
        d["fetch_latency"] = {
            "count": h.n,
            "sum_seconds": round(h.total, 6),
            "buckets": {str(b): c for b, c in zip((*h.buckets, "+Inf"), h.counts, strict=True)},
        }
        return d


class PrometheusCollector:
    """A prometheus_client collector over a MountMetrics (and extra gauges)."""

    def __init__(self, metrics: MountMetrics, extra: Any = None) -> None:
        self.metrics = metrics
        self.extra = extra

    def collect(self):  # noqa: ANN201 - prometheus_client protocol
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        m = self.metrics
        for name, value in asdict(m).items():
            if name == "fetch_latency":
                continue
            yield CounterMetricFamily(f"casfs_{name}", f"casfs mount counter {name}", value=value)
        h = m.fetch_latency
        cum, buckets = 0, []
        for b, c in zip(h.buckets, h.counts, strict=False):
            cum += c
            buckets.append((str(b), cum))
        buckets.append(("+Inf", h.n))
        yield HistogramMetricFamily(
            "casfs_fetch_latency_seconds", "store fetch latency", buckets=buckets, sum_value=h.total
        )
        if self.extra is not None:
            for name, value in self.extra().items():
                yield GaugeMetricFamily(f"casfs_{name}", f"casfs gauge {name}", value=value)
