"""The server over real sockets on 127.0.0.1 with the real store: docs/protocol.md, every op and error."""

from __future__ import annotations

import contextlib
import itertools
import time

import jwt
import pytest
import trio
import trio_websocket as tws

from seqactor._proto import seqactor_pb2 as pb
from tests._harness import (
    SECRET,
    Closed,
    body,
    raw_connect,
    running_server,
    set_connection_path,
    token,
    update_of,
)

Code = pb.Error.Code


@pytest.fixture(autouse=True, params=["inline", "rounds", "inline-task"])
def fanout_mode(request, monkeypatch):
    """Every server test runs with group pushes inline and with fan-out rounds (big groups),
    idle sessions parked (no task: server/parking.py); and once more inline with a task per
    connection (the path where epoll is missing, and TLS's)."""
    set_connection_path(monkeypatch, "task" if request.param == "inline-task" else "parked")
    if request.param == "rounds":
        import seqactor.server.hub

        monkeypatch.setattr(seqactor.server.hub, "FANOUT_INLINE_MEMBERS", 0)
        monkeypatch.setattr(seqactor.server.hub, "FANOUT_SLICE_S", 0.0)
        monkeypatch.setattr(seqactor.server.hub, "FANOUT_CLOCK_EVERY", 1)
    return request.param


async def service_setup(server, conv: str, members: list[str], allocs: int = 0) -> None:
    async with raw_connect(server, "backend", role="service") as svc:
        r = await svc.request("add_members", conversation_id=conv, user_ids=members)
        assert body(r) == "ack"
        if allocs:
            r = await svc.request("allocate_sequences", conversation_id=conv, count=allocs)
            assert body(r) == "allocated"


# ---------------------------------------------------------------- hello and auth


async def test_hello_welcome_fields():
    async with running_server(heartbeat_interval_s=7.0) as server:
        async with raw_connect(server, "alice", device_id="phone") as c:
            w = c.welcome
            assert w is not None
            assert w.user_id == "alice" and w.role == "user"
            assert w.heartbeat_interval_ms == 7000
            assert w.max_frame_bytes == 65536
            assert w.session_id
            assert abs(w.server_time_ms - time.time() * 1000) < 5000


def _bad_token(name: str) -> str:
    """Built when the test runs: the ``exp`` values are relative to now."""
    now = int(time.time())
    return {
        "garbage": lambda: "not-a-jwt",
        "wrong-secret": lambda: jwt.encode({"sub": "alice", "exp": now + 60}, b"wrong-secret" * 4,
                                           algorithm="HS256"),
        "expired": lambda: jwt.encode({"sub": "alice", "exp": now - 10}, SECRET, algorithm="HS256"),
        "no-sub": lambda: jwt.encode({"exp": now + 60}, SECRET, algorithm="HS256"),
        "no-exp": lambda: jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256"),
        "alg-none": lambda: jwt.encode({"sub": "alice", "exp": now + 60}, None, algorithm="none"),
        "bad-role": lambda: jwt.encode({"sub": "alice", "exp": now + 60, "role": "admin"}, SECRET,
                                       algorithm="HS256"),
        "lifetime-too-long": lambda: jwt.encode({"sub": "alice", "exp": now + 10**9}, SECRET,
                                                algorithm="HS256"),
        "empty-sub": lambda: jwt.encode({"sub": "", "exp": now + 60}, SECRET, algorithm="HS256"),
        "empty": lambda: "",
    }[name]()


@pytest.mark.parametrize(
    "name",
    ["garbage", "wrong-secret", "expired", "no-sub", "no-exp", "alg-none", "bad-role",
     "lifetime-too-long", "empty-sub", "empty"],
)
async def test_bad_tokens_rejected_with_4001(name):
    bad_token = _bad_token(name)
    async with running_server() as server:
        async with raw_connect(server, tok=bad_token, hello=False) as c:
            msg = pb.ClientMessage(request_id=1, hello=pb.Hello(token=bad_token))
            await c.send(msg)
            reply = await c.recv()
            assert body(reply) == "error"
            assert reply.error.code == Code.UNAUTHENTICATED
            closed = await c.wait_closed()
            assert closed.code == 4001


