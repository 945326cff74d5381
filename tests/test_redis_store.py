"""The Redis store beyond the shared suite (tests/test_store.py runs that on Redis and on a local
3-master Redis Cluster): several stores on one state, lost subscriptions, lost data, AOF
restarts, the cluster's key layout."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import trio

from seqactor.store import open_store
from seqactor.store._base import (
    Allocated,
    Change,
    InvalidArgument,
    MembersAdded,
    ReadMarked,
    StoreReset,
    TooLarge,
    Unavailable,
)
from seqactor.store._redis_keys import hash_slot
from seqactor.store.redis import RedisStore, init_store, parse_url
from tests._redis import (
    RedisCluster,
    RedisServer,
    cli,
    redis_url,
    shared_cluster,
    shared_redis,
    unique_prefix,
)

# ------------------------------------------------------------------ helpers


async def opened(url: str, **kw: Any) -> RedisStore:
    s = RedisStore(url, **kw)
    await s.open()
    return s


async def wait_for(pred: Any, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.01)


# ------------------------------------------------------------------ URLs and layout


def test_parse_url() -> None:
    cfg = parse_url("redis://:pw@h:7000/3?prefix=app")
    assert cfg["nodes"] == [("h", 7000)] and cfg["db"] == 3 and cfg["prefix"] == "app"
    assert cfg["password"] == "pw" and cfg["username"] is None
    cfg = parse_url("redis+cluster://a:1,b:2")
    assert cfg["cluster"] and cfg["nodes"] == [("a", 1), ("b", 2)]
    assert cfg["prefix"] == "sa"
    for bad in ["redis://h:x/0", "redis://a:1,b:2/0", "redis://h:1/0?prefix={x}",
                "redis+cluster://a:1/2", "rediss://h:1"]:
        with pytest.raises(InvalidArgument):
            parse_url(bad)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    assert isinstance(open_store("redis+cluster://127.0.0.1:1"), RedisStore)


def test_cluster_keys_of_one_step_share_a_slot() -> None:
    s = RedisStore("redis+cluster://127.0.0.1:1?prefix=p")
    for cid in ["c", "a{b}c", "}{", "{", "é", "x" * 128]:
        ck = s.keys.conv_key(cid)
        slots = {hash_slot(k.encode()) for k in (ck, s.keys.members_key(cid), s.keys.slot_epoch_key(ck))}
        assert len(slots) == 1, cid
    for uid in ["u", "{u}", "}"]:
        vk = s.keys.view_key(uid)
        keys = (vk, s.keys.tomb_key(uid), s.keys.horizon_key(uid), s.keys.slot_epoch_key(vk))
        assert len({hash_slot(k.encode()) for k in keys}) == 1
    assert len({hash_slot(k.encode()) for k in s.keys.all_slot_epoch_keys()}) == 16384


# ------------------------------------------------------------------ several stores, one state


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
async def test_changes_reach_every_store_in_order(cluster: bool) -> None:
    """Writes through three stores (nodes) reach every store's listeners in position order,
    each once; epoch and positions are shared."""
    url = redis_url(unique_prefix(), cluster=cluster)
    stores = [await opened(url) for _ in range(3)]
    seen: list[list[Change]] = [[] for _ in stores]
    for s, log_ in zip(stores, seen, strict=True):
        s.add_listener(log_.append)
    try:
        assert len({s.epoch for s in stores}) == 1
        await stores[0].add_members("c", ["u", "v"])

        async def writer(i: int) -> None:
            rng = random.Random(i)
            for _ in range(15):
                s = stores[rng.randrange(3)]
                cid = rng.choice(["c", "d", "e"])
                if rng.random() < 0.7:
                    await s.allocate(cid, rng.randint(1, 3), sender_user_id="u")
                else:
                    await s.add_members(cid, [f"w{rng.randrange(4)}"])

        async with trio.open_nursery() as n:
            for i in range(6):
                n.start_soon(writer, i)
        last = max(s.position for s in stores)
        await wait_for(lambda: all(s.position >= last for s in stores))
        changes = [c for c in seen[0] if not isinstance(c, StoreReset)]
        assert [c.position for c in changes] == sorted({c.position for c in changes})
        for other in seen[1:]:
            assert other == seen[0]
        # seqs of each conversation: contiguous across stores
        for cid in ["c", "d", "e"]:
            allocs = sorted((c.first, c.last) for c in changes
                            if isinstance(c, Allocated) and c.conversation_id == cid)
            expected = 1
            for first, lst in allocs:
                assert first == expected
                expected = lst + 1
            st = await stores[1].conversation(cid)
            assert st is None or st.max_sequence == expected - 1
        v = [await s.load_view("u") for s in stores]
        assert v[0].conversation_ids == v[1].conversation_ids == v[2].conversation_ids
        assert list(v[0].max_seq) == list(v[2].max_seq)
    finally:
        for s in stores:
            await s.aclose()


async def test_lost_subscription_publishes_store_reset() -> None:
    """Killing the node's Pub/Sub connection: it resubscribes and publishes StoreReset."""
    url = redis_url(unique_prefix())
    a, b = await opened(url), await opened(url)
    seen: list[Change] = []
    b.add_listener(seen.append)
    try:
        await a.allocate("c", 1)
        await wait_for(lambda: b.position == 1)
        port = parse_url(url)["nodes"][0][1]
        cli(port, "CLIENT", "KILL", "TYPE", "pubsub")  # every subscriber, both stores
        await a.allocate("c", 1)  # may be missed by b's subscription
        await wait_for(lambda: any(isinstance(c, StoreReset) for c in seen))
        await a.allocate("c", 1)
        await wait_for(lambda: b.position >= 3)
        assert isinstance(seen[-1], Allocated) and seen[-1].last == 3
        assert (await b.conversation("c")).max_sequence == 3  # type: ignore[union-attr]
    finally:
        await a.aclose()
        await b.aclose()



