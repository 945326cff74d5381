"""Idle sessions without a task (server/parking.py): what parks, what wakes a parked session,
and that every way a session ends also ends a parked one. The rest of the server's behaviour
is run on both connection paths by test_server.py and test_server_faults.py."""

from __future__ import annotations

import socket

import trio

from seqactor._proto import seqactor_pb2 as pb
from seqactor.server import gateway
from seqactor.server.parking import Parking
from tests._harness import body, raw_connect, running_server, update_of
from tests.test_server import service_setup
from tests.test_server_faults import _stuck_session


async def parked(server, n: int = 1) -> None:
    """Until ``n`` sessions are parked (the server's own sessions hold no task then)."""
    with trio.fail_after(5):
        while len(server.parking) != n:
            await trio.sleep(0.005)


async def test_parking_wakes_on_readable_and_hangup_and_not_once_unparked():
    woken: list[str] = []
    parking: Parking[str] = Parking(woken.append)
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(parking.run)
        assert parking.park(a.fileno(), "a") and parking.park(c.fileno(), "c")
        assert len(parking) == 2
        await trio.sleep(0.02)
        assert woken == []  # nothing to read: nobody wakes
        b.send(b"x")
        d.close()  # a hang-up wakes too
        with trio.fail_after(2):
            while len(woken) < 2:
                await trio.sleep(0.005)
        assert sorted(woken) == ["a", "c"] and len(parking) == 0  # each woken once, unparked
        assert parking.park(a.fileno(), "a2")
        assert parking.unpark(a.fileno()) == "a2"
        assert parking.unpark(a.fileno()) is None
        b.send(b"y")
        await trio.sleep(0.02)
        assert sorted(woken) == ["a", "c"]  # unparked: not woken
        assert parking.park(a.fileno(), "a3")
        assert parking.close() == ["a3"]  # what was still parked; the watcher ends
        assert not parking.park(a.fileno(), "a4")  # closed: the caller waits itself
    for s in (a, b, c):
        s.close()


async def test_idle_session_parks_and_wakes_for_requests_pings_and_pushes():
    async with running_server() as server:
        await service_setup(server, "g", ["alice"], allocs=1)
        async with raw_connect(server, "alice") as c, \
                raw_connect(server, "backend", role="service") as svc:
            await parked(server)  # alice's (the service session keeps its task)
            base = len(server.task_nursery.child_tasks)
            for i in range(3):  # a request wakes it; it answers, then parks again
                r = await c.request("ping", client_time_ms=i)
                assert body(r) == "pong" and r.pong.client_time_ms == i
                await parked(server)
            await c.request("subscribe", all=True)
            await parked(server)
            await c.conn.ping(b"p")  # a WebSocket ping is answered by a woken task
            await parked(server)
            for n in (2, 3):  # pushes go straight to the parked session's socket
                await svc.request("allocate_sequences", conversation_id="g", count=1)
                conv, _, _, _ = update_of(await c.next_push())
                assert conv["g"][0] == n
            await parked(server)
            # pipelined requests: replies in order, all in the one woken task
            for rid in (101, 102, 103):
                await c.send(pb.ClientMessage(request_id=rid, ping=pb.Ping(client_time_ms=rid)))
            got = [await c.recv() for _ in range(3)]
            assert [m.request_id for m in got] == [101, 102, 103]
            await parked(server)
            assert len(server.task_nursery.child_tasks) == base


async def test_peer_leaving_ends_a_parked_session():
    async with running_server() as server:
        async with raw_connect(server, "alice"):
            await parked(server)
            assert len(server.sessions) == 1
        with trio.fail_after(3):
            while server.sessions or server.connections:
                await trio.sleep(0.01)
        assert len(server.parking) == 0


async def test_server_side_closes_wake_a_parked_session():
    async with running_server(heartbeat_interval_s=0.2) as server:  # idle timeout 0.5 s
        async with raw_connect(server, "alice", device_id="d") as old:
            await parked(server)
            async with raw_connect(server, "alice", device_id="d"):  # replaces it: 4009
                assert (await old.wait_closed(3)).code == 4009
            async with raw_connect(server, "bob") as idle:  # idle timeout: 1000
                await parked(server)
                closed = await idle.wait_closed(3)
                assert closed.code == 1000 and "idle" in (closed.reason or "")
        with trio.fail_after(3):
            while server.connections:
                await trio.sleep(0.01)


async def test_graceful_stop_sends_goaway_to_parked_sessions():
    async with running_server() as server:
        async with raw_connect(server, "alice") as a, raw_connect(server, "bob") as b:
            await parked(server, 2)
            server.stop()
            for c in (a, b):
                msg = await c.recv()
                assert msg.WhichOneof("body") == "go_away"
                assert (await c.wait_closed(3)).code == 1001


async def test_write_timeout_ends_a_parked_session_whose_reader_is_stuck():
    """The writer's timeout (a socket that takes nothing) wakes the parked session to close."""
    async with running_server(write_timeout_s=0.5) as server:
        await service_setup(server, "g", ["stuck"])
        async with trio.open_nursery() as nursery:
            server._test_nursery = nursery
            await _stuck_session(server, "stuck")
            await parked(server)
            async with raw_connect(server, "backend", role="service") as svc:
                with trio.fail_after(20):
                    while "stuck" in server.hub.actors:
                        await svc.request("add_members", conversation_id=f"big{len(svc.frames)}",
                                          user_ids=["stuck"])
                        await svc.request("allocate_sequences", conversation_id="g", count=1)
            # (its Close frame cannot go out either: the close ends at CONTROL_SEND_TIMEOUT_S)
            with trio.fail_after(10):
                while server.connections:
                    await trio.sleep(0.01)
            assert len(server.parking) == 0
            nursery.cancel_scope.cancel()


async def test_no_parking_without_epoll_or_when_disabled(monkeypatch):
    async with running_server(park_idle_sessions=False) as server:
        assert server.parking is None
        async with raw_connect(server, "alice") as c:
            assert body(await c.request("ping")) == "pong"
    monkeypatch.setattr(gateway, "PARKING_AVAILABLE", False)
    async with running_server() as server:
        assert server.parking is None
        async with raw_connect(server, "alice") as c:
            assert body(await c.request("ping")) == "pong"