async def test_op_before_hello_is_4001():
    async with running_server() as server:
        async with raw_connect(server, hello=False) as c:
            await c.send(pb.ClientMessage(request_id=1, ping=pb.Ping(client_time_ms=1)))
            reply = await c.recv()
            assert reply.error.code == Code.UNAUTHENTICATED
            assert (await c.wait_closed()).code == 4001


async def test_hello_timeout_is_4002():
    async with running_server(hello_timeout_s=0.3) as server:
        async with raw_connect(server, hello=False) as c:
            assert (await c.wait_closed()).code == 4002


async def test_text_frame_is_1003():
    async with running_server() as server:
        async with raw_connect(server, "alice") as c:
            await c.conn.send_message("hello as text")
            assert (await c.wait_closed()).code == 1003


async def test_undecodable_frame_gets_bad_request_then_1002():
    async with running_server() as server:
        async with raw_connect(server, "alice") as c:
            await c.conn.send_message(b"\xff\xff\xff\xff\xff")
            reply = await c.recv()
            assert reply.error.code == Code.BAD_REQUEST
            assert (await c.wait_closed()).code == 1002


async def test_oversized_frame_is_1009():
    async with running_server(max_frame_bytes=1024) as server:
        async with raw_connect(server, "alice") as c:
            assert c.welcome.max_frame_bytes == 1024
            ids = [f"c{i:05d}" for i in range(400)]
            await c.send(pb.ClientMessage(request_id=9, get_sequences=pb.GetSequences(conversation_ids=ids)))
            assert (await c.wait_closed()).code == 1009


async def test_wrong_path_is_refused():
    async with running_server() as server:
        with pytest.raises(tws.HandshakeError):
            async with raw_connect(server, "alice", path="/v2"):
                pass


async def test_second_hello_and_empty_message_are_bad_requests_session_stays():
    async with running_server() as server:
        async with raw_connect(server, "alice") as c:
            r = await c.request("hello", token=token("alice"))
            assert r.error.code == Code.BAD_REQUEST
            await c.send(pb.ClientMessage(request_id=5))
            r = await c.recv()
            assert r.request_id == 5 and r.error.code == Code.BAD_REQUEST
            await c.send(pb.ClientMessage(request_id=0, ping=pb.Ping(client_time_ms=3)))
            r = await c.recv()
            assert r.error.code == Code.BAD_REQUEST
            r = await c.request("ping", client_time_ms=42)
            assert body(r) == "pong" and r.pong.client_time_ms == 42 and r.pong.server_time_ms > 0


async def test_user_token_cannot_use_service_ops():
    async with running_server() as server:
        async with raw_connect(server, "mallory") as c:
            for kind, fields in [
                ("allocate_sequences", {"conversation_id": "g", "count": 1}),
                ("add_members", {"conversation_id": "g", "user_ids": ["mallory"]}),
                ("remove_members", {"conversation_id": "g", "user_ids": ["alice"]}),
                ("set_min_sequence", {"conversation_id": "g", "min_sequence": 5}),
            ]:
                r = await c.request(kind, **fields)
                assert r.error.code == Code.FORBIDDEN, kind
            r = await c.request("get_sequences")
            conversations, _, full, _ = update_of(r)
            assert conversations == {} and full


async def test_session_replaced_same_device_4009():
    async with running_server() as server:
        async with raw_connect(server, "alice", device_id="phone") as old:
            async with raw_connect(server, "alice", device_id="phone") as new:
                assert (await old.wait_closed()).code == 4009
                r = await new.request("ping", client_time_ms=1)
                assert body(r) == "pong"


