"""Prometheus metrics (``--metrics-port``): one registry per server instance."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector


class MetricsPortError(OSError):
    """The metrics HTTP server could not listen on its port (the message names it)."""


OP_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class HotCounters:
    """Plain integers bumped on the per-recipient path (a Prometheus Counter takes a lock per
    increment); exported as counters at scrape time."""

    __slots__ = ("pushes", "frames_sent", "bytes_sent", "coalesced")

    def __init__(self) -> None:
        self.pushes = 0
        self.frames_sent = 0
        self.bytes_sent = 0
        self.coalesced = 0


class _HotCollector(Collector):
    HELP = {
        "pushes": "Push updates delivered to sessions",
        "frames_sent": "WebSocket frames sent",
        "bytes_sent": "Payload bytes sent",
        "coalesced": "Changes merged into an already pending entry",
    }
    NAMES = {"coalesced": "coalesced_changes"}

    def __init__(self, counters: HotCounters) -> None:
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        for field, help_text in self.HELP.items():
            name = f"seqactor_{self.NAMES.get(field, field)}"
            yield CounterMetricFamily(name, help_text, value=getattr(self.counters, field))


class Metrics:
    def __init__(self) -> None:
        self.counters = HotCounters()
        r = self.registry = CollectorRegistry()
        r.register(_HotCollector(self.counters))
        self.sessions = Gauge("seqactor_sessions", "Open authenticated sessions", registry=r)
        self.connections = Gauge("seqactor_connections", "Open WebSocket connections", registry=r)
        self.actors = Gauge("seqactor_actors", "Online user actors", registry=r)
        self.ops = Counter(
            "seqactor_ops", "Client operations by type and result", ["op", "result"], registry=r
        )
        self.op_latency = Histogram(
            "seqactor_op_latency_seconds", "Operation latency", ["op"],
            buckets=OP_LATENCY_BUCKETS_S, registry=r,
        )
        self.commit_latency = Histogram(
            "seqactor_store_commit_seconds", "Store write latency as seen by operations",
            buckets=OP_LATENCY_BUCKETS_S, registry=r,
        )
        self.closes = Counter(
            "seqactor_session_closes", "Closed sessions by close code", ["code"], registry=r
        )
        self._op_counters: dict[tuple[str, str], Counter] = {}
        self._op_latencies: dict[str, Histogram] = {}
        self._close_counters: dict[int, Counter] = {}

    # Labelled children, cached: ``labels()`` per call costs a lock and a tuple lookup, and
    # every op and every session close records one.
    def op_done(self, kind: str, result: str, latency_s: float | None = None) -> None:
        """Count one op (``kind``, ``result``: the error code's name or ``"OK"``) and, when
        it ran, its latency."""
        counter = self._op_counters.get((kind, result))
        if counter is None:
            counter = self._op_counters[(kind, result)] = self.ops.labels(kind, result)
        counter.inc()
        if latency_s is not None:
            histogram = self._op_latencies.get(kind)
            if histogram is None:
                histogram = self._op_latencies[kind] = self.op_latency.labels(kind)
            histogram.observe(latency_s)

    def closed(self, code: int) -> None:
        """Count one session close with ``code``."""
        counter = self._close_counters.get(code)
        if counter is None:
            counter = self._close_counters[code] = self.closes.labels(str(code))
        counter.inc()

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
