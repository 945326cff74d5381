"""Multi-node benchmark: Redis store throughput and cross-node push latency.

Usage (from the repo root)::

    .venv/bin/python bench/cluster.py [--quick]

Prints a table and writes ``bench/results/cluster.json`` (a flat JSON object). Starts its own
redis-server processes (temporary directories, free ports) and ``seqactor serve`` nodes.

* ``alloc/s`` — 64 Trio tasks in one process allocate (count 1) on random conversations out of
  1 000 through one store: SQLite (group commit, fsync'd; the baseline of the same run), Redis
  with AOF ``appendfsync everysec`` and ``always``, and a local 3-master Redis Cluster
  (``everysec``). In-process, so it measures one node's store path, not Redis' limit.
* ``push`` — two ``seqactor serve`` nodes on one Redis; a user session follows a conversation
  on node B (cross-node) or on node A (same node, the baseline); a service session on node A
  allocates, one at a time: the time from sending ``AllocateSequences`` to the push arriving.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio_websocket as tws

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import percentile  # noqa: E402

from seqactor._proto import seqactor_pb2 as pb  # noqa: E402
from seqactor.store.redis import RedisStore  # noqa: E402
from seqactor.store.sqlite import SQLiteStore  # noqa: E402
from tests._harness import SECRET, RawClient, body, token  # noqa: E402
from tests._redis import RedisCluster, RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "cluster.json"
TASKS = 64
CONVERSATIONS = 1_000
NODES = 2
NODE_START_TIMEOUT_S = 30.0


async def bench_alloc(make_store: Any, total: int) -> float:
    store = make_store()
    await store.open()
    try:
        per_task = total // TASKS

        async def worker(i: int) -> None:
            rng = random.Random(i)
            for _ in range(per_task):
                await store.allocate(f"c{rng.randrange(CONVERSATIONS)}", 1)

        await worker(-1)  # warm up (scripts loaded, connections open)
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for i in range(TASKS):
                n.start_soon(worker, i)
        return per_task * TASKS / (time.perf_counter() - t0)
    finally:
        await store.aclose()


async def start_node(url: str, tmp: Path, name: str, nursery: trio.Nursery) -> tuple[Any, int]:
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # serve warns about group/world-readable secrets
    err = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 - owned by the process
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "seqactor.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--store", url, "--secret-file", str(secret), "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=err,
    )
    err.close()
    assert proc.stdout is not None
    buf = b""
    with trio.fail_after(NODE_START_TIMEOUT_S):
        while b"/v1" not in buf:
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError((tmp / f"{name}.log").read_text()[-2000:])
            buf += chunk
    port = int(buf.split(b"listening on ws://", 1)[1].split(b"/v1", 1)[0].rsplit(b":", 1)[1])

    async def drain() -> None:
        while await proc.stdout.receive_some(4096):  # type: ignore[union-attr]
            pass

    nursery.start_soon(drain)
    return proc, port


async def session(port: int, user: str, role: str = "user") -> tuple[Any, RawClient]:
    conn = await tws.connect_websocket_url(_NURSERY, f"ws://127.0.0.1:{port}/v1")
    client = RawClient(conn)
    reply = await client.request("hello", token=token(user, role), device_id=f"bench-{user}")
    assert body(reply) == "welcome", reply
    return conn, client


_NURSERY: trio.Nursery = None  # type: ignore[assignment]


async def push_latency(svc: RawClient, watcher: RawClient, cid: str, n: int) -> list[float]:
    """ms from sending AllocateSequences (node A) to the push arriving at ``watcher``."""
    out = []
    rid = 10_000_000
    for _ in range(n):
        rid += 1
        msg = pb.ClientMessage(request_id=rid)
        msg.allocate_sequences.conversation_id = cid
        msg.allocate_sequences.count = 1
        t0 = time.perf_counter()
        await svc.send(msg)
        while True:
            push = await watcher.next_push()
            if body(push) == "update" and cid in {k for k in push.update.conversations}:
                break
        out.append((time.perf_counter() - t0) * 1e3)
        reply = await svc.recv()
        assert reply.request_id == rid and body(reply) == "allocated", reply
        await trio.sleep(0.002)
    return out


async def bench_push(url: str, tmp: Path, n: int) -> dict[str, float]:
    global _NURSERY
    async with trio.open_nursery() as nursery:
        _NURSERY = nursery
        nodes = [await start_node(url, tmp, f"node{i}", nursery) for i in range(NODES)]
        try:
            (_, port_a), (_, port_b) = nodes[0], nodes[1]
            _, svc = await session(port_a, "backend", "service")
            await svc.request("add_members", conversation_id="far", user_ids=["bob"])
            await svc.request("add_members", conversation_id="near", user_ids=["alice"])
            _, bob = await session(port_b, "bob")
            _, alice = await session(port_a, "alice")
            for c in (bob, alice):
                assert body(await c.request("subscribe", all=True)) == "ack"
            await push_latency(svc, bob, "far", 20)  # warm up
            cross = await push_latency(svc, bob, "far", n)
            same = await push_latency(svc, alice, "near", n)
        finally:
            for proc, _ in nodes:
                proc.terminate()
            for proc, _ in nodes:
                with trio.move_on_after(10):
                    await proc.wait()
            nursery.cancel_scope.cancel()
    return {
        "cross_node_push_p50_ms": statistics.median(cross),
        "cross_node_push_p99_ms": percentile(cross, 0.99),
        "same_node_push_p50_ms": statistics.median(same),
        "same_node_push_p99_ms": percentile(same, 0.99),
        "push_samples": n,
    }


async def main(quick: bool) -> dict[str, Any]:
    total = 6_400 if quick else 32_000
    pushes = 300 if quick else 2_000
    res: dict[str, Any] = {
        "quick": quick, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "nodes": NODES, "alloc_tasks": TASKS,
        "alloc_ops_measured": total,
    }
    with tempfile.TemporaryDirectory(prefix="seqactor-bench-") as tmpdir:
        tmp = Path(tmpdir)
        res["alloc_per_s_sqlite"] = await bench_alloc(
            lambda: SQLiteStore(tmp / "bench.db"), total)
        every = RedisServer(data_dir=tmp / "r1", appendfsync="everysec").start()
        always = RedisServer(data_dir=tmp / "r2", appendfsync="always").start()
        cluster = RedisCluster()
        try:
            res["alloc_per_s_redis"] = await bench_alloc(lambda: RedisStore(every.url), total)
            res["alloc_per_s_redis_fsync_always"] = await bench_alloc(
                lambda: RedisStore(always.url), total)
            cluster.start()
            res["alloc_per_s_redis_cluster"] = await bench_alloc(
                lambda: RedisStore(cluster.url), total)
            res.update(await bench_push(always.url + "?prefix=push", tmp, pushes))
        finally:
            every.cleanup()
            always.cleanup()
            cluster.cleanup()
    res["redis_vs_sqlite_alloc_ratio"] = res["alloc_per_s_redis"] / res["alloc_per_s_sqlite"]
    res["cross_vs_same_node_push_p50_ratio"] = (
        res["cross_node_push_p50_ms"] / res["same_node_push_p50_ms"]
    )
    return res


def table(res: dict[str, Any]) -> str:
    rows = [
        ("alloc/s, SQLite group commit (baseline)", f"{res['alloc_per_s_sqlite']:,.0f}"),
        ("alloc/s, Redis AOF everysec", f"{res['alloc_per_s_redis']:,.0f}"),
        ("alloc/s, Redis AOF always", f"{res['alloc_per_s_redis_fsync_always']:,.0f}"),
        ("alloc/s, Redis Cluster (3 masters)", f"{res['alloc_per_s_redis_cluster']:,.0f}"),
        ("Redis / SQLite alloc ratio", f"{res['redis_vs_sqlite_alloc_ratio']:.2f}"),
        ("push A->B p50 / p99 (ms)",
         f"{res['cross_node_push_p50_ms']:.2f} / {res['cross_node_push_p99_ms']:.2f}"),
        ("push A->A p50 / p99 (ms, baseline)",
         f"{res['same_node_push_p50_ms']:.2f} / {res['same_node_push_p99_ms']:.2f}"),
        ("cross / same node p50 ratio", f"{res['cross_vs_same_node_push_p50_ratio']:.2f}"),
        ("nodes", str(res["nodes"])),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{w}}  value", f"{'-' * w}  {'-' * 16}"]
    lines += [f"{k:<{w}}  {v}" for k, v in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="fewer operations (< 60 s)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = trio.run(main, args.quick)
    result["bench_seconds"] = time.perf_counter() - t0
    print(table(result))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
