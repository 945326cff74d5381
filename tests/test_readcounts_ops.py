"""Group read counts over the wire (docs/protocol.md "Group read counts"): GetReadCounts,
GetReaders, WatchReadCounts and every error path, as a client sees them."""

from __future__ import annotations

import trio

from seqactor._proto import seqactor_pb2 as pb
from tests._harness import body, raw_connect, running_server

Code = pb.Error.Code


async def _setup(server, conv: str, members: list[str], allocs: int = 0) -> None:
    async with raw_connect(server, "backend", role="service") as svc:
        assert body(await svc.request("add_members", conversation_id=conv, user_ids=members)) == "ack"
        if allocs:
            r = await svc.request("allocate_sequences", conversation_id=conv, count=allocs)
            assert body(r) == "allocated"


def _counts(msg: pb.ServerMessage) -> tuple[int, int, list[int]]:
    assert body(msg) == "read_counts", msg
    rc = msg.read_counts
    return rc.from_sequence, rc.member_count, list(rc.counts)


async def test_read_counts_defaults_clamping_and_senders():
    async with running_server() as server:
        await _setup(server, "g", ["alice", "bob", "carol"], allocs=0)
        async with raw_connect(server, "backend", role="service") as svc:
            # alice sends 5 messages: I6 makes her a reader of each
            r = await svc.request("allocate_sequences", conversation_id="g", count=5,
                                  sender_user_id="alice")
            assert r.allocated.last_sequence == 5
        async with raw_connect(server, "bob") as bob:
            r = await bob.request("mark_read", conversation_id="g", read_sequence=3)
            assert r.ack.read_sequence == 3
            r = await bob.request("get_read_counts", conversation_id="g")
            assert _counts(r) == (1, 3, [2, 2, 2, 1, 1])
            assert _counts(await bob.request("get_read_counts", conversation_id="g", from_sequence=3,
                                             to_sequence=4)) == (3, 3, [2, 1])
            # clamped to [1, max]
            assert _counts(await bob.request("get_read_counts", conversation_id="g", from_sequence=4,
                                             to_sequence=99)) == (4, 3, [1, 1])
            # an empty range: no counts, the clamped from
            r = await bob.request("get_read_counts", conversation_id="g", from_sequence=9)
            assert _counts(r) == (9, 3, [])
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("set_min_sequence", conversation_id="g", min_sequence=4)
            assert _counts(await svc.request("get_read_counts", conversation_id="g")) == (4, 3, [1, 1])
            # frozen and removed members leave the counts
            await svc.request("remove_members", conversation_id="g", user_ids=["alice"], keep_history=True)
            assert _counts(await svc.request("get_read_counts", conversation_id="g")) == (4, 2, [0, 0])
            await svc.request("add_members", conversation_id="g", user_ids=["dave"])
            assert _counts(await svc.request("get_read_counts", conversation_id="g")) == (4, 3, [1, 1])


async def test_read_counts_range_limit_is_too_large():
    async with running_server(max_read_count_range=10) as server:
        await _setup(server, "g", ["alice"], allocs=20)
        async with raw_connect(server, "alice") as c:
            r = await c.request("get_read_counts", conversation_id="g")
            assert r.error.code == Code.TOO_LARGE
            r = await c.request("get_read_counts", conversation_id="g", from_sequence=11)
            assert _counts(r) == (11, 1, [0] * 10)


async def test_non_member_frozen_and_unknown_look_alike_for_users():
    async with running_server() as server:
        await _setup(server, "g", ["alice", "bob"], allocs=2)
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("remove_members", conversation_id="g", user_ids=["bob"], keep_history=True)
        replies = []
        for user, conv in [("mallory", "g"), ("mallory", "nope"), ("bob", "g")]:
            async with raw_connect(server, user) as c:
                for kind, extra in [("get_read_counts", {}), ("get_readers", {"sequence": 1}),
                                    ("watch_read_counts", {})]:
                    r = await c.request(kind, conversation_id=conv, **extra)
                    replies.append((r.error.code, r.error.message))
        assert all(code == Code.FORBIDDEN for code, _ in replies)
        assert len({msg for _, msg in replies}) == 1  # I4: one reply for all
        async with raw_connect(server, "backend", role="service") as svc:
            r = await svc.request("get_read_counts", conversation_id="nope")
            assert r.error.code == Code.NOT_FOUND
            r = await svc.request("get_readers", conversation_id="nope", sequence=1)
            assert r.error.code == Code.NOT_FOUND
            r = await svc.request("get_read_counts", conversation_id="")
            assert r.error.code == Code.BAD_REQUEST
            r = await svc.request("get_read_counts", conversation_id="x" * 200)
            assert r.error.code == Code.BAD_REQUEST
            # the session survives bad input
            assert body(await svc.request("ping", client_time_ms=1)) == "pong"