async def test_service_sessions_on_one_credential_and_device_are_never_replaced():
    """A backend pool: eight workers with one service token and one device id allocate
    concurrently in one conversation: nobody is kicked (4009), every allocation succeeds, the
    ranges are disjoint and together contiguous."""
    workers, per_worker = 8, 5
    async with running_server() as server:
        tok = token("backend", "service")
        ranges: list[tuple[int, int]] = []
        async with contextlib.AsyncExitStack() as stack:
            conns = [
                await stack.enter_async_context(
                    raw_connect(server, tok=tok, device_id="worker-pool")
                )
                for _ in range(workers)
            ]
            assert all(c.welcome is not None and c.welcome.role == "service" for c in conns)

            async def work(c) -> None:
                for _ in range(per_worker):
                    r = await c.request("allocate_sequences", conversation_id="pool", count=3)
                    assert body(r) == "allocated", r
                    ranges.append((r.allocated.first_sequence, r.allocated.last_sequence))

            async with trio.open_nursery() as nursery:
                for c in conns:
                    nursery.start_soon(work, c)
            for c in conns:  # every connection is still open
                assert body(await c.request("ping", client_time_ms=1)) == "pong"
        ranges.sort()
        assert len(ranges) == workers * per_worker
        assert ranges[0][0] == 1 and ranges[-1][1] == 3 * workers * per_worker
        for (_, last), (first, _) in itertools.pairwise(ranges):
            assert first == last + 1


async def test_user_sessions_of_other_users_on_one_device_id_do_not_replace_each_other():
    async with running_server() as server:
        async with raw_connect(server, "alice", device_id="d") as a, \
                raw_connect(server, "bob", device_id="d") as b:
            assert body(await a.request("ping", client_time_ms=1)) == "pong"
            assert body(await b.request("ping", client_time_ms=1)) == "pong"


# ---------------------------------------------------------------- sequences


async def test_snapshot_delta_and_removed():
    async with running_server() as server:
        await service_setup(server, "g1", ["alice", "bob"], allocs=3)
        await service_setup(server, "g2", ["alice"], allocs=2)
        await service_setup(server, "g3", ["alice"], allocs=1)
        async with raw_connect(server, "alice") as c:
            r = await c.request("get_sequences")
            conv, tok, full, removed = update_of(r)
            assert full and removed == [] and tok
            # New members start with nothing unread: read = max at join (0 here).
            assert set(conv) == {"g1", "g2", "g3"}
            assert conv["g1"][0] == 3 and conv["g1"][1] == 0
            # Delta with nothing changed: empty, not full, new token.
            conv2, tok2, full2, removed2 = update_of(await c.request("get_sequences", since=tok))
            assert conv2 == {} and not full2 and removed2 == [] and tok2
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("allocate_sequences", conversation_id="g2", count=5)
            await svc.request("remove_members", conversation_id="g3", user_ids=["alice"])
            await svc.request("allocate_sequences", conversation_id="g9", count=1)  # foreign
        async with raw_connect(server, "alice") as c:
            conv3, tok3, full3, removed3 = update_of(await c.request("get_sequences", since=tok2))
            assert not full3
            assert set(conv3) == {"g2"} and conv3["g2"][0] == 7
            assert removed3 == ["g3"]
            # Explicit ids: only those in the view; no token; foreign ids silently omitted.
            conv4, tok4, full4, _ = update_of(
                await c.request("get_sequences", conversation_ids=["g1", "g9", "nope", "g3"])
            )
            assert set(conv4) == {"g1"} and tok4 == b"" and not full4


@pytest.mark.parametrize("since", [b"garbage", b"\x01" + b"\x00" * 24, b"\x01" * 25])
async def test_unusable_token_gives_full_snapshot(since):
    async with running_server() as server:
        await service_setup(server, "g1", ["alice"], allocs=2)
        async with raw_connect(server, "alice") as c:
            conv, tok, full, _ = update_of(await c.request("get_sequences", since=since))
            assert full and set(conv) == {"g1"} and tok