async def test_a_broken_key_fails_its_own_op_not_the_batch() -> None:
    """Ops batched together, two of them on a key of the wrong type (a hand-edited Redis): each
    fails alone and whole with the Redis error (nothing of it written, no seq lost, no
    position taken); the others commit and reach the listeners at once, with no hole to
    wait out."""
    s = await opened(redis_url(unique_prefix()), gap_timeout_s=60.0)
    seen: list[Change] = []
    s.add_listener(seen.append)
    port = shared_redis().port
    try:
        await s.allocate("good", 1)
        await s.add_members("half", ["u"])
        cli(port, "SET", s.keys.conv_key("bad"), "not a hash")
        cli(port, "DEL", s.keys.members_key("half"))
        cli(port, "SET", s.keys.members_key("half"), "not a hash")  # the sender's row
        start = s.position
        results: dict[str, Allocated | Unavailable] = {}

        async def alloc(cid: str, sender: str | None = None) -> None:
            try:
                results[cid] = await s.allocate(cid, 1, sender_user_id=sender)
            except Unavailable as exc:
                results[cid] = exc

        with trio.fail_after(5):  # far below the gap timeout: nothing waits for a hole
            async with trio.open_nursery() as n:  # started together: one batch
                for cid, sender in [("good", None), ("bad", None), ("half", "u"), ("g2", None)]:
                    n.start_soon(alloc, cid, sender)
            good, g2 = results["good"], results["g2"]
            assert isinstance(good, Allocated) and isinstance(g2, Allocated)
            assert (good.first, g2.first) == (2, 1)
            for cid in ("bad", "half"):
                assert isinstance(results[cid], Unavailable)
                assert "WRONGTYPE" in str(results[cid]), results[cid]
            # (the batch runs its ops in whatever order the tasks queued them)
            assert {good.position, g2.position} == {start + 1, start + 2}
            after = await s.allocate("good", 1)
            assert after.first == 3 and after.position == start + 3
            half = await s.conversation("half")  # its max was not raised: no seq skipped
            assert half is not None and half.max_sequence == 0
            await wait_for(lambda: s.position >= after.position)
        got = [c for c in seen if getattr(c, "position", 0) > start]
        assert [c.position for c in got] == sorted(c.position for c in got)
        assert [c.position for c in got] == sorted([good.position, g2.position, after.position])
        assert all(isinstance(c, Allocated) for c in got)
    finally:
        await s.aclose()


# ------------------------------------------------------------------ durability and data loss


async def test_aof_restart_reuses_no_seq(tmp_path: Path) -> None:
    """Redis restarted (SIGKILL) with appendfsync always: allocation continues after the last
    acknowledged seq; the store reconnects by itself."""
    srv = RedisServer(data_dir=tmp_path / "r", appendfsync="always").start()
    try:
        s = await opened(srv.url)
        seen: list[Change] = []
        s.add_listener(seen.append)
        try:
            last = 0
            for _ in range(20):
                last = (await s.allocate("c", 3)).last
            epoch = s.epoch
            srv.kill()
            srv.start()
            await wait_for(lambda: any(isinstance(c, StoreReset) for c in seen))
            a = None
            with trio.fail_after(10):
                while a is None:
                    try:
                        a = await s.allocate("c", 1)
                    except Unavailable:
                        await trio.sleep(0.05)
            assert a.first == last + 1 and s.epoch == epoch
        finally:
            await s.aclose()
    finally:
        srv.cleanup()


