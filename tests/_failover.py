"""A Redis failover under load, on loopback (used by tests/test_failover.py and
bench/reliability.py).

A master, a replica fed through a TCP proxy (so the test can stall replication, as a slow or
partitioned link would), Sentinel watching the master, and two store nodes reaching Redis
through a second proxy (standing in for the virtual IP or Sentinel-aware address a deployment
gives its nodes). Writers allocate on both nodes all along:

1. ``before`` allocations acknowledged with replication flowing;
2. replication stalls; ``during`` more allocations are attempted (acknowledged or refused);
3. ``kill -9`` the master; Sentinel promotes the replica (``REPLICAOF NO ONE``); the address
   the nodes use moves to it; the nodes reconnect on their own; a new replica joins it
   (``wait_replicas=1`` needs one to acknowledge anything);
4. ``after`` more allocations acknowledged.

The result counts the acknowledged seqs handed out twice. Without ``wait_replicas`` every
allocation acknowledged while replication stalled is missing on the promoted replica, so its
seqs are handed out again; with it they are refused instead (``WAIT`` times out).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from seqactor.store._base import Unavailable
from seqactor.store.redis import RedisStore
from tests._proxy import Proxy
from tests._redis import RedisSentinel, RedisServer, cli

CONVERSATIONS = 10
WRITERS = 16
NODES = 2
RETRY_PAUSE_S = 0.02  # a writer whose allocation was refused tries again after this
WAIT_TIMEOUT_MS = 200  # ?wait_timeout_ms= of the runs with wait_replicas
PHASE_TIMEOUT_S = 60.0  # each phase must be reached within this
POLL_S = 0.02  # how often the phases' conditions are looked at


@dataclass
class FailoverResult:
    wait_replicas: int
    acknowledged: int  # allocations acknowledged over the whole run
    refused: int  # allocations answered Unavailable (retried)
    stalled_acknowledged: int  # acknowledged after replication stalled (in flight or later)
    reissued: int  # acknowledged seqs that were handed out twice
    promote_s: float  # kill -9 of the master -> Sentinel names the replica
    resume_s: float  # kill -9 of the master -> first acknowledged allocation afterwards


async def _until(pred: Any, what: str) -> None:
    with trio.fail_after(PHASE_TIMEOUT_S):
        while not pred():
            await trio.sleep(POLL_S)
    assert pred(), what


async def run_failover(
    tmp: Path, wait_replicas: int, before: int = 200, during: int = 20, after: int = 200
) -> FailoverResult:
    master = RedisServer(data_dir=tmp / "master", appendonly=False).start()
    replica: RedisServer | None = None
    sentinel: RedisSentinel | None = None
    stores: list[RedisStore] = []
    spares: list[RedisServer] = []
    try:
        async with trio.open_nursery() as nursery:
            repl_proxy = Proxy(master.port)
            await nursery.start(repl_proxy.serve)
            replica = RedisServer(
                data_dir=tmp / "replica", appendonly=False,
                extra_args=("--replicaof", "127.0.0.1", str(repl_proxy.port)),
            ).start()
            rport = replica.port
            await _until(lambda: "master_link_status:up" in cli(rport, "INFO", "replication"),
                         "the replica is in sync")
            sentinel = RedisSentinel(master.port).start()
            sent = sentinel
            await _until(lambda: sent.replicas_known() >= 1, "Sentinel knows the replica")
            client_proxy = Proxy(master.port)
            await nursery.start(client_proxy.serve)
            query = "prefix=f"
            if wait_replicas:
                query += f"&wait_replicas={wait_replicas}&wait_timeout_ms={WAIT_TIMEOUT_MS}"
            url = f"redis://127.0.0.1:{client_proxy.port}/0?{query}"
            for _ in range(NODES):
                store = RedisStore(url)
                await store.open()
                stores.append(store)

            acks: list[tuple[str, int, int, float]] = []
            refused = 0
            stop = False

            async def writer(i: int) -> None:
                nonlocal refused
                store = stores[i % NODES]
                cid = f"c{i % CONVERSATIONS}"
                while not stop:
                    try:
                        a = await store.allocate(cid, 1)
                    except Unavailable:
                        refused += 1
                        await trio.sleep(RETRY_PAUSE_S)
                        continue
                    acks.append((cid, a.first, a.last, time.monotonic()))

            async with trio.open_nursery() as writers:
                for i in range(WRITERS):
                    writers.start_soon(writer, i)
                await _until(lambda: len(acks) >= before, "allocations before the stall")
                repl_proxy.pause()
                acked0, attempts0 = len(acks), len(acks) + refused
                await _until(lambda: len(acks) + refused - attempts0 >= during,
                             "allocations while replication stalls")
                stalled = len(acks) - acked0
                killed_at = time.monotonic()
                master.kill()
                repl_proxy.cut_all()
                await _until(lambda: sent.master_port_now() == rport, "Sentinel promotes")
                promote_s = time.monotonic() - killed_at
                client_proxy.target_port = rport
                client_proxy.cut_all()
                # a new replica joins the promoted master (as the old master would once back,
                # reconfigured by Sentinel): with wait_replicas=1 writes need one
                spare = RedisServer(data_dir=tmp / "spare", appendonly=False,
                                    extra_args=("--replicaof", "127.0.0.1", str(rport))).start()
                spares.append(spare)
                n_killed = len(acks)
                await _until(lambda: len(acks) - n_killed >= after, "allocations after")
                stop = True
            first_after = min(t for _, _, _, t in acks[n_killed:])
            seen: dict[str, collections.Counter[int]] = collections.defaultdict(
                collections.Counter)
            for cid, first, last, _ in acks:
                for seq in range(first, last + 1):
                    seen[cid][seq] += 1
            reissued = sum(n - 1 for c in seen.values() for n in c.values() if n > 1)
            nursery.cancel_scope.cancel()
        return FailoverResult(
            wait_replicas=wait_replicas, acknowledged=len(acks), refused=refused,
            stalled_acknowledged=stalled, reissued=reissued, promote_s=promote_s,
            resume_s=first_after - killed_at,
        )
    finally:
        for store in stores:
            with trio.CancelScope(shield=True):
                await store.aclose()
        if sentinel is not None:
            sentinel.cleanup()
        for spare in spares:
            spare.cleanup()
        if replica is not None:
            replica.cleanup()
        master.cleanup()
