"""Several ``seqactor serve`` processes on one Redis (docs/protocol.md, "Stores"): cross-node
push, tokens that work on any node (I3), no seq reuse across a Redis restart (I1), the data-loss guard, and
convergence after a node's Redis connection was cut."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket as tws

from seqactor._proto import seqactor_pb2 as pb
from seqactor.store.redis import RedisStore
from tests._harness import SECRET, RawClient, body, token, update_of
from tests._redis import RedisServer, unique_prefix

pytestmark = [pytest.mark.slow]

SEQACTOR = [sys.executable, "-m", "seqactor.cli"]
NODE_START_TIMEOUT_S = 20.0
CONVERGE_TIMEOUT_S = 15.0
LISTENING = re.compile(rb"listening on ws://([^:/\s]+):(\d+)/v1")


class Node:
    def __init__(self, proc: trio.Process, port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"


@asynccontextmanager
async def run_node(store_url: str, tmp: Path, name: str) -> AsyncIterator[Node]:
    """A ``seqactor serve`` subprocess on a free port; stopped with SIGTERM at exit."""
    secret = tmp / "secret"
    if not secret.exists():
        secret.write_bytes(SECRET)
    log = tmp / f"{name}.log"
    with open(log, "wb") as err:
        proc = await trio.lowlevel.open_process(
            [*SEQACTOR, "serve", "--host", "127.0.0.1", "--port", "0", "--store", store_url,
             "--secret-file", str(secret)],
            stdout=subprocess.PIPE, stderr=err,
        )
    assert proc.stdout is not None
    try:
        buf = b""
        with trio.fail_after(NODE_START_TIMEOUT_S):
            while (m := LISTENING.search(buf)) is None:
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError(f"node {name} exited: {log.read_text()[-2000:]}")
                buf += chunk
        node = Node(proc, int(m.group(2)), log)
        async with trio.open_nursery() as n:  # keep draining stdout
            n.start_soon(_drain, proc.stdout)
            yield node
            n.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            proc.terminate()
            with trio.move_on_after(10):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _drain(stream: Any) -> None:
    while await stream.receive_some(4096):
        pass


@asynccontextmanager
async def connect(node: Node, user: str, role: str = "user") -> AsyncIterator[RawClient]:
    async with tws.open_websocket_url(node.url) as conn:
        client = RawClient(conn)
        reply = await client.request("hello", token=token(user, role), device_id=f"d-{user}")
        assert body(reply) == "welcome", reply
        yield client


def store_init(store_url: str, force: bool) -> str:
    args = [*SEQACTOR, "store", "init", "--store", store_url] + (["--force"] if force else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


class Cache:
    """What a client holds: its view as applied from updates, and its last sync token. A row
    is (max, read, min, time, frozen): membership 2 freezes it, 1 ends that, 0 keeps it."""

    def __init__(self) -> None:
        self.convs: dict[str, tuple[int, int, int, int, int]] = {}
        self.token = b""
        self.fulls = 0

    def apply(self, msg: pb.ServerMessage) -> None:
        convs, tok, full, removed = update_of(msg)
        if full:
            self.convs = {}
            self.fulls += 1
        for cid, values in convs.items():
            old = self.convs.get(cid, (0, 0, 0, 0, 0))
            mx, rd, mn, tm = (v or o for v, o in zip(values[:4], old[:4], strict=True))
            self.convs[cid] = (mx, rd, mn, tm, int(values[4] == 2) if values[4] else old[4])
        for cid in removed:
            self.convs.pop(cid, None)
        if tok:
            self.token = tok

    async def sync(self, client: RawClient) -> pb.ServerMessage:
        reply = await client.request("get_sequences", since=self.token)
        self.apply(reply)
        return reply


async def truth(store: RedisStore, user: str) -> dict[str, tuple[int, int, int, int, int]]:
    v = await store.load_view(user)
    return {
        cid: (v.max_seq[i], v.read_seq[i], v.min_seq[i], v.time_ms[i], v.frozen[i])
        for i, cid in enumerate(v.conversation_ids)
    }


async def service_op(svc: RawClient, kind: str, retry: bool = False, **fields: Any) -> Any:
    """A service op; with ``retry`` UNAVAILABLE answers are retried (Redis away)."""
    with trio.fail_after(30):
        while True:
            reply = await svc.request(kind, **fields)
            if retry and body(reply) == "error" and reply.error.code == pb.Error.UNAVAILABLE:
                await trio.sleep(0.05)
                continue
            return reply


async def push_until(client: RawClient, cache: Cache, want: Any, timeout: float) -> None:
    """Apply pushes until ``await want()`` equals the cache."""
    with trio.fail_after(timeout):
        while True:
            expected = await want()
            if cache.convs == expected:
                return
            with trio.move_on_after(0.3):
                msg = await client.next_push(timeout=1e9)
                if body(msg) == "update":
                    cache.apply(msg)


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    srv = RedisServer(data_dir=tmp_path / "redis", appendfsync="always").start()
    yield srv
    srv.cleanup()


def store_url(srv: RedisServer) -> str:
    return f"{srv.url}?prefix={unique_prefix()}"


# ------------------------------------------------------------------ tests


async def test_push_across_nodes_and_move_between_nodes(redis: RedisServer, tmp_path: Path) -> None:
    url = store_url(redis)
    truth_store = RedisStore(url)
    async with AsyncExitStack() as stack:
        a, b, c = [await stack.enter_async_context(run_node(url, tmp_path, n)) for n in "abc"]
        await truth_store.open()
        stack.push_async_callback(truth_store.aclose)
        svc = await stack.enter_async_context(connect(a, "backend", "service"))
        convs = [f"g{i}" for i in range(4)]
        for cid in convs:
            assert body(await svc.request("add_members", conversation_id=cid,
                                          user_ids=["alice", "bob"])) == "ack"

        # a client on node C sees an allocation made through node A
        async with connect(c, "bob") as bob:
            cache = Cache()
            await cache.sync(bob)
            assert body(await bob.request("subscribe", all=True)) == "ack"
            got = await svc.request("allocate_sequences", conversation_id="g0", count=3)
            assert got.allocated.last_sequence == 3
            push = await bob.next_push()
            cache.apply(push)
            assert cache.convs["g0"][0] == 3

        # alice follows everything on B while traffic flows through A; she moves to C
        rng = random.Random(6)
        stop = trio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                cid = rng.choice(convs)
                k = rng.random()
                if k < 0.75:
                    await svc.request("allocate_sequences", conversation_id=cid,
                                      count=rng.randint(1, 3),
                                      sender_user_id=rng.choice(["alice", "bob", ""]))
                elif k < 0.85:
                    await svc.request("remove_members", conversation_id=cid, user_ids=["alice"],
                                      keep_history=rng.random() < 0.5)
                elif k < 0.95:
                    await svc.request("add_members", conversation_id=cid, user_ids=["alice"])
                else:
                    await svc.request("set_min_sequence", conversation_id=cid,
                                      min_sequence=rng.randint(0, 20))

        alice = Cache()
        async with trio.open_nursery() as n:
            n.start_soon(traffic)
            async with connect(b, "alice") as on_b:
                await alice.sync(on_b)
                assert body(await on_b.request("subscribe", all=True)) == "ack"
                with trio.move_on_after(1.5):
                    while True:
                        msg = await on_b.next_push(timeout=1e9)
                        alice.apply(msg)
                        if rng.random() < 0.2 and alice.convs:
                            cid = rng.choice(sorted(alice.convs))
                            r = await on_b.request("mark_read", conversation_id=cid,
                                                   read_sequence=alice.convs[cid][0])
                            if body(r) == "update":  # pushes may be queued first
                                alice.apply(r)
                        for p in on_b.pushes:
                            alice.apply(p)
                        on_b.pushes.clear()
            await trio.sleep(0.5)  # traffic goes on while alice is away
            stop.set()
        assert alice.token
        fulls = alice.fulls
        async with connect(c, "alice") as on_c:
            reply = await alice.sync(on_c)
            assert not reply.update.full, "a token from node B must be usable on node C"
            assert alice.fulls == fulls
            assert alice.convs == await truth(truth_store, "alice")  # exactly, from the delta
            # and pushes keep her exact
            assert body(await on_c.request("subscribe", all=True)) == "ack"
            for _ in range(10):
                await svc.request("allocate_sequences", conversation_id=rng.choice(convs), count=1)
            await push_until(on_c, alice, lambda: truth(truth_store, "alice"), CONVERGE_TIMEOUT_S)


async def test_redis_restart_and_wipe(redis: RedisServer, tmp_path: Path) -> None:
    """AOF (appendfsync always) restart: no seq reused. Wiped: UNAVAILABLE until
    ``store init --force``; then clients with old tokens get a full snapshot."""
    url = store_url(redis)
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(run_node(url, tmp_path, n)) for n in "ab"]
        svc_a = await stack.enter_async_context(connect(a, "backend", "service"))
        await svc_a.request("add_members", conversation_id="c", user_ids=["alice"])
        last = 0
        for _ in range(10):
            last = (await svc_a.request("allocate_sequences", conversation_id="c",
                                        count=2)).allocated.last_sequence
        alice = Cache()
        async with connect(b, "alice") as on_b:
            await alice.sync(on_b)
        redis.kill()  # SIGKILL: only fsync'd AOF survives
        redis.start()
        got = await service_op(svc_a, "allocate_sequences", retry=True, conversation_id="c",
                               count=1)
        assert got.allocated.first_sequence == last + 1  # I1: nothing reused
        # wiped: the nodes refuse instead of starting again from 1
        redis.wipe()
        redis.start()
        with trio.fail_after(10):
            while True:
                r = await svc_a.request("allocate_sequences", conversation_id="c", count=1)
                assert body(r) == "error", f"allocation on an empty Redis must fail: {r}"
                if r.error.code == pb.Error.UNAVAILABLE:
                    break
                await trio.sleep(0.05)
        out = await trio.to_thread.run_sync(store_init, url, True)
        assert "created new epoch" in out
        await service_op(svc_a, "add_members", retry=True, conversation_id="c",
                         user_ids=["alice"])
        r = await service_op(svc_a, "allocate_sequences", retry=True, conversation_id="c",
                             count=1)
        assert r.allocated.first_sequence == 1  # the operator chose a new epoch
        async with connect(b, "alice") as on_b:
            reply = await on_b.request("get_sequences", since=alice.token)
            assert reply.update.full, "a token of the old epoch must get a full snapshot"


async def test_redis_cut_while_traffic_flows(redis: RedisServer, tmp_path: Path) -> None:
    """Redis stopped for a few seconds and restarted (AOF) under traffic: every online client
    converges to the store's state by pushes alone (the nodes resync after a StoreReset)."""
    url = store_url(redis)
    users = ["u0", "u1", "u2", "u3"]
    convs = [f"c{i}" for i in range(3)]
    truth_store = RedisStore(url)
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(run_node(url, tmp_path, n)) for n in "ab"]
        await truth_store.open()
        stack.push_async_callback(truth_store.aclose)
        svc = await stack.enter_async_context(connect(a, "backend", "service"))
        for cid in convs:
            await svc.request("add_members", conversation_id=cid, user_ids=users)
        clients = []
        for i, u in enumerate(users):
            cl = await stack.enter_async_context(connect((a, b)[i % 2], u))
            cache = Cache()
            await cache.sync(cl)
            assert body(await cl.request("subscribe", all=True)) == "ack"
            clients.append((u, cl, cache))
        rng = random.Random(3)
        stop = trio.Event()

        async def traffic() -> None:
            while not stop.is_set():
                await service_op(svc, "allocate_sequences", retry=True,
                                 conversation_id=rng.choice(convs), count=1,
                                 sender_user_id=rng.choice(users))
                await trio.sleep(0.005)

        async def reader(cl: RawClient, cache: Cache) -> None:
            while not stop.is_set():
                with trio.move_on_after(0.2):
                    msg = await cl.next_push(timeout=1e9)
                    if body(msg) == "update":
                        cache.apply(msg)

        async with trio.open_nursery() as n:
            n.start_soon(traffic)
            for _, cl, cache in clients:
                n.start_soon(reader, cl, cache)
            await trio.sleep(0.5)
            await trio.to_thread.run_sync(redis.stop)
            await trio.sleep(2.0)
            await trio.to_thread.run_sync(redis.start)
            await trio.sleep(1.5)
            stop.set()
        for u, cl, cache in clients:
            await push_until(cl, cache, lambda u=u: truth(truth_store, u), CONVERGE_TIMEOUT_S)


def test_store_init_cli_on_embedded_store(tmp_path: Path) -> None:
    """``store init`` creates a SQLite store's epoch; ``--force`` rotates it there too (the
    full scenario with a server is tests/test_cli_store.py)."""
    url = f"sqlite:///{tmp_path}/s.db"
    created = store_init(url, False)
    assert created.startswith("created new epoch ")
    epoch = created.split()[3]
    assert store_init(url, False).strip() == f"epoch already set {epoch}"
    rotated = store_init(url, True)
    assert rotated.startswith("created new epoch ") and epoch not in rotated
    assert os.path.exists(tmp_path / "s.db")