async def test_isolation_probe_foreign_and_nonexistent_look_the_same():
    async with running_server() as server:
        await service_setup(server, "secret-group", ["bob"], allocs=4)
        await service_setup(server, "mine", ["eve"], allocs=1)
        async with raw_connect(server, "eve") as c:
            a = await c.request("get_sequences", conversation_ids=["secret-group"])
            b = await c.request("get_sequences", conversation_ids=["does-not-exist"])
            assert update_of(a)[0] == {} and update_of(b)[0] == {}
            assert a.update == b.update
            for cid in ("secret-group", "does-not-exist"):
                r = await c.request("mark_read", conversation_id=cid, read_sequence=1)
                assert r.error.code == Code.FORBIDDEN
                r2 = await c.request("subscribe", conversation_ids=[cid])
                assert r2.error.code == Code.FORBIDDEN
            # Errors for foreign and nonexistent ids are byte-identical apart from request ids.
            errs = [f.error for f in c.frames if body(f) == "error"]
            assert errs[0] == errs[2]
            assert errs[1].code == errs[3].code
            assert errs[1].message.replace("secret-group", "X") == errs[3].message.replace(
                "does-not-exist", "X")
            await c.request("subscribe", all=True)
        async with raw_connect(server, "backend", role="service") as svc:
            await svc.request("allocate_sequences", conversation_id="secret-group", count=1)
            await svc.request("allocate_sequences", conversation_id="mine", count=1)


async def test_mark_read_monotonic_clamped_and_multi_device():
    async with running_server() as server:
        await service_setup(server, "g", ["alice"], allocs=10)
        async with raw_connect(server, "alice", device_id="phone") as phone, \
                raw_connect(server, "alice", device_id="laptop") as laptop:
            await laptop.request("subscribe", all=True)
            await phone.request("subscribe", all=True)
            r = await phone.request("mark_read", conversation_id="g", read_sequence=4)
            assert body(r) == "ack" and r.ack.read_sequence == 4
            push = await laptop.next_push()
            conv, _, _, _ = update_of(push)
            assert conv == {"g": (0, 4, 0, 0, 0)}
            await phone.no_push()  # the marking session gets the Ack, not a push
            r = await phone.request("mark_read", conversation_id="g", read_sequence=2)
            assert r.ack.read_sequence == 4  # below current: no-op, effective value
            r = await phone.request("mark_read", conversation_id="g", read_sequence=99)
            assert r.ack.read_sequence == 10  # clamped to max
            conv, _, _, _ = update_of(await laptop.next_push())
            assert conv["g"][1] == 10
            await laptop.no_push()


async def test_subscribe_listed_push_only_changed_fields_and_unsubscribe():
    async with running_server() as server:
        await service_setup(server, "g1", ["alice", "bob"])
        await service_setup(server, "g2", ["alice"])
        async with raw_connect(server, "alice") as c:
            r = await c.request("subscribe", conversation_ids=["g1"])
            assert body(r) == "ack"
            async with raw_connect(server, "backend", role="service") as svc:
                r = await svc.request("allocate_sequences", conversation_id="g1", count=3,
                                      sender_user_id="bob")
                assert (r.allocated.first_sequence, r.allocated.last_sequence) == (1, 3)
                conv, tok, full, _ = update_of(await c.next_push())
                assert conv["g1"][0] == 3 and conv["g1"][1] == 0 and conv["g1"][3] > 0
                assert tok == b"" and not full  # listed subscriptions carry no token
                await svc.request("allocate_sequences", conversation_id="g2", count=1)
                await c.no_push()  # g2 is not subscribed
                r = await c.request("unsubscribe", conversation_ids=["g1"])
                assert body(r) == "ack"
                await svc.request("allocate_sequences", conversation_id="g1", count=1)
                await c.no_push()


async def test_sender_has_read_i6_and_all_subscription_token(fanout_mode):
    async with running_server() as server:
        await service_setup(server, "g", ["alice", "bob"])
        async with raw_connect(server, "bob") as bob:
            await bob.request("subscribe", all=True)
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("allocate_sequences", conversation_id="g", count=2,
                                  sender_user_id="bob")
            conv, tok, _, _ = update_of(await bob.next_push())
            assert conv["g"][0] == 2 and conv["g"][1] == 2  # own messages are never unread
            assert tok
            # The pushed token is a usable resume point: nothing new since. (While a big
            # group's fan-out round is in flight tokens lag a little, so a resume may repeat
            # values the client already holds — never anything different.)
            conv2, _, full, _ = update_of(await bob.request("get_sequences", since=tok))
            assert not full
            assert all(v[:4] == conv["g"][:4] and v.membership == 1 for v in conv2.values())
            if fanout_mode != "rounds":
                assert conv2 == {}


