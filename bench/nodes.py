"""Many nodes (issue 15): one group spread over 4 ``seqactor serve`` nodes on one Redis,
against one node holding the whole group; then a node dies and its clients move.

Usage (from the repo root)::

    .venv/bin/python bench/nodes.py [--quick]

Reuses bench/fanout.py's client processes (``bench/_fanout_client.py``, raw WebSocket
sessions: Hello, snapshot, Subscribe{all}) and its staleness measure. One Redis (AOF
everysec); a backend service session on node 0 allocates in the group at a fixed rate.

* ``node1``: one node, every member's session on it.
* ``nodes4``: four nodes, a quarter of the members' sessions on each (one client process per
  node). Push frames/s over all clients, staleness p50/p99 (``Allocated`` at the backend ->
  a sampled member holds the seq), and frames per server CPU-second (the four nodes' CPU
  together: the price of being several nodes). The *sweep* time is members / frames/s: how
  long one change takes to reach every member at that rate.
* ``nodes4_store_delivery_p50_ms`` / ``_p99_ms``: the store's part of the staleness — a
  ``RedisStore`` listener in this process (a fifth node without sessions) on the same Redis:
  the time from the backend sending ``AllocateSequences`` to the change reaching it (node
  0's batch, the script, Pub/Sub, the reorder buffer), against ``nodes4_ack_p50_ms`` /
  ``_p99_ms``, the same send to the backend's ``Allocated`` reply (where the staleness is
  measured from). ``nodes4_store_after_ack_p99_ms``: listener time minus reply time per
  allocation (<= 0: the store delivered before the staleness clock even started). The rest
  of the staleness is the nodes' fan-out rounds over their sessions and the client processes
  reading them.
* ``failover_converge_s``: node 3 is killed (SIGKILL); its client process connects the same
  users to node 0 (Hello, snapshot, Subscribe{all}); the time from the kill until all of
  them hold the current view.

Prints a table and merges the keys into ``bench/results/cluster.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from fanout import (  # noqa: E402
    GROUP,
    HEARTBEAT_INTERVAL_S,
    SAMPLED_SESSIONS,
    SERVER_START_TIMEOUT_S,
    Child,
    call_all,
    client_processes,
    cpu_s,
    load_records,
    percentile,
    rate_between,
    runqueue_wait_s,
    staleness_ms,
    start_backend,
    stop_process,
    user_ranges,
)

from seqactor.store import Allocated, Change  # noqa: E402
from seqactor.store.redis import RedisStore  # noqa: E402
from tests._redis import RedisServer  # noqa: E402

RESULTS = HERE / "results" / "cluster.json"
NODES = 4
RATE_PER_S = 100.0
CONNECT_CONCURRENCY = 200
DRAIN_S = 2.0
GOAL_FRAMES_PER_CPU_RATIO = 0.85
GOAL_STALENESS_VS_SWEEP = 1.3
GOAL_CONVERGE_S = 15.0
SIZES = {"quick": {"members": 2_000, "warmup_s": 2.0, "window_s": 8.0},
         "full": {"members": 8_000, "warmup_s": 3.0, "window_s": 15.0}}


@asynccontextmanager
async def serve_nodes(
    tmp: Path, url: str, n: int
) -> AsyncIterator[tuple[list[Child], list[int], bytes, Path]]:
    """``n`` ``seqactor serve`` children on the store ``url``; stopped on exit."""
    secret_file = tmp / "secret"
    secret_file.write_text(secrets.token_hex(32))
    secret_file.chmod(0o600)  # serve warns about group/world-readable secrets
    secret = secret_file.read_bytes().strip()
    nodes: list[Child] = []
    ports: list[int] = []
    try:
        for i in range(n):
            log = open(tmp / f"node{i}.log", "wb")  # noqa: SIM115 - owned by the process
            node = await Child.start(
                [str(Path(sys.executable).with_name("seqactor")), "serve", "--host",
                 "127.0.0.1", "--port", "0", "--store", url, "--secret-file", str(secret_file),
                 "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S), "--log-level", "WARNING"],
                f"node {i}", stderr=log,
            )
            log.close()
            nodes.append(node)
            line = await node.readline(SERVER_START_TIMEOUT_S)
            if not line.startswith("listening on ws://"):
                raise RuntimeError(f"node {i} said {line!r}")
            ports.append(int(line.rsplit(":", 1)[1].split("/", 1)[0]))
        yield nodes, ports, secret, secret_file
    finally:
        for node in nodes:
            if node.proc.returncode is None:
                await stop_process(node.proc)


async def run_phase(
    tmp: Path, url: str, n: int, cfg: dict[str, Any], kill_last: bool
) -> dict[str, Any]:
    members = cfg["members"]
    out: dict[str, Any] = {"nodes": n, "members": members}
    async with serve_nodes(tmp, url, n) as (nodes, ports, secret, secret_file), \
            client_processes(n) as clients, trio.open_nursery() as nursery:
        backend = await start_backend(nursery, ports[0], secret, members)
        listener = RedisStore(url)  # the store's part of the staleness (see the docstring)
        await listener.open()
        heard: dict[int, float] = {}

        def hear(change: Change) -> None:
            if isinstance(change, Allocated) and change.conversation_id == GROUP:
                heard[change.last] = time.monotonic()

        listener.add_listener(hear)
        per_client = -(-members // n)
        sample_every = max(1, per_client * n // SAMPLED_SESSIONS)
        ranges = user_ranges(members, n)
        answers = await call_all(clients, [
            {"cmd": "connect", "mode": "seqactor", "port": ports[i], "users": list(r),
             "transport": "raw", "concurrency": CONNECT_CONCURRENCY // n,
             "sample_every": sample_every, "group": GROUP, "secret_file": str(secret_file)}
            for i, r in enumerate(ranges)
        ])
        if sum(a["connected"] for a in answers) != members:
            raise RuntimeError(f"not every session connected: {answers}")
        async with trio.open_nursery() as load:
            load.start_soon(backend.allocate_paced, RATE_PER_S)
            await trio.sleep(cfg["warmup_s"])
            marks0 = await call_all(clients, [{"cmd": "reset"}] * n)
            cpu0 = [cpu_s(node.pid) for node in nodes]
            waits0 = [runqueue_wait_s(p.pid) for p in (*nodes, *clients)]
            t0 = time.monotonic()
            await trio.sleep(cfg["window_s"])
            cpu1 = [cpu_s(node.pid) for node in nodes]
            waits1 = [runqueue_wait_s(p.pid) for p in (*nodes, *clients)]
            t1 = time.monotonic()
            marks1 = await call_all(clients, [{"cmd": "mark"}] * n)
            await trio.sleep(DRAIN_S)
            horizon = time.monotonic()
            dumps = [tmp / f"records{n}_{i}.pkl" for i in range(n)]
            await call_all(clients, [{"cmd": "dump", "path": str(p)} for p in dumps])
            start_after = max(m["t"] for m in marks0) + 0.05
            allocs = [(s, t) for s, t in backend.allocs if start_after <= t <= t1]
            values, missing = staleness_ms(allocs, load_records(dumps), horizon)
            sent = backend.sent_by_seq
            delivery = sorted((heard[q] - sent[q]) * 1e3 for q, _ in allocs
                              if q in heard and q in sent)
            acks = sorted((t - sent[q]) * 1e3 for q, t in allocs if q in sent)
            after_ack = sorted((heard[q] - t) * 1e3 for q, t in allocs if q in heard)
            frames_per_s = rate_between(marks0, marks1)
            server_cpu = sum(b - a for a, b in zip(cpu0, cpu1, strict=True))
            out.update({
                "frames_per_s": frames_per_s,
                "server_cpu_s": server_cpu,
                "frames_per_server_cpu_s": frames_per_s * (t1 - t0) / max(1e-9, server_cpu),
                "staleness_p50_ms": percentile(values, 0.50),
                "staleness_p99_ms": percentile(values, 0.99),
                "staleness_missing": missing,
                "store_delivery_p50_ms": percentile(delivery, 0.50),
                "store_delivery_p99_ms": percentile(delivery, 0.99),
                "ack_p50_ms": percentile(acks, 0.50),
                "ack_p99_ms": percentile(acks, 0.99),
                "store_after_ack_p50_ms": percentile(after_ack, 0.50),
                "store_after_ack_p99_ms": percentile(after_ack, 0.99),
                "sweep_ms": members / max(1e-9, frames_per_s) * 1000,
                # per process, seconds per second runnable but waiting for a core
                "node_runqueue_wait_s_per_s": sum(
                    b - a for a, b in zip(waits0[:n], waits1[:n], strict=True)) / n / (t1 - t0),
                "client_runqueue_wait_s_per_s": sum(
                    b - a for a, b in zip(waits0[n:], waits1[n:], strict=True)
                ) / len(clients) / (t1 - t0),
                "window_s": t1 - t0,
            })
            if kill_last:
                # node n-1 dies; its client process brings the same users to node 0
                killed_at = time.monotonic()
                nodes[-1].proc.send_signal(signal.SIGKILL)
                await clients[-1].call({"cmd": "close"})
                answer = await clients[-1].call({
                    "cmd": "connect", "mode": "seqactor", "port": ports[0],
                    "users": list(ranges[-1]), "transport": "raw",
                    "concurrency": CONNECT_CONCURRENCY, "sample_every": sample_every,
                    "group": GROUP, "secret_file": str(secret_file)})
                out["failover_converge_s"] = time.monotonic() - killed_at
                out["failover_sessions"] = answer["connected"]
            load.cancel_scope.cancel()
        await call_all(clients, [{"cmd": "close"}] * n)
        await listener.aclose()
        nursery.cancel_scope.cancel()
    return out


async def main(quick: bool) -> dict[str, Any]:
    cfg = SIZES["quick" if quick else "full"]
    with tempfile.TemporaryDirectory(prefix="seqactor-nodes-") as tmpdir:
        tmp = Path(tmpdir)
        redis = RedisServer(data_dir=tmp / "redis", appendfsync="everysec").start()
        try:
            one = await run_phase(tmp, redis.url + "?prefix=one", 1, cfg, kill_last=False)
            four = await run_phase(tmp, redis.url + "?prefix=four", NODES, cfg, kill_last=True)
        finally:
            redis.cleanup()
    return {
        "nodes_quick": quick, "nodes_members": cfg["members"], "nodes_rate_per_s": RATE_PER_S,
        "node1_frames_per_s": one["frames_per_s"],
        "node1_frames_per_server_cpu_s": one["frames_per_server_cpu_s"],
        "node1_staleness_p99_ms": one["staleness_p99_ms"],
        "node1_sweep_ms": one["sweep_ms"],
        "nodes4_frames_per_s": four["frames_per_s"],
        "nodes4_frames_per_server_cpu_s": four["frames_per_server_cpu_s"],
        "nodes4_staleness_p50_ms": four["staleness_p50_ms"],
        "nodes4_staleness_p99_ms": four["staleness_p99_ms"],
        "nodes4_sweep_ms": four["sweep_ms"],
        "node1_staleness_p50_ms": one["staleness_p50_ms"],
        "nodes4_store_delivery_p50_ms": four["store_delivery_p50_ms"],
        "nodes4_store_delivery_p99_ms": four["store_delivery_p99_ms"],
        "nodes4_ack_p50_ms": four["ack_p50_ms"],
        "nodes4_ack_p99_ms": four["ack_p99_ms"],
        "nodes4_store_after_ack_p50_ms": four["store_after_ack_p50_ms"],
        "nodes4_store_after_ack_p99_ms": four["store_after_ack_p99_ms"],
        "node1_runqueue_wait_s_per_s": [one["node_runqueue_wait_s_per_s"],
                                        one["client_runqueue_wait_s_per_s"]],
        "nodes4_runqueue_wait_s_per_s": [four["node_runqueue_wait_s_per_s"],
                                         four["client_runqueue_wait_s_per_s"]],
        "nodes4_vs_node1_frames_per_cpu": (
            four["frames_per_server_cpu_s"] / one["frames_per_server_cpu_s"]),
        "failover_converge_s": four["failover_converge_s"],
        "failover_sessions": four["failover_sessions"],
        "nodes_loadavg_at_end": os.getloadavg()[0],
    }


def table(r: dict[str, Any]) -> str:
    ratio = r["nodes4_vs_node1_frames_per_cpu"]
    stale = r["nodes4_staleness_p99_ms"] / r["nodes4_sweep_ms"]
    rows = [
        ("members / allocations/s", f"{r['nodes_members']:,} / {r['nodes_rate_per_s']:g}", ""),
        ("push frames/s: 1 node / 4 nodes",
         f"{r['node1_frames_per_s']:,.0f} / {r['nodes4_frames_per_s']:,.0f}", ""),
        ("frames per server CPU-s: 1 node / 4 nodes",
         f"{r['node1_frames_per_server_cpu_s']:,.0f} / {r['nodes4_frames_per_server_cpu_s']:,.0f}",
         f"{ratio:.2f}x (goal >= {GOAL_FRAMES_PER_CPU_RATIO}x: "
         f"{'met' if ratio >= GOAL_FRAMES_PER_CPU_RATIO else 'NOT met'})"),
        ("4 nodes: staleness p50 / p99 ms",
         f"{r['nodes4_staleness_p50_ms']:.1f} / {r['nodes4_staleness_p99_ms']:.1f}",
         f"p99 = {stale:.2f}x the sweep (goal <= {GOAL_STALENESS_VS_SWEEP}x: "
         f"{'met' if stale <= GOAL_STALENESS_VS_SWEEP else 'NOT met'})"),
        ("sweep ms (members / frames/s): 1 node / 4 nodes",
         f"{r['node1_sweep_ms']:.1f} / {r['nodes4_sweep_ms']:.1f}", ""),
        ("1 node: staleness p50 / p99 ms",
         f"{r['node1_staleness_p50_ms']:.1f} / {r['node1_staleness_p99_ms']:.1f}",
         f"p99 = {r['node1_staleness_p99_ms'] / r['node1_sweep_ms']:.2f}x its sweep"),
        ("4 nodes: store delivery p50 / p99 ms (send -> listener)",
         f"{r['nodes4_store_delivery_p50_ms']:.1f} / {r['nodes4_store_delivery_p99_ms']:.1f}",
         f"send -> Allocated reply {r['nodes4_ack_p50_ms']:.1f} / {r['nodes4_ack_p99_ms']:.1f}; "
         f"listener - reply p50 / p99 {r['nodes4_store_after_ack_p50_ms']:.1f} / "
         f"{r['nodes4_store_after_ack_p99_ms']:.1f}"),
        ("run-queue wait s/s per process, node / client: 1 node; 4 nodes",
         "{:.2f} / {:.2f}; {:.2f} / {:.2f}".format(
             *r["node1_runqueue_wait_s_per_s"], *r["nodes4_runqueue_wait_s_per_s"]),
         "runnable, waiting for one of the cores (schedstat)"),
        ("node killed: its sessions converged on another after s",
         f"{r['failover_converge_s']:.2f}",
         f"{r['failover_sessions']:,} sessions (goal <= {GOAL_CONVERGE_S:g} s: "
         f"{'met' if r['failover_converge_s'] <= GOAL_CONVERGE_S else 'NOT met'})"),
    ]
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    lines = [f"{'nodes':<{w1}}  {'value':>{w2}}  goal / note", "-" * (w1 + w2 + 40)]
    lines += [f"{a:<{w1}}  {b:>{w2}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="2 000 members (about a minute)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = trio.run(main, args.quick)
    result["nodes_bench_seconds"] = time.perf_counter() - t0
    print(table(result))
    merged = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    merged.update(result)
    RESULTS.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS.relative_to(HERE.parent)}")
