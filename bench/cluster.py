"""Multi-node benchmark (issue 15): Redis store throughput against Redis' own ceiling,
Redis Cluster against one Redis, and cross-node push latency.

Usage (from the repo root)::

    .venv/bin/python bench/cluster.py [--quick]

Prints a table and writes ``bench/results/cluster.json`` (a flat JSON object) and
``docs/img/cluster_throughput.png``. Starts its own redis-server processes (temporary
directories, free ports) and ``seqactor serve`` nodes. ``--quick`` measures the first keys
(ceiling, Redis, Redis Cluster, MarkRead, SQLite) in well under 120 s.

* ``redis_evalsha_ceiling_per_s`` — what Redis itself does for this work: ``redis-benchmark``
  (50 connections, pipelined 64 deep) calling the project's own allocation script (``OP``,
  ``alloc``, count 1, random conversations) by EVALSHA on the same kind of Redis (AOF
  everysec). ``redis_evalsha_unpipelined_per_s``: the same without pipelining.
* ``alloc_per_s_*`` — 64 (and 256: ``*_256``) Trio tasks in one process allocate (count 1)
  on random conversations out of 1 000 through one store: SQLite (group commit, fsync'd),
  Redis with AOF ``appendfsync everysec`` (and ``always``), a local 3-master Redis Cluster
  (``everysec``). One node's store path: the batches, the round trips, this process' CPU.
* ``alloc_per_s_*_2procs`` — the same allocations from ``PROCS`` node processes at once
  (256 tasks each, one store each, the same run for one Redis and the Cluster): a single
  node process can be the limit itself, so this is the comparison of the two Redis kinds.
  ``*_node_cpu_us_per_alloc`` and ``*_redis_cpu_us_per_alloc``: CPU per allocation of the
  node processes and of the Redis servers (``INFO cpu``, all masters) in that run.
* ``markread_per_s_redis`` — 64 tasks, each its own user in 1 000 conversations, mark read
  one seq further each time (every MarkRead a change).
* ``push`` — two ``seqactor serve`` nodes on one Redis; a user session follows a conversation
  on node B (cross-node) or on node A (same node, the baseline); a service session on node A
  allocates, one at a time: the time from sending ``AllocateSequences`` to the push arriving.
* ``foreign_change_cpu_share`` (full run) — 4 nodes on one Redis, node 0 with 100 sessions
  on its own group, every node's backend allocating 100/s on its own group: the share of node
  0's CPU spent on the other nodes' changes (none of its sessions follow them). Node 0's CPU
  is measured idle, with only the other groups busy (-> CPU per foreign change), with only its
  own, and with all four; the share is the foreign changes of the all-busy phase at that cost,
  over node 0's CPU in that phase.
* The other 4-node keys (``nodes4_*``, ``node1_*``, ``failover_converge_s``) come from
  ``bench/nodes.py``, which merges them into the same file; this benchmark keeps them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
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

from _common import cpu_s, figure, percentile  # noqa: E402

from seqactor._proto import seqactor_pb2 as pb  # noqa: E402
from seqactor.store import _redis_lua as lua  # noqa: E402
from seqactor.store.redis import RedisStore  # noqa: E402
from seqactor.store.sqlite import SQLiteStore  # noqa: E402
from tests._harness import SECRET, RawClient, body, token  # noqa: E402
from tests._redis import RedisCluster, RedisServer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "cluster.json"
PLOT = ROOT / "docs" / "img" / "cluster_throughput.png"
TASKS = 64
MANY_TASKS = 256
CONVERSATIONS = 1_000
CEILING_CLIENTS = 50  # redis-benchmark connections
CEILING_PIPELINE = 64  # redis-benchmark -P
CEILING_EPOCH = "bench-ceiling-epoch"
MARKREAD_HEADROOM = 1_000_000  # seqs allocated first so every MarkRead moves the read seq
GOAL_REDIS_PER_S = 50_000
GOAL_CEILING_SHARE = 0.30
GOAL_CLUSTER_RATIO = 1.5
FOREIGN_NODES = 4
FOREIGN_SESSIONS = 1_000  # sessions on the measured node, all following its own group
FOREIGN_SESSIONS_SMALL = 100  # the same with few sessions (own work small: the worst case)
FOREIGN_ADD_CHUNK = 2_000  # member ids per AddMembers
FOREIGN_RATE_PER_S = 100.0  # allocations/s on each node's own group
FOREIGN_WINDOW_S = 10.0  # CPU measured over this long, per phase
NODE4_KEYS = ("nodes4_frames_per_server_cpu_s", "node1_frames_per_server_cpu_s",
              "nodes4_staleness_p99_ms", "nodes4_sweep_ms", "failover_converge_s",
              "foreign_change_cpu_share")
NODES = 2
NODE_START_TIMEOUT_S = 30.0
PROCS = 2  # node processes allocating at once (the *_2procs keys)
PROCS_START_DELAY_S = 5.0  # children open their stores and warm up before the common start


async def alloc_child(url: str, total: int, tasks: int, start_at: float) -> dict[str, float]:
    """One node process of :func:`bench_alloc_procs`: open a store, warm up, wait for the
    common start (wall clock), allocate ``total`` with ``tasks`` tasks."""
    store = RedisStore(url)
    await store.open()
    try:
        per_task = total // tasks

        async def worker(i: int, n: int) -> None:
            rng = random.Random(i + os.getpid() * 1000)
            for _ in range(n):
                await store.allocate(f"c{rng.randrange(CONVERSATIONS)}", 1)

        await worker(-1, 200)
        await trio.sleep(max(0.0, start_at - time.time()))
        c0, t0 = time.process_time(), time.time()
        async with trio.open_nursery() as n:
            for i in range(tasks):
                n.start_soon(worker, i, per_task)
        return {"ops": per_task * tasks, "t0": t0, "t1": time.time(),
                "cpu_s": time.process_time() - c0}
    finally:
        await store.aclose()


def redis_cpu_s(ports: list[int]) -> float:
    """CPU seconds (user + sys) the Redis servers on ``ports`` used so far."""
    total = 0.0
    for port in ports:
        out = subprocess.run(["redis-cli", "-p", str(port), "INFO", "cpu"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
        for line in out.splitlines():
            if line.startswith(("used_cpu_user:", "used_cpu_sys:")):
                total += float(line.split(":", 1)[1])
    return total


async def bench_alloc_procs(
    url: str, ports: list[int], total: int, procs: int = PROCS, tasks: int = MANY_TASKS
) -> dict[str, float]:
    """Allocations/s of ``procs`` node processes at once (``total`` each), and the CPU per
    allocation of the nodes and of the Redis servers over the run."""
    start_at = time.time() + PROCS_START_DELAY_S
    cmd = [sys.executable, __file__, "--alloc-child", url, str(total), str(tasks), str(start_at)]
    children = [subprocess.Popen(cmd, stdout=subprocess.PIPE) for _ in range(procs)]
    await trio.sleep(max(0.0, start_at - time.time() - 0.5))
    r0 = redis_cpu_s(ports)
    outs = []
    for child in children:
        out, _ = await trio.to_thread.run_sync(child.communicate)
        if child.returncode != 0:
            raise RuntimeError(f"allocating child failed ({child.returncode})")
        outs.append(json.loads(out.decode().strip().splitlines()[-1]))
    redis_cpu = redis_cpu_s(ports) - r0
    ops = sum(o["ops"] for o in outs)
    wall = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    return {"per_s": ops / wall, "node_cpu_us": sum(o["cpu_s"] for o in outs) / ops * 1e6,
            "redis_cpu_us": redis_cpu / ops * 1e6}


async def bench_alloc(make_store: Any, total: int, tasks: int = TASKS) -> float:
    store = make_store()
    await store.open()
    try:
        per_task = total // tasks

        async def worker(i: int) -> None:
            rng = random.Random(i)
            for _ in range(per_task):
                await store.allocate(f"c{rng.randrange(CONVERSATIONS)}", 1)

        await worker(-1)  # warm up (scripts loaded, connections open)
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for i in range(tasks):
                n.start_soon(worker, i)
        return per_task * tasks / (time.perf_counter() - t0)
    finally:
        await store.aclose()


async def bench_markread(make_store: Any, total: int, tasks: int = TASKS) -> float:
    """MarkReads per second: each task is a user in every conversation, reading one seq
    further each time (always a change)."""
    store = make_store()
    await store.open()
    try:
        users = [f"u{i}" for i in range(tasks)]
        async with trio.open_nursery() as n:
            for c in range(CONVERSATIONS):
                async def setup(cid: str) -> None:
                    await store.add_members(cid, users)
                    await store.allocate(cid, 1)
                n.start_soon(setup, f"c{c}")
        per_task = total // tasks

        async def worker(i: int) -> None:
            rng = random.Random(i)
            read: dict[str, int] = {}
            for _ in range(per_task):
                cid = f"c{rng.randrange(CONVERSATIONS)}"
                read[cid] = read.get(cid, 0) + 1
                await store.mark_read(cid, users[i], read[cid])

        # the conversations' max must stay above every read: raise it once, in bulk
        async with trio.open_nursery() as n:
            for c in range(CONVERSATIONS):
                n.start_soon(store.allocate, f"c{c}", min(10_000, per_task + 1))
        t0 = time.perf_counter()
        async with trio.open_nursery() as n:
            for i in range(tasks):
                n.start_soon(worker, i)
        return per_task * tasks / (time.perf_counter() - t0)
    finally:
        await store.aclose()


def evalsha_ceiling(port: int, total: int, pipeline: int) -> float:
    """Allocations/s Redis itself runs: redis-benchmark calling the OP script (``alloc``,
    random conversations) by EVALSHA, ``pipeline`` deep. The script was loaded and the epoch
    key set (ASCII, for the command line) by the caller."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise RuntimeError("redis-benchmark not installed (Debian package redis-tools)")
    sha = hashlib.sha1(lua.OP.encode()).hexdigest()
    cmd = [exe, "-h", "127.0.0.1", "-p", str(port), "-n", str(total), "-c", str(CEILING_CLIENTS),
           "-P", str(pipeline), "-r", str(CONVERSATIONS), "--csv",
           "EVALSHA", sha, "4", "ceil{meta}:epoch", "ceil{meta}:pos",
           "ceil{c__rand_int__}:c:c", "ceil{c__rand_int__}:m:c",
           "alloc", CEILING_EPOCH, "s", "0", "0", "0", "ceil:ev:0", "c", "1", "", ""]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    row = [line for line in out.splitlines() if line.startswith('"EVALSHA')][-1]
    return float(row.split(",")[1].strip('"'))