async def test_add_members_pushes_to_all_sessions_and_remove_pushes_removed():
    async with running_server() as server:
        await service_setup(server, "g", ["bob"], allocs=5)
        async with raw_connect(server, "alice") as c:
            await c.request("subscribe", all=True)
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("add_members", conversation_id="g", user_ids=["alice"])
                conv, _, _, _ = update_of(await c.next_push())
                assert conv == {"g": (5, 5, 0, conv["g"][3], 0)}  # joins with nothing unread
                await svc.request("remove_members", conversation_id="g", user_ids=["alice"])
                conv, _, _, removed = update_of(await c.next_push())
                assert removed == ["g"] and conv == {}
                r = await c.request("mark_read", conversation_id="g", read_sequence=1)
                assert r.error.code == Code.FORBIDDEN


@pytest.mark.parametrize("keep_history", [False, True], ids=["removed", "keep-history"])
async def test_listed_subscription_survives_leave_and_rejoin(keep_history):
    """Subscribe to [g]; the user is removed (and gets ``removed`` once, without
    keep_history), re-added, messages arrive: the full state on rejoin, then pushes."""
    async with running_server() as server:
        await service_setup(server, "g", ["alice", "bob"], allocs=2)
        async with raw_connect(server, "alice") as c, \
                raw_connect(server, "backend", role="service") as svc:
            assert body(await c.request("subscribe", conversation_ids=["g"])) == "ack"
            await svc.request("remove_members", conversation_id="g", user_ids=["alice"],
                              keep_history=keep_history)
            conv, _, _, removed = update_of(await c.next_push())
            if keep_history:  # the row freezes: only its membership is pushed
                assert removed == [] and conv == {"g": (0, 0, 0, 0, 2)}
            else:
                assert removed == ["g"] and conv == {}
            # nothing about g while she is outside (or frozen)
            await svc.request("allocate_sequences", conversation_id="g", count=3)
            await svc.request("set_min_sequence", conversation_id="g", min_sequence=2)
            await c.no_push()
            # rejoin: the full state of g (a frozen row: member again)
            await svc.request("add_members", conversation_id="g", user_ids=["alice"])
            conv, _, _, removed = update_of(await c.next_push())
            assert removed == []
            assert conv["g"][:3] == (5, 5, 2) and conv["g"][3] > 0
            assert conv["g"].membership == (1 if keep_history else 0)
            # then pushes resume
            await svc.request("allocate_sequences", conversation_id="g", count=1,
                              sender_user_id="bob")
            conv, _, _, _ = update_of(await c.next_push())
            assert conv["g"][0] == 6
            # and she can read it again
            r = await c.request("mark_read", conversation_id="g", read_sequence=6)
            assert r.ack.read_sequence == 6


async def test_keep_history_freezes_view():
    async with running_server() as server:
        await service_setup(server, "g", ["alice", "bob"], allocs=5)
        async with raw_connect(server, "backend", role="service") as svc:
            r = await svc.request("remove_members", conversation_id="g", user_ids=["alice"],
                                  keep_history=True)
            assert body(r) == "ack"
            await svc.request("allocate_sequences", conversation_id="g", count=10)
        async with raw_connect(server, "alice") as c:
            conv, _, _, _ = update_of(await c.request("get_sequences"))
            assert conv["g"][0] == 5  # frozen at the max when she left
            r = await c.request("mark_read", conversation_id="g", read_sequence=100)
            assert r.ack.read_sequence == 5


