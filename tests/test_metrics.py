"""The Prometheus text a scrape of ``/metrics`` returns, from the server's plain counters."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from seqactor.server.metrics import OP_LATENCY_BUCKETS_S, Metrics


def scrape(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(m.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def test_gauges_counters_and_closes_as_scraped():
    m = Metrics()
    m.sessions.set(3)
    m.connections.set(4)
    m.actors.set(2)
    m.counters.pushes = 5
    m.op_done("subscribe", "OK", 0.001)
    m.op_done("subscribe", "OK", 0.002)
    m.op_done("any", "RATE_LIMITED")  # refused before running: counted, no latency
    m.closed(1000)
    m.closed(1000)
    m.closed(4002)
    got = scrape(m)
    assert got[("seqactor_sessions", ())] == 3
    assert got[("seqactor_connections", ())] == 4
    assert got[("seqactor_actors", ())] == 2
    assert got[("seqactor_pushes_total", ())] == 5
    assert got[("seqactor_ops_total", (("op", "subscribe"), ("result", "OK")))] == 2
    assert got[("seqactor_ops_total", (("op", "any"), ("result", "RATE_LIMITED")))] == 1
    assert ("seqactor_ops_created", (("op", "subscribe"), ("result", "OK"))) in got
    assert ("seqactor_op_latency_seconds_count", (("op", "any"),)) not in got
    assert got[("seqactor_session_closes_total", (("code", "1000"),))] == 2
    assert got[("seqactor_session_closes_total", (("code", "4002"),))] == 1


def test_latency_buckets_are_cumulative_and_bounds_inclusive():
    m = Metrics()
    # exactly on a bound counts in that bucket (Prometheus "le"); beyond the last: +Inf only
    for latency in (0.0005, 0.0006, 0.001, 3.0):
        m.op_done("mark_read", "OK", latency)
    m.commit_latency.observe(0.004)
    got = scrape(m)

    def bucket(le: str) -> float:
        return got[("seqactor_op_latency_seconds_bucket", (("le", le), ("op", "mark_read")))]

    assert bucket("0.0005") == 1
    assert bucket("0.001") == 3
    assert bucket("2.5") == 3
    assert bucket("+Inf") == 4
    assert len([k for k in got if k[0] == "seqactor_op_latency_seconds_bucket"]) == (
        len(OP_LATENCY_BUCKETS_S) + 1
    )
    assert got[("seqactor_op_latency_seconds_count", (("op", "mark_read"),))] == 4
    assert abs(got[("seqactor_op_latency_seconds_sum", (("op", "mark_read"),))] - 3.0021) < 1e-9
    assert got[("seqactor_store_commit_seconds_bucket", (("le", "0.0025"),))] == 0
    assert got[("seqactor_store_commit_seconds_bucket", (("le", "0.005"),))] == 1
    assert got[("seqactor_store_commit_seconds_count", ())] == 1


def test_openmetrics_exposition_parses_with_several_ops():
    # Prometheus asks for OpenMetrics first; it requires one label set's samples (buckets,
    # count, sum, created) to be contiguous, also with a histogram per op.
    m = Metrics()
    for kind in ("mark_read", "subscribe", "get_sequences"):
        m.op_done(kind, "OK", 0.001)
    m.commit_latency.observe(0.002)
    m.closed(1000)
    families = {f.name: f for f in openmetrics_families(openmetrics_latest(m.registry).decode())}
    latency = families["seqactor_op_latency_seconds"]
    assert {s.labels["op"] for s in latency.samples if s.name.endswith("_count")} == {
        "mark_read", "subscribe", "get_sequences"
    }