async def prepare_ceiling(url: str, port: int) -> None:
    """Load the OP script into Redis and give the ``ceil`` prefix an ASCII epoch."""
    store = RedisStore(url + "?prefix=ceil")
    await store.open()
    try:
        await store.allocate("c", 1)  # loads the script
    finally:
        await store.aclose()
    subprocess.run(["redis-cli", "-p", str(port), "SET", "ceil{meta}:epoch", CEILING_EPOCH],
                   check=True, capture_output=True, timeout=30)


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


async def bench_foreign(
    url: str, tmp: Path, window_s: float, sessions: int = FOREIGN_SESSIONS
) -> dict[str, Any]:
    """CPU a node spends on changes none of its sessions follow: 4 nodes on one Redis; node 0
    holds ``sessions`` sessions (in a bench/_fanout_client.py process) following its own group
    g0; each node's backend allocates on its own group at FOREIGN_RATE_PER_S. Node 0's CPU over
    ``window_s``: idle, with only the other groups busy, with only g0, with all four."""
    from fanout import call_all, client_processes  # bench/ is on sys.path (the script's dir)

    global _NURSERY
    async with trio.open_nursery() as nursery, client_processes(1) as clients:
        _NURSERY = nursery
        nodes = [await start_node(url, tmp, f"fnode{i}", nursery)
                 for i in range(FOREIGN_NODES)]
        try:
            backends = []
            for i, (_, port) in enumerate(nodes):
                _, svc = await session(port, "backend", "service")
                ids = [f"u{k:06d}" if i == 0 else f"g{i}u{k}" for k in range(sessions)]
                for first in range(0, sessions, FOREIGN_ADD_CHUNK):
                    await svc.request("add_members", conversation_id=f"g{i}",
                                      user_ids=ids[first:first + FOREIGN_ADD_CHUNK])
                backends.append(svc)
            port0 = nodes[0][1]
            answer = (await call_all(clients, [{
                "cmd": "connect", "mode": "seqactor", "port": port0, "users": [0, sessions],
                "transport": "raw", "concurrency": 100, "sample_every": sessions + 1,
                "group": "g0", "secret_file": str(tmp / "secret")}]))[0]
            if answer["connected"] != sessions:
                raise RuntimeError(f"foreign: only {answer} sessions on node 0")

            async def frames() -> int:
                return int((await call_all(clients, [{"cmd": "mark"}]))[0]["frames"])

            allocs = [0] * FOREIGN_NODES

            async def allocate(i: int, stop: trio.Event) -> None:
                period = 1.0 / FOREIGN_RATE_PER_S
                nxt = trio.current_time()
                while not stop.is_set():
                    await backends[i].request("allocate_sequences", conversation_id=f"g{i}")
                    allocs[i] += 1
                    nxt += period
                    await trio.sleep(max(0.0, nxt - trio.current_time()))

            async def phase(busy: list[int]) -> tuple[float, int, int]:
                """(node 0 CPU s, its push frames, foreign changes) over the window, the
                groups of the nodes in ``busy`` allocating."""
                stop = trio.Event()
                async with trio.open_nursery() as n:
                    for i in busy:
                        n.start_soon(allocate, i, stop)
                    await trio.sleep(1.0)  # settle
                    c0, p0, a0 = cpu_s(nodes[0][0].pid), await frames(), sum(allocs[1:])
                    await trio.sleep(window_s)
                    used = cpu_s(nodes[0][0].pid) - c0
                    got, foreign = await frames() - p0, sum(allocs[1:]) - a0
                    stop.set()
                return used, got, foreign

            idle_cpu, _, _ = await phase([])
            foreign_cpu_only, _, foreign_only = await phase(list(range(1, FOREIGN_NODES)))
            own_cpu, own_pushes, _ = await phase([0])
            all_cpu, all_pushes, foreign = await phase(list(range(FOREIGN_NODES)))
        finally:
            for proc, _ in nodes:
                proc.terminate()
            for proc, _ in nodes:
                with trio.move_on_after(10):
                    await proc.wait()
            nursery.cancel_scope.cancel()
    # CPU per foreign change: node 0 with only the other groups busy, over its idle CPU; the
    # share: that cost for the foreign changes of the all-busy phase, of node 0's CPU then
    per_change = max(0.0, foreign_cpu_only - idle_cpu) / max(1, foreign_only)
    per_frame = max(0.0, own_cpu - idle_cpu) / max(1, own_pushes)
    return {
        "foreign_change_cpu_share": min(1.0, per_change * foreign / all_cpu),
        "foreign_cpu_per_change_us": per_change * 1e6,
        "own_cpu_per_push_frame_us": per_frame * 1e6,
        "foreign_node_cpu_idle_s": idle_cpu,
        "foreign_node_cpu_foreign_only_s": foreign_cpu_only,
        "foreign_changes_per_s": foreign / window_s,
        "foreign_node_cpu_own_only_s": own_cpu, "foreign_node_cpu_all_busy_s": all_cpu,
        "foreign_window_s": window_s, "foreign_sessions": sessions,
        "foreign_rate_per_node_per_s": FOREIGN_RATE_PER_S,
        "foreign_node_frames_per_s_own_only": own_pushes / window_s,
        "foreign_node_frames_per_s_all_busy": all_pushes / window_s,
    }


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
    total = 12_800 if quick else 64_000
    ceiling_total = 200_000 if quick else 1_000_000
    pushes = 300 if quick else 2_000
    res: dict[str, Any] = {
        "quick": quick, "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "nodes": NODES, "alloc_tasks": TASKS,
        "alloc_tasks_many": MANY_TASKS, "alloc_ops_measured": total,
        "loadavg_at_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="seqactor-bench-") as tmpdir:
        tmp = Path(tmpdir)
        res["alloc_per_s_sqlite"] = await bench_alloc(
            lambda: SQLiteStore(tmp / "bench.db"), total)
        every = RedisServer(data_dir=tmp / "r1", appendfsync="everysec").start()
        always = RedisServer(data_dir=tmp / "r2", appendfsync="always").start()
        ceil = RedisServer(data_dir=tmp / "r3", appendfsync="everysec").start()
        cluster = RedisCluster()
        try:
            await prepare_ceiling(ceil.url, ceil.port)
            res["redis_evalsha_ceiling_per_s"] = evalsha_ceiling(
                ceil.port, ceiling_total, CEILING_PIPELINE)
            res["redis_evalsha_unpipelined_per_s"] = evalsha_ceiling(
                ceil.port, ceiling_total // 4, 1)
            res["alloc_per_s_redis"] = await bench_alloc(
                lambda: RedisStore(every.url + "?prefix=a64"), total)
            res["alloc_per_s_redis_256"] = await bench_alloc(
                lambda: RedisStore(every.url + "?prefix=a256"), total, MANY_TASKS)
            res["markread_per_s_redis"] = await bench_markread(
                lambda: RedisStore(every.url + "?prefix=mr"), total)
            cluster.start()
            res["alloc_per_s_redis_cluster"] = await bench_alloc(
                lambda: RedisStore(cluster.url + "?prefix=a64"), total)
            res["alloc_per_s_redis_cluster_256"] = await bench_alloc(
                lambda: RedisStore(cluster.url + "?prefix=a256"), total, MANY_TASKS)
            for name, url, ports in (
                ("redis", every.url + "?prefix=p2", [every.port]),
                ("redis_cluster", cluster.url + "?prefix=p2", [n.port for n in cluster.nodes]),
            ):
                procs = await bench_alloc_procs(url, ports, total)
                res[f"alloc_per_s_{name}_{PROCS}procs"] = procs["per_s"]
                res[f"{name}_{PROCS}procs_node_cpu_us_per_alloc"] = procs["node_cpu_us"]
                res[f"{name}_{PROCS}procs_redis_cpu_us_per_alloc"] = procs["redis_cpu_us"]
            if not quick:
                res["alloc_per_s_redis_fsync_always"] = await bench_alloc(
                    lambda: RedisStore(always.url), total)
                res.update(await bench_push(always.url + "?prefix=push", tmp, pushes))
                res.update(await bench_foreign(every.url + "?prefix=foreign", tmp,
                                               FOREIGN_WINDOW_S))
                small = await bench_foreign(every.url + "?prefix=foreign_small", tmp,
                                            FOREIGN_WINDOW_S, FOREIGN_SESSIONS_SMALL)
                res.update({f"{k}_small": v for k, v in small.items()})
        finally:
            every.cleanup()
            always.cleanup()
            ceil.cleanup()
            cluster.cleanup()
    best_redis = max(res["alloc_per_s_redis"], res["alloc_per_s_redis_256"])
    best_cluster = max(res["alloc_per_s_redis_cluster"], res["alloc_per_s_redis_cluster_256"])
    res["redis_vs_ceiling_ratio"] = best_redis / res["redis_evalsha_ceiling_per_s"]
    res["cluster_vs_redis_ratio"] = best_cluster / best_redis
    res[f"cluster_vs_redis_ratio_{PROCS}procs"] = (
        res[f"alloc_per_s_redis_cluster_{PROCS}procs"] / res[f"alloc_per_s_redis_{PROCS}procs"])
    res["redis_vs_sqlite_alloc_ratio"] = best_redis / res["alloc_per_s_sqlite"]
    if "cross_node_push_p50_ms" in res:
        res["cross_vs_same_node_push_p50_ratio"] = (
            res["cross_node_push_p50_ms"] / res["same_node_push_p50_ms"]
        )
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for key, value in previous.items():  # bench/nodes.py's keys, from its latest run
        if key.startswith(("node1_", "nodes4_", "nodes_", "failover_")) and key not in res:
            res[key] = value
    for key in NODE4_KEYS:
        res.setdefault(key, None)
    return res


def table(res: dict[str, Any]) -> str:
    ceiling = res["redis_evalsha_ceiling_per_s"]
    one = max(res["alloc_per_s_redis"], res["alloc_per_s_redis_256"])

    def per_s(key: str) -> tuple[str, str, str]:
        v = res[key]
        return (f"{v:,.0f}", f"{v / ceiling:.2f}", f"{v / one:.2f}")

    rows: list[tuple[str, str, str, str]] = [
        ("Redis ceiling: EVALSHA alloc, pipelined (redis-benchmark)", *per_s(
            "redis_evalsha_ceiling_per_s")),
        ("Redis: EVALSHA alloc, unpipelined (redis-benchmark)", *per_s(
            "redis_evalsha_unpipelined_per_s")),
        ("alloc/s, Redis, 64 tasks", *per_s("alloc_per_s_redis")),
        ("alloc/s, Redis, 256 tasks", *per_s("alloc_per_s_redis_256")),
        ("alloc/s, Redis Cluster (3 masters), 64 tasks", *per_s("alloc_per_s_redis_cluster")),
        ("alloc/s, Redis Cluster (3 masters), 256 tasks", *per_s(
            "alloc_per_s_redis_cluster_256")),
        (f"alloc/s, Redis, {PROCS} node processes x 256 tasks",
         *per_s(f"alloc_per_s_redis_{PROCS}procs")),
        (f"alloc/s, Redis Cluster, {PROCS} node processes x 256 tasks",
         *per_s(f"alloc_per_s_redis_cluster_{PROCS}procs")),
        ("MarkRead/s, Redis, 64 tasks", *per_s("markread_per_s_redis")),
        ("alloc/s, SQLite group commit, 64 tasks", *per_s("alloc_per_s_sqlite")),
    ]
    if "alloc_per_s_redis_fsync_always" in res:
        rows.append(("alloc/s, Redis AOF always, 64 tasks", *per_s(
            "alloc_per_s_redis_fsync_always")))
    w = max(len(r[0]) for r in rows)
    lines = [f"{'metric':<{w}}  {'value':>10}  {'x ceiling':>9}  {'x 1 Redis':>9}",
             f"{'-' * w}  {'-' * 10}  {'-' * 9}  {'-' * 9}"]
    lines += [f"{a:<{w}}  {b:>10}  {c:>9}  {d:>9}" for a, b, c, d in rows]
    lines.append("")
    lines.append(f"goals: one Redis >= {GOAL_REDIS_PER_S:,} alloc/s ({one:,.0f}: "
                 f"{'met' if one >= GOAL_REDIS_PER_S else 'NOT met'}) and >= "
                 f"{GOAL_CEILING_SHARE:.0%} of the ceiling ({res['redis_vs_ceiling_ratio']:.0%}: "
                 f"{'met' if res['redis_vs_ceiling_ratio'] >= GOAL_CEILING_SHARE else 'NOT met'}); "
                 f"Cluster >= {GOAL_CLUSTER_RATIO}x one Redis "
                 f"({res['cluster_vs_redis_ratio']:.2f}x: "
                 f"{'met' if res['cluster_vs_redis_ratio'] >= GOAL_CLUSTER_RATIO else 'NOT met'}"
                 f"; {PROCS} node processes: "
                 f"{res[f'cluster_vs_redis_ratio_{PROCS}procs']:.2f}x)")
    lines.append(
        f"CPU per allocation, {PROCS} node processes: Redis "
        f"{res[f'redis_{PROCS}procs_node_cpu_us_per_alloc']:.1f} us in the nodes + "
        f"{res[f'redis_{PROCS}procs_redis_cpu_us_per_alloc']:.1f} us in Redis; Cluster "
        f"{res[f'redis_cluster_{PROCS}procs_node_cpu_us_per_alloc']:.1f} us in the nodes + "
        f"{res[f'redis_cluster_{PROCS}procs_redis_cpu_us_per_alloc']:.1f} us in the masters "
        f"({res['cpus']} cores for all)")
    if "cross_node_push_p50_ms" in res:
        lines.append(
            f"push A->B p50 / p99 {res['cross_node_push_p50_ms']:.2f} / "
            f"{res['cross_node_push_p99_ms']:.2f} ms; A->A (baseline) "
            f"{res['same_node_push_p50_ms']:.2f} / {res['same_node_push_p99_ms']:.2f} ms; "
            f"cross / same p50 {res['cross_vs_same_node_push_p50_ratio']:.2f}x")
    if res.get("foreign_change_cpu_share") is not None:
        lines.append(
            f"foreign changes: node 0 ({res['foreign_sessions']} sessions on its own group) "
            f"CPU {res['foreign_node_cpu_idle_s']:.2f} s idle, "
            f"{res['foreign_node_cpu_foreign_only_s']:.2f} s with only the others busy, "
            f"{res['foreign_node_cpu_own_only_s']:.2f} s with only its group busy, "
            f"{res['foreign_node_cpu_all_busy_s']:.2f} s with all {FOREIGN_NODES} busy "
            f"(per {res['foreign_window_s']:g} s; {res['foreign_changes_per_s']:.0f} foreign "
            f"changes/s at {res['foreign_cpu_per_change_us']:.0f} us each, own push frames "
            f"{res['own_cpu_per_push_frame_us']:.1f} us each): foreign share "
            f"{res['foreign_change_cpu_share']:.1%} (goal <= 10 %: "
            f"{'met' if res['foreign_change_cpu_share'] <= 0.10 else 'NOT met'})")
    if res.get("foreign_change_cpu_share_small") is not None:
        lines.append(
            f"  with {res['foreign_sessions_small']} sessions on node 0: foreign share "
            f"{res['foreign_change_cpu_share_small']:.1%} "
            f"({res['foreign_cpu_per_change_us_small']:.0f} us per foreign change, own push "
            f"frames {res['foreign_node_frames_per_s_own_only_small']:,.0f}/s)")
    missing = [k for k in NODE4_KEYS if res.get(k) is None]
    if missing:
        lines.append(f"not measured: {', '.join(missing)} (bench/nodes.py; the foreign share: "
                     "a full run)")
    return "\n".join(lines)


def plot(res: dict[str, Any]) -> None:
    bars = [
        ("Redis ceiling\n(pipelined)", "redis_evalsha_ceiling_per_s"),
        ("Redis ceiling\n(unpipelined)", "redis_evalsha_unpipelined_per_s"),
        ("Redis\n64 tasks", "alloc_per_s_redis"),
        ("Redis\n256 tasks", "alloc_per_s_redis_256"),
        ("Cluster\n64 tasks", "alloc_per_s_redis_cluster"),
        ("Cluster\n256 tasks", "alloc_per_s_redis_cluster_256"),
        (f"Redis\n{PROCS} procs", f"alloc_per_s_redis_{PROCS}procs"),
        (f"Cluster\n{PROCS} procs", f"alloc_per_s_redis_cluster_{PROCS}procs"),
        ("MarkRead\nRedis", "markread_per_s_redis"),
        ("SQLite\n64 tasks", "alloc_per_s_sqlite"),
    ]
    with figure(PLOT, figsize=(12, 4.5)) as (fig, ax):
        values = [res[k] / 1000 for _, k in bars]
        colors = ["#999999", "#bbbbbb", "#d62728", "#ff7f0e", "#1f77b4", "#17becf", "#e377c2",
                  "#8c564b", "#9467bd", "#2ca02c"]
        ax.bar([label for label, _ in bars], values, color=colors)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}k", ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("operations / s (thousands)")
        ax.set_title(f"seqactor store writes, one node process unless named ({res['cpus']} "
                     f"shared cores, {'quick' if res['quick'] else 'full'} run)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--quick", action="store_true",
                    help="fewer operations, no AOF-always and push runs (< 120 s)")
    ap.add_argument("--alloc-child", nargs=4, metavar=("URL", "TOTAL", "TASKS", "START_AT"),
                    help=argparse.SUPPRESS)  # one process of bench_alloc_procs
    args = ap.parse_args()
    if args.alloc_child:
        url, n, tasks, start_at = args.alloc_child
        print(json.dumps(trio.run(alloc_child, url, int(n), int(tasks), float(start_at))))
        sys.exit(0)
    t0 = time.perf_counter()
    result = trio.run(main, args.quick)
    result["bench_seconds"] = time.perf_counter() - t0
    print(table(result))
    plot(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
