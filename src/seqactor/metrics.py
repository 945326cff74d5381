"""Prometheus metrics (``--metrics-port``): one registry per server instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

OP_LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
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
        self.pushes = Counter("seqactor_pushes", "Push updates handed to sessions", registry=r)
        self.frames_sent = Counter("seqactor_frames_sent", "WebSocket frames sent", registry=r)
        self.bytes_sent = Counter("seqactor_bytes_sent", "Payload bytes sent", registry=r)
        self.coalesced = Counter(
            "seqactor_coalesced_changes", "Changes merged into an already pending entry",
            registry=r,
        )
        self.commit_latency = Histogram(
            "seqactor_store_commit_seconds", "Store write latency as seen by operations",
            buckets=OP_LATENCY_BUCKETS_S, registry=r,
        )
        self.closes = Counter(
            "seqactor_session_closes", "Closed sessions by close code", ["code"], registry=r
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` over HTTP on a background thread."""
        start_http_server(port, addr=host, registry=self.registry)