async def test_keep_history_row_is_marked_frozen_in_pushes_snapshots_and_resumes():
    """membership: a freeze is pushed (2), a snapshot marks the frozen row (2; member rows
    send nothing), a resume across the freeze carries it, a re-add is pushed (1)."""
    async with running_server() as server:
        await service_setup(server, "g", ["alice", "bob"], allocs=5)
        await service_setup(server, "h", ["alice"], allocs=1)
        async with raw_connect(server, "alice") as c, \
                raw_connect(server, "backend", role="service") as svc:
            await c.request("subscribe", all=True)
            conv, before, _, _ = update_of(await c.request("get_sequences"))
            assert conv["g"].membership == 0 and conv["h"].membership == 0
            await svc.request("remove_members", conversation_id="g", user_ids=["alice"],
                              keep_history=True)
            conv, _, _, removed = update_of(await c.next_push())
            assert conv == {"g": (0, 0, 0, 0, 2)} and removed == []
            await svc.request("allocate_sequences", conversation_id="g", count=3)
            await c.no_push()  # later messages do not reach the frozen row
            # a snapshot: the frozen row says 2, the member row nothing
            conv, frozen_tok, full, _ = update_of(await c.request("get_sequences"))
            assert full and conv["g"][:3] == (5, 0, 0) and conv["g"].membership == 2
            assert conv["h"].membership == 0
            # a resume from before the freeze carries it
            conv, _, full, _ = update_of(await c.request("get_sequences", since=before))
            assert not full and conv["g"][:3] == (5, 0, 0) and conv["g"].membership == 2
            # listed ids: the row's membership either way
            conv, _, _, _ = update_of(await c.request("get_sequences",
                                                      conversation_ids=["g", "h"]))
            assert conv["g"].membership == 2 and conv["h"].membership == 1
            # re-added: member again (1), at the current max, and pushes resume
            await svc.request("add_members", conversation_id="g", user_ids=["alice"])
            conv, _, _, _ = update_of(await c.next_push())
            assert conv["g"][:3] == (8, 8, 0) and conv["g"].membership == 1
            conv, _, full, _ = update_of(await c.request("get_sequences", since=frozen_tok))
            assert not full and conv["g"].membership == 1
            await svc.request("allocate_sequences", conversation_id="g", count=1)
            conv, _, _, _ = update_of(await c.next_push())
            assert conv["g"][0] == 9 and conv["g"].membership == 0


async def test_set_min_sequence_raises_only():
    async with running_server() as server:
        await service_setup(server, "g", ["alice"], allocs=10)
        async with raw_connect(server, "alice") as c:
            await c.request("subscribe", all=True)
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("set_min_sequence", conversation_id="g", min_sequence=4)
                conv, _, _, _ = update_of(await c.next_push())
                assert conv["g"][2] == 4 and conv["g"][0] == 0  # only min changed
                await svc.request("set_min_sequence", conversation_id="g", min_sequence=2)
                await svc.request("set_min_sequence", conversation_id="g", min_sequence=50)
                conv, _, _, _ = update_of(await c.next_push())
                assert conv["g"][2] == 10  # clamped to max
                r = await svc.request("set_min_sequence", conversation_id="unknown", min_sequence=1)
                assert r.error.code == Code.NOT_FOUND


async def test_service_op_errors():
    async with running_server(max_frame_bytes=1 << 20) as server:
        async with raw_connect(server, "backend", role="service") as svc:
            r = await svc.request("allocate_sequences", conversation_id="g", count=10_001)
            assert r.error.code == Code.TOO_LARGE
            r = await svc.request("allocate_sequences", conversation_id="", count=1)
            assert r.error.code == Code.BAD_REQUEST
            r = await svc.request("allocate_sequences", conversation_id="x" * 129, count=1)
            assert r.error.code == Code.BAD_REQUEST
            r = await svc.request("allocate_sequences", conversation_id="a\x01b", count=1)
            assert r.error.code == Code.BAD_REQUEST
            r = await svc.request("allocate_sequences", conversation_id="é" * 64, count=0)
            assert (r.allocated.first_sequence, r.allocated.last_sequence) == (1, 1)
            r = await svc.request("allocate_sequences", conversation_id="g", count=2**32 - 1)
            assert r.error.code == Code.TOO_LARGE
            r = await svc.request("remove_members", conversation_id="nope", user_ids=["a"])
            assert r.error.code == Code.NOT_FOUND
            r = await svc.request("add_members", conversation_id="g", user_ids=["ok", ""])
            assert r.error.code == Code.BAD_REQUEST
            r = await svc.request("add_members", conversation_id="g",
                                  user_ids=[f"u{i}" for i in range(10_001)])
            assert r.error.code == Code.TOO_LARGE
            # Nothing half-written: "ok" did not join.
            assert not await server.store.view_contains("ok", "g")


