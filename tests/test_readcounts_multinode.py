"""Group read counts on two seqactor nodes sharing Redis (standalone and Cluster): each node
answers from its own index kept by the change stream, and a MarkRead acknowledged on node A is
counted by node B's next reply (docs/protocol.md, "Group read counts": consistency)."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from tests._harness import body
from tests._redis import redis_url, require_redis, unique_prefix
from tests.test_multinode import connect, run_node

USERS = [f"m{i:02d}" for i in range(30)]


@pytest.mark.parametrize("cluster", [False, True], ids=["redis", "redis-cluster"])
async def test_two_nodes_agree_and_count_acked_reads(cluster: bool, tmp_path: Path) -> None:
    require_redis()
    url = redis_url(unique_prefix(), cluster=cluster)
    rng = random.Random(13)
    async with AsyncExitStack() as stack:
        a, b = [await stack.enter_async_context(run_node(url, tmp_path, n)) for n in "ab"]
        svc_a = await stack.enter_async_context(connect(a, "backend", "service"))
        svc_b = await stack.enter_async_context(connect(b, "backend", "service"))
        assert body(await svc_a.request("add_members", conversation_id="g", user_ids=USERS)) == "ack"
        assert body(await svc_a.request("allocate_sequences", conversation_id="g", count=20)) == "allocated"
        # node B loads its index now; from here on it follows the change stream
        r = await svc_b.request("get_read_counts", conversation_id="g")
        assert list(r.read_counts.counts) == [0] * 20  # joined at max 0, nothing read yet
        watcher = await stack.enter_async_context(connect(b, USERS[0]))
        assert body(await watcher.request("watch_read_counts", conversation_id="g")) == "ack"
        await watcher.next_push()
        reads = dict.fromkeys(USERS, 0)
        mx = 20
        for step in range(40):
            k = rng.random()
            if k < 0.3:
                sender = rng.choice(USERS)
                r = await svc_a.request("allocate_sequences", conversation_id="g", count=2,
                                        sender_user_id=sender)
                mx = r.allocated.last_sequence
                reads[sender] = mx
            elif k < 0.4:
                joiner = f"late{step}"
                await svc_a.request("add_members", conversation_id="g", user_ids=[joiner])
                reads[joiner] = mx
            else:
                user = rng.choice(USERS)
                target = rng.randint(1, mx)
                async with connect(a, user) as c:
                    r = await c.request("mark_read", conversation_id="g", read_sequence=target)
                    assert body(r) == "ack"
                reads[user] = max(reads[user], target)
            want = [sum(1 for v in reads.values() if v >= s) for s in range(1, mx + 1)]
            # the very next request on node B counts what node A acknowledged
            got_b = await svc_b.request("get_read_counts", conversation_id="g")
            got_a = await svc_a.request("get_read_counts", conversation_id="g")
            assert list(got_b.read_counts.counts) == want, step
            assert got_a.read_counts == got_b.read_counts
            assert got_b.read_counts.member_count == len(reads)
            unread = sorted(u for u, v in reads.items() if v < mx)
            r = await svc_b.request("get_readers", conversation_id="g", sequence=mx, unread=True,
                                    limit=1000)
            assert list(r.readers.user_ids) == unread
        # the watch on node B converges to the same counts
        final = [sum(1 for v in reads.values() if v >= s) for s in range(1, mx + 1)]
        while True:
            push = await watcher.next_push()
            if list(push.read_counts.counts) == final:
                break