async def test_readers_paged_by_user_id_bytewise():
    async with running_server() as server:
        users = ["zed", "amy", "Émile", "bob", "Zoe", "carl", "dan", "eve"]
        await _setup(server, "g", users, allocs=0)
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("allocate_sequences", conversation_id="g", count=4)
        for u in ["amy", "carl", "Émile", "zed"]:
            async with raw_connect(server, u) as c:
                await c.request("mark_read", conversation_id="g", read_sequence=3)
        readers = sorted(["amy", "carl", "Émile", "zed"], key=lambda s: s.encode())
        unread = sorted(["bob", "Zoe", "dan", "eve"], key=lambda s: s.encode())
        async with raw_connect(server, "amy") as c:
            for unread_flag, want in [(False, readers), (True, unread)]:
                got: list[str] = []
                after = ""
                while True:
                    r = await c.request("get_readers", conversation_id="g", sequence=2, unread=unread_flag,
                                        limit=3, after_user_id=after)
                    assert body(r) == "readers"
                    got += list(r.readers.user_ids)
                    after = r.readers.next_after_user_id
                    if not after:
                        break
                    assert after == got[-1]
                assert got == want
            r = await c.request("get_readers", conversation_id="g", sequence=2)  # limit 0 = 100
            assert list(r.readers.user_ids) == readers and r.readers.next_after_user_id == ""
            r = await c.request("get_readers", conversation_id="g", sequence=1, limit=1001)
            assert r.error.code == Code.TOO_LARGE
            r = await c.request("get_readers", conversation_id="g", sequence=0, limit=2, unread=True)
            assert list(r.readers.user_ids) == [] and r.readers.next_after_user_id == ""


async def test_watch_pushes_on_change_only_and_coalesces():
    # a long interval: changes inside it coalesce into one push, sent when it ends
    async with running_server(read_counts_interval_ms=300) as server:
        await _setup(server, "g", ["alice", "bob", "carol"], allocs=3)
        async with raw_connect(server, "alice") as w, raw_connect(server, "bob") as bob, \
                raw_connect(server, "carol") as carol:
            r = await w.request("watch_read_counts", conversation_id="g")
            assert body(r) == "ack"
            assert _counts(await w.next_push()) == (1, 3, [0, 0, 0])  # the current counts
            await w.no_push(0.5)  # nothing changed: nothing pushed
            await bob.request("mark_read", conversation_id="g", read_sequence=2)
            await carol.request("mark_read", conversation_id="g", read_sequence=3)
            await bob.request("mark_read", conversation_id="g", read_sequence=3)
            got = _counts(await w.next_push())
            if got != (1, 3, [2, 2, 2]):  # the first change may open a new interval alone
                got = _counts(await w.next_push())
            assert got == (1, 3, [2, 2, 2])
            await w.no_push(0.5)
            # a MarkRead that changes nothing pushes nothing
            await bob.request("mark_read", conversation_id="g", read_sequence=1)
            await w.no_push(0.5)
            r = await w.request("watch_read_counts", conversation_id="g", stop=True)
            assert body(r) == "ack"
            await carol.request("mark_read", conversation_id="g", read_sequence=3)
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("allocate_sequences", conversation_id="g", count=1)
            await w.no_push(0.5)


async def test_watch_limit_and_end_on_leaving():
    async with running_server(max_read_count_watches=2) as server:
        for g in ("g1", "g2", "g3"):
            await _setup(server, g, ["alice", "bob"], allocs=1)
        async with raw_connect(server, "alice") as c:
            for g in ("g1", "g2"):
                assert body(await c.request("watch_read_counts", conversation_id=g)) == "ack"
                await c.next_push()
            r = await c.request("watch_read_counts", conversation_id="g3")
            assert r.error.code == Code.TOO_LARGE
            # re-watching one already watched is not a new watch
            assert body(await c.request("watch_read_counts", conversation_id="g2", from_sequence=1)) == "ack"
            await c.next_push()
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("remove_members", conversation_id="g1", user_ids=["alice"])
            # the g1 watch ended with alice leaving: a new watch fits
            with trio.fail_after(5):
                while True:
                    r = await c.request("watch_read_counts", conversation_id="g3")
                    if body(r) == "ack":
                        break
            assert _counts(await c.next_push())[1] == 2
            async with raw_connect(server, "bob") as bob:
                await bob.request("mark_read", conversation_id="g1", read_sequence=1)
            await c.no_push(0.4)


async def test_extreme_arguments_get_clear_replies_and_the_session_stays():
    u64 = (1 << 64) - 1
    async with running_server() as server:
        await _setup(server, "g", ["alice", "bob"], allocs=3)
        async with raw_connect(server, "alice") as c:
            r = await c.request("get_read_counts", conversation_id="g", from_sequence=u64, to_sequence=u64)
            assert _counts(r) == (u64, 2, [])
            r = await c.request("get_read_counts", conversation_id="g", from_sequence=3, to_sequence=1)
            assert _counts(r) == (3, 2, [])
            r = await c.request("get_readers", conversation_id="g", sequence=u64)
            assert list(r.readers.user_ids) == []
            r = await c.request("get_readers", conversation_id="g", sequence=u64, unread=True)
            assert list(r.readers.user_ids) == ["alice", "bob"]
            r = await c.request("get_readers", conversation_id="g", sequence=1, limit=2**32 - 1)
            assert r.error.code == Code.TOO_LARGE
            r = await c.request("get_readers", conversation_id="g", sequence=1, after_user_id="\uffff" * 40)
            assert list(r.readers.user_ids) == [] and r.readers.next_after_user_id == ""
            r = await c.request("watch_read_counts", conversation_id="g", from_sequence=u64)
            assert body(r) == "ack"
            assert _counts(await c.next_push()) == (u64, 2, [])
            r = await c.request("watch_read_counts", conversation_id="\x00bad", stop=True)
            assert r.error.code == Code.BAD_REQUEST
            assert body(await c.request("ping", client_time_ms=1)) == "pong"