async def test_too_many_ids_is_too_large():
    async with running_server(max_frame_bytes=1 << 20) as server:
        async with raw_connect(server, "alice") as c:
            r = await c.request("get_sequences", conversation_ids=[f"c{i}" for i in range(10_001)])
            assert r.error.code == Code.TOO_LARGE


async def test_background_holds_and_flushes_in_one_frame():
    async with running_server() as server:
        await service_setup(server, "g1", ["alice"])
        await service_setup(server, "g2", ["alice"])
        async with raw_connect(server, "alice") as c:
            await c.request("subscribe", all=True)
            r = await c.request("set_background", background=True)
            assert body(r) == "ack"
            async with raw_connect(server, "backend", role="service") as svc:
                for _ in range(5):
                    await svc.request("allocate_sequences", conversation_id="g1", count=1)
                await svc.request("allocate_sequences", conversation_id="g2", count=2)
            await c.no_push(0.3)
            r = await c.request("set_background", background=False)
            assert body(r) == "ack"
            conv, tok, _, _ = update_of(await c.next_push())
            assert conv["g1"][0] == 5 and conv["g2"][0] == 2 and tok
            await c.no_push()


async def test_idle_timeout_closes_and_ping_keeps_alive():
    async with running_server(heartbeat_interval_s=0.2) as server:
        async with raw_connect(server, "alice") as idle, raw_connect(server, "bob") as busy:
            with trio.move_on_after(0.8):
                while True:
                    await busy.request("ping", client_time_ms=1)
                    await trio.sleep(0.1)
            closed = await idle.wait_closed(2)
            assert closed.code == 1000 and "idle" in (closed.reason or "")
            r = await busy.request("ping", client_time_ms=2)
            assert body(r) == "pong"


async def test_background_sessions_get_four_times_the_idle_timeout():
    async with running_server(heartbeat_interval_s=0.2) as server:  # idle timeout 0.5 s
        async with raw_connect(server, "alice") as fg, raw_connect(server, "bob") as bg:
            assert body(await bg.request("set_background", background=True)) == "ack"
            started = trio.current_time()
            closed = await fg.wait_closed(3)
            assert closed.code == 1000 and "idle" in (closed.reason or "")
            await trio.sleep(1.0 - (trio.current_time() - started))
            r = await bg.request("ping", client_time_ms=1)  # silent 1 s, limit 2 s: still open
            assert body(r) == "pong"
            await trio.sleep(0.5)
            assert body(await bg.request("set_background", background=False)) == "ack"
            closed = await bg.wait_closed(3)  # foreground again: 0.5 s of silence ends it
            assert closed.code == 1000


async def test_websocket_ping_frames_count_as_traffic():
    async with running_server(heartbeat_interval_s=0.2) as server:
        async with raw_connect(server, "alice") as c:
            with trio.move_on_after(0.9):
                while True:
                    await c.conn.ping()
                    await trio.sleep(0.1)
            r = await c.request("ping", client_time_ms=2)
            assert body(r) == "pong"


async def test_an_open_connection_answers_pings_bursts_and_closes_cleanly():
    """The server's own WebSocket layer: pings are answered while the session is idle, a
    pipelined burst of ops is answered in order, and the close handshake completes."""
    async with running_server() as server:
        async with raw_connect(server, "alice") as c:
            with trio.fail_after(2):
                await c.conn.ping(b"still answered")
            r = await c.request("ping", client_time_ms=2)
            assert body(r) == "pong"
            burst = 48
            for i in range(burst):
                await c.send(pb.ClientMessage(request_id=100 + i, ping=pb.Ping(client_time_ms=i)))
            for i in range(burst):
                r = await c.recv()
                assert body(r) == "pong" and r.request_id == 100 + i
            with trio.fail_after(2):
                await c.conn.aclose(1000, "bye")
            assert c.conn.closed is not None and c.conn.closed.code == 1000
        with trio.fail_after(2):
            while server.sessions or server.connections:
                await trio.sleep(0.01)