async def test_wiped_redis_refuses_until_init_force(tmp_path: Path) -> None:
    srv = RedisServer(data_dir=tmp_path / "r").start()
    try:
        s = await opened(srv.url)
        seen: list[Change] = []
        s.add_listener(seen.append)
        try:
            await s.add_members("c", ["u"])
            await s.allocate("c", 5)
            old_epoch, old_pos = s.epoch, s.position
            cli(srv.port, "FLUSHALL")
            for _ in range(2):
                with pytest.raises(Unavailable):
                    await s.allocate("c", 1)
            assert s.data_lost
            assert await init_store(srv.url, force=False) != (old_epoch, False)  # creates
            epoch, created = await init_store(srv.url, force=True)
            assert created and epoch != old_epoch
            await wait_for(lambda: s.epoch == epoch and not s.data_lost)
            a = await s.allocate("c", 1)
            assert a.first == 1 and a.position > old_pos  # positions never go back
            assert any(isinstance(c, StoreReset) for c in seen)
            again, created = await init_store(srv.url, force=False)
            assert (again, created) == (epoch, False)
        finally:
            await s.aclose()
    finally:
        srv.cleanup()


async def test_restart_empty_is_detected_without_writes(tmp_path: Path) -> None:
    """Redis restarted with an empty data dir: the node notices on reconnect (no write
    needed), refuses writes, and accepts them after init --force."""
    srv = RedisServer(data_dir=tmp_path / "r").start()
    try:
        s = await opened(srv.url)
        try:
            await s.allocate("c", 2)
            srv.wipe()
            srv.start()
            await wait_for(lambda: s.data_lost)
            with pytest.raises(Unavailable):
                await s.allocate("c", 1)
            epoch, _ = await init_store(srv.url, force=True)
            await wait_for(lambda: s.epoch == epoch and not s.data_lost)
            assert (await s.allocate("c", 1)).first == 1
        finally:
            await s.aclose()
    finally:
        srv.cleanup()


async def test_cluster_init_force_reaches_every_slot() -> None:
    url = redis_url(unique_prefix(), cluster=True)
    s = await opened(url)
    try:
        convs = [f"c{i}" for i in range(20)]  # spread over the three masters
        for cid in convs:
            await s.add_members(cid, ["u"])
        epoch, created = await init_store(url, force=True)
        assert created
        await wait_for(lambda: s.epoch == epoch)
        for cid in convs:
            a = await s.allocate(cid, 1)
            assert a.first == 1
        assert len((await s.load_view("u")).conversation_ids) == 20
    finally:
        await s.aclose()


async def test_cluster_two_nodes_one_hot_conversation() -> None:
    """Two nodes racing on one conversation: stale positions retry; seqs stay contiguous and
    every node delivers the same changes in the same order."""
    url = redis_url(unique_prefix(), cluster=True)
    a, b = await opened(url), await opened(url)
    seen_a: list[Change] = []
    seen_b: list[Change] = []
    a.add_listener(seen_a.append)
    b.add_listener(seen_b.append)
    try:
        await a.add_members("hot", ["u"])
        got: list[tuple[int, int]] = []

        async def worker(s: RedisStore) -> None:
            for _ in range(25):
                r = await s.allocate("hot", 2, sender_user_id="u")
                got.append((r.first, r.last))

        async with trio.open_nursery() as n:
            for s in (a, b, a, b):
                n.start_soon(worker, s)
        got.sort()
        assert [f for f, _ in got] == list(range(1, 201, 2))
        await wait_for(lambda: a.position == b.position)
        assert seen_a == seen_b
        maxes = [c.last for c in seen_a if isinstance(c, Allocated)]
        assert maxes == sorted(maxes)  # position order = commit order of the conversation
        assert isinstance(seen_a[0], MembersAdded)
    finally:
        await a.aclose()
        await b.aclose()


def test_cluster_fixture_is_three_masters() -> None:
    cl = shared_cluster()
    out = cli(cl.nodes[0].port, "CLUSTER", "NODES")
    assert sum(1 for line in out.splitlines() if "master" in line) == 3


# ------------------------------------------------------------------ the whole uint64 range

