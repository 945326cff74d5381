"""Prometheus metrics (``--metrics-port``): one registry per server instance.

Every metric is plain Python numbers updated on the event loop's thread (no lock, no
``prometheus_client`` call per update: a ``Gauge.set`` takes ~1 µs, a ``Histogram.observe``
two locked increments, and a session open made seven of them) and turned into Prometheus
metric families when ``/metrics`` is scraped (:class:`_Collector`, on the HTTP server's thread:
it copies what it reads, each copy one step under the GIL).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector


class MetricsPortError(OSError):
    """The metrics HTTP server could not listen on its port (the message names it)."""


OP_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HotCounters:
    """Plain integers bumped on the per-recipient path; exported as counters at scrape time."""

    __slots__ = ("pushes", "frames_sent", "bytes_sent", "coalesced")

    def __init__(self) -> None:
        self.pushes = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.coalesced = 0


class PlainGauge:
    """A gauge's current value (``set`` stores it; the collector reads it)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def set(self, value: float) -> None:
        self.value = value


class PlainHistogram:
    """Observation counts per bucket (``counts[i]``: values at most ``bounds[i]``, and above
    the last bound; not cumulative) and their sum."""

    __slots__ = ("bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...] = OP_LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> tuple[list[tuple[str, float]], float]:
        """Prometheus's cumulative buckets (``le`` label, count; the last is ``+Inf``, the
        total) and the sum, from one copy of the counts."""
        counts, total = list(self.counts), self.sum
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            running += count
            out.append((repr(float(bound)), running))  # (as prometheus_client writes "le")
        out.append(("+Inf", running + counts[-1]))
        return out, total


class Metrics:
    """The server's metrics: ``sessions``, ``connections``, ``actors`` (gauges: ``set``),
    ``commit_latency`` (``observe``), :meth:`op_done`, :meth:`closed` and the hot
    ``counters``."""

    def __init__(self) -> None:
        self.counters = HotCounters()
        self.sessions = PlainGauge()
        self.connections = PlainGauge()
        self.actors = PlainGauge()
        self.commit_latency = PlainHistogram()
        # (op, result) -> [count, first time]; op -> its latencies; close code -> [count, first]
        self.ops: dict[tuple[str, str], list[float]] = {}
        self.op_latency: dict[str, PlainHistogram] = {}
        self.closes: dict[int, list[float]] = {}
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))

    def op_done(self, kind: str, result: str, latency_s: float | None = None) -> None:
        """Count one op (``kind``, ``result``: the error code's name or ``"OK"``) and, when
        it ran, its latency."""
        counted = self.ops.get((kind, result))
        if counted is None:
            self.ops[(kind, result)] = [1, time.time()]
        else:
            counted[0] += 1
        if latency_s is not None:
            histogram = self.op_latency.get(kind)
            if histogram is None:
                histogram = self.op_latency[kind] = PlainHistogram()
            histogram.observe(latency_s)

    def closed(self, code: int) -> None:
        """Count one session close with ``code``."""
        counted = self.closes.get(code)
        if counted is None:
            self.closes[code] = [1, time.time()]
        else:
            counted[0] += 1

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` over HTTP on a background thread.

        Raises :class:`MetricsPortError` (an ``OSError``) naming the metrics port when it
        cannot listen, so nobody blames the WebSocket port."""
        try:
            start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsPortError(
                exc.errno, f"cannot serve metrics on {host}:{port} (--metrics-port): "
                f"{exc.strerror or exc}"
            ) from exc


class _Collector(Collector):
    HOT = {
        "pushes": ("seqactor_pushes", "Push updates delivered to sessions"),
        "frames_sent": ("seqactor_frames_sent", "WebSocket frames sent"),
        "bytes_sent": ("seqactor_bytes_sent", "Payload bytes sent"),
        "coalesced": ("seqactor_coalesced_changes", "Changes merged into an already pending entry"),
    }

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        for field, (name, help_text) in self.HOT.items():
            yield CounterMetricFamily(name, help_text, value=getattr(m.counters, field))
        yield GaugeMetricFamily("seqactor_sessions", "Open authenticated sessions",
                                value=m.sessions.value)
        yield GaugeMetricFamily("seqactor_connections", "Open WebSocket connections",
                                value=m.connections.value)
        yield GaugeMetricFamily("seqactor_actors", "Online user actors", value=m.actors.value)
        ops = CounterMetricFamily("seqactor_ops", "Client operations by type and result",
                                  labels=["op", "result"])
        for (kind, result), (count, created) in list(m.ops.items()):
            ops.add_metric([kind, result], count, created=created)
        yield ops
        latency = HistogramMetricFamily("seqactor_op_latency_seconds", "Operation latency",
                                        labels=["op"])
        # (each op's _created right after its buckets: OpenMetrics, which Prometheus asks for,
        # requires one label set's samples to be contiguous)
        for kind, histogram in list(m.op_latency.items()):
            latency.add_metric([kind], *histogram.buckets())
            latency.add_sample("seqactor_op_latency_seconds_created", {"op": kind},
                               histogram.created)
        yield latency
        buckets, total = m.commit_latency.buckets()
        commit = HistogramMetricFamily(
            "seqactor_store_commit_seconds", "Store write latency as seen by operations",
            buckets=buckets, sum_value=total,
        )
        commit.add_sample("seqactor_store_commit_seconds_created", {},
                          m.commit_latency.created)
        yield commit
        closes = CounterMetricFamily("seqactor_session_closes", "Closed sessions by close code",
                                     labels=["code"])
        for code, (count, created) in list(m.closes.items()):
            closes.add_metric([str(code)], count, created=created)
        yield closes