async def test_rate_limit_errors_then_4008():
    async with running_server(rate_limit_ops_per_s=5, rate_limit_burst_ops=5,
                              rate_limit_max_rejected=20) as server:
        async with raw_connect(server, "alice") as c:
            for i in range(40):
                await c.send(pb.ClientMessage(request_id=i + 100, ping=pb.Ping(client_time_ms=i)))
            codes = []
            with pytest.raises(Closed) as info:
                while True:
                    msg = await c.recv()
                    codes.append(msg.error.code if body(msg) == "error" else body(msg))
            assert info.value.code == 4008
            assert codes[:5] == ["pong"] * 5
            assert Code.RATE_LIMITED in codes


async def test_graceful_shutdown_sends_goaway_and_1001():
    async with running_server() as server:
        async with raw_connect(server, "alice") as c:
            server.stop()
            msg = await c.next_push()
            assert body(msg) == "go_away" and msg.go_away.reconnect_after_ms > 0
            assert (await c.wait_closed()).code == 1001


async def test_restart_on_sqlite_continues_sequences(tmp_path):
    url = f"sqlite:///{tmp_path}/db.sqlite"
    async with running_server(url) as server:
        await service_setup(server, "g", ["alice"], allocs=7)
        async with raw_connect(server, "alice") as c:
            tok = update_of(await c.request("get_sequences"))[1]
    async with running_server(url) as server:
        async with raw_connect(server, "backend", role="service") as svc:
            r = await svc.request("allocate_sequences", conversation_id="g", count=1)
            assert r.allocated.first_sequence == 8
        async with raw_connect(server, "alice") as c:
            conv, _, full, _ = update_of(await c.request("get_sequences", since=tok))
            assert not full and conv["g"][0] == 8  # the token survives the restart (same epoch)


async def test_big_group_converges_and_tokens_never_skip_a_change():
    members = [f"m{i}" for i in range(80)]
    async with running_server() as server:
        await service_setup(server, "big", members)
        async with trio.open_nursery() as nursery:
            clients = []
            for uid in members[:70]:
                c = await nursery.start(_hold_session, server, uid)
                clients.append(c)
            async with raw_connect(server, "backend", role="service") as svc:
                for _ in range(30):
                    await svc.send(pb.ClientMessage(
                        request_id=1000 + len(svc.frames),
                        allocate_sequences=pb.AllocateSequences(conversation_id="big", count=1,
                                                                sender_user_id="m0")))
                    await svc.recv()
            for c in clients:
                with trio.fail_after(5):
                    await c.done.wait()
                # Resuming from the last pushed token never misses the final state.
                conv, _, full, _ = update_of(await c.raw.request("get_sequences", since=c.token))
                merged = dict(c.view)
                for cid, (mx, rd, _mn, _tm, _mb) in conv.items():
                    merged[cid] = (mx or merged[cid][0], rd or merged[cid][1])
                assert merged["big"][0] == 30
            assert clients[0].view["big"] == (30, 30)  # the sender has read everything (I6)
            nursery.cancel_scope.cancel()


class _Held:
    def __init__(self, raw):
        self.raw = raw
        self.view: dict[str, tuple[int, int]] = {}
        self.token = b""
        self.done = trio.Event()  # set once the session holds max 30; it then stops reading


async def _hold_session(server, uid, task_status=trio.TASK_STATUS_IGNORED):
    async with raw_connect(server, uid) as raw:
        held = _Held(raw)
        conv, held.token, _, _ = update_of(await raw.request("get_sequences"))
        held.view = {cid: (v[0], v[1]) for cid, v in conv.items()}
        await raw.request("subscribe", all=True)
        task_status.started(held)
        while held.view.get("big", (0, 0))[0] != 30:
            conv, tok, _, _ = update_of(await raw.next_push(timeout=3600))
            for cid, (mx, rd, _mn, _tm, _mb) in conv.items():
                old = held.view.get(cid, (0, 0))
                held.view[cid] = (mx or old[0], rd or old[1])
            if tok:
                held.token = tok
        held.done.set()
        await trio.sleep_forever()