U64_MAX = 2**64 - 1


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
async def test_sequences_exact_up_to_uint64_max(cluster: bool) -> None:
    """Seqs above 2^53 (where Lua numbers stop being exact) allocate, read, clamp, set min and
    freeze exactly, on this node and on another one, up to 2^64 - 1; one more is TooLarge."""
    url = redis_url(unique_prefix(), cluster=cluster)
    a, b = await opened(url), await opened(url)
    seen: list[Change] = []
    b.add_listener(seen.append)
    try:
        await a.add_members("big", ["u", "v", "w"])
        port = parse_url(url)["nodes"][0][1]
        # move the conversation near the end of the range (its hash in the store's layout)
        cli(port, "-c", "HSET", a.keys.conv_key("big"), "mx", str(U64_MAX - 4))
        got = await a.allocate("big", 1, sender_user_id="u")
        assert (got.first, got.last, got.sender_read) == (U64_MAX - 3, U64_MAX - 3, U64_MAX - 3)
        got = await a.allocate("big", 1)
        assert (got.first, got.last) == (U64_MAX - 2, U64_MAX - 2)
        got = await a.allocate("big", 1)
        assert got.last == U64_MAX - 1 == 2**64 - 2
        read = await a.mark_read("big", "v", U64_MAX)  # clamped to max
        assert (read.read_sequence, read.changed) == (U64_MAX - 1, True)
        same = await a.mark_read("big", "v", U64_MAX - 1)
        assert (same.read_sequence, same.changed) == (U64_MAX - 1, False)
        low = await a.mark_read("big", "w", 2**53 + 1)  # exact just above doubles' range
        assert low.read_sequence == 2**53 + 1
        mn = await a.set_min_sequence("big", U64_MAX - 3)
        assert (mn.min_sequence, mn.changed) == (U64_MAX - 3, True)
        await a.remove_members("big", ["w"], keep_history=True)
        view = await b.load_view("v")
        assert (view.max_seq[0], view.read_seq[0], view.min_seq[0]) == (
            U64_MAX - 1, U64_MAX - 1, U64_MAX - 3)
        frozen = await b.load_view("w")
        assert (frozen.max_seq[0], frozen.read_seq[0], frozen.frozen[0]) == (
            U64_MAX - 1, 2**53 + 1, 1)
        last = await a.allocate("big", 1)
        assert last.last == U64_MAX
        with pytest.raises(TooLarge):
            await a.allocate("big", 1)
        st = await b.conversation("big")
        assert st is not None and (st.max_sequence, st.min_sequence) == (U64_MAX, U64_MAX - 3)
        await wait_for(lambda: b.position == a.position)
        allocs = [c for c in seen if isinstance(c, Allocated)]
        assert [c.last for c in allocs] == [U64_MAX - 3, U64_MAX - 2, U64_MAX - 1, U64_MAX]
        assert [c.read_sequence for c in seen if isinstance(c, ReadMarked)] == [
            U64_MAX - 1, 2**53 + 1]
    finally:
        await a.aclose()
        await b.aclose()


def _slot_owners(port: int) -> dict[int, str]:
    """slot -> node id of its master (``CLUSTER SLOTS``)."""
    out: dict[int, str] = {}
    lines = cli(port, "CLUSTER", "NODES").splitlines()
    for line in lines:
        parts = line.split()
        if "master" not in parts[2]:
            continue
        for r in parts[8:]:
            if r.startswith("["):
                continue
            lo, _, hi = r.partition("-")
            for slot in range(int(lo), int(hi or lo) + 1):
                out[slot] = parts[0]
    return out


async def test_cluster_allocations_follow_a_resharded_slot() -> None:
    """A slot moves to another master (``redis-cli --cluster reshard``) after the node learned
    the slot map: its next allocation there still succeeds, contiguous with the ones before,
    and the other nodes see the same seqs."""
    cl = RedisCluster().start()
    try:
        port = cl.nodes[0].port
        url = f"{cl.url}?prefix={unique_prefix()}"
        a, b = await opened(url), await opened(url)
        try:
            before = _slot_owners(port)
            src = before[0]
            # a conversation in the slot about to move (the source's first slot)
            cid = next(f"c{i}" for i in range(100_000) if hash_slot(f"c{i}".encode()) == 0)
            assert (await a.allocate(cid, 3)).last == 3  # the node knows where slot 0 is
            dst = next(n for n in set(before.values()) if n != src)
            cli(port, "--cluster", "reshard", f"127.0.0.1:{port}", "--cluster-from", src,
                "--cluster-to", dst, "--cluster-slots", "1", "--cluster-yes")
            assert _slot_owners(port)[0] == dst
            got = await a.allocate(cid, 2)
            assert (got.first, got.last) == (4, 5)
            assert (await b.allocate(cid, 1)).first == 6
            await wait_for(lambda: a.position == b.position)
            st = await b.conversation(cid)
            assert st is not None and st.max_sequence == 6
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        cl.cleanup()


async def test_silent_server_is_noticed_by_the_keepalive() -> None:
    """The Pub/Sub connection stalls (no byte gets through, no error either): the keep-alive
    gives up on it, the node resubscribes once Redis answers again and publishes StoreReset;
    a change made meanwhile through another node is then in its listeners' view."""
    from seqactor.store._redis_sub import KEEPALIVE_TIMEOUT_S
    from tests._proxy import Proxy

    direct = redis_url(unique_prefix())
    port = parse_url(direct)["nodes"][0][1]
    async with trio.open_nursery() as nursery:
        proxy = Proxy(port)
        await nursery.start(proxy.serve)
        via_proxy = direct.replace(f":{port}/", f":{proxy.port}/")
        a, b = await opened(via_proxy), await opened(direct)
        seen: list[Change] = []
        a.add_listener(seen.append)
        try:
            await b.allocate("c", 1)
            await wait_for(lambda: a.position == b.position)
            accepted = proxy.accepted
            proxy.pause()
            stalled_at = trio.current_time()
            await b.allocate("c", 1)  # its event is held in the stalled connection
            # the keep-alive gives up on the silent connection: the node connects again
            await wait_for(lambda: proxy.accepted > accepted, timeout=KEEPALIVE_TIMEOUT_S + 10)
            proxy.resume()
            await wait_for(lambda: any(isinstance(c, StoreReset) for c in seen))
            assert trio.current_time() - stalled_at > KEEPALIVE_TIMEOUT_S
            await wait_for(lambda: a.position >= b.position)
            st = await a.conversation("c")
            assert st is not None and st.max_sequence == 2
        finally:
            await a.aclose()
            await b.aclose()
            nursery.cancel_scope.cancel()


async def test_cluster_wait_replicas_acknowledges_only_replicated_writes() -> None:
    """``?wait_replicas=1`` on a cluster: with a replica per master, allocations, MarkReads
    and membership changes are acknowledged; on the shared cluster without replicas they are
    refused (Unavailable, naming the replicas) — and, committed anyway (a membership change
    with its user-slot steps), they still reach the other nodes."""
    cl = RedisCluster(masters=3, replicas=1).start()
    try:
        url = f"{cl.url}?prefix={unique_prefix()}&wait_replicas=1&wait_timeout_ms=2000"
        s = await opened(url)
        try:
            added = await s.add_members("c", ["u", "v", "w"])
            assert added.user_ids == ("u", "v", "w")
            for cid in ["c", "d", "e", "f"]:
                assert (await s.allocate(cid, 2)).last == 2
            assert (await s.mark_read("c", "u", 2)).read_sequence == 2
            assert (await s.remove_members("c", ["v"], keep_history=False)).user_ids == ("v",)
            assert (await s.remove_members("c", ["w"], keep_history=True)).user_ids == ("w",)
            assert await s.removed_since("v", 0) == ["c"]
        finally:
            await s.aclose()
    finally:
        cl.cleanup()
    lonely = redis_url(unique_prefix(), cluster=True)
    a = await opened(lonely + "&wait_replicas=1&wait_timeout_ms=100")
    b = await opened(lonely)
    try:
        with pytest.raises(Unavailable, match="replicas"):
            await a.allocate("c", 1)
        await wait_for(lambda: b.position == 1)  # committed and published all the same
        st = await b.conversation("c")
        assert st is not None and st.max_sequence == 1
        # membership changes too. Steps in the users' slots come first: one not replicated
        # refuses the change before it commits (its position is skipped, the steps undone)
        with pytest.raises(Unavailable, match="replicas"):
            await a.add_members("c", ["u", "v"])
        await wait_for(lambda: b.position == 2)
        assert not await b.view_contains("u", "c")
        assert (await b.load_view("u")).conversation_ids == []
        await b.add_members("c", ["u", "v"])
        # with none: the commit is refused, yet committed and published
        with pytest.raises(Unavailable, match="replicas"):
            await a.remove_members("c", ["v"], keep_history=True)
        await wait_for(lambda: a.position == 4)
        assert list((await a.load_view("v")).frozen) == [1]
    finally:
        await a.aclose()
        await b.aclose()
