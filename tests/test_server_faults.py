"""Server behaviour under faults: stuck readers, failing actors, limits, TLS, metrics."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import struct
import urllib.request

import pytest
import trio
import trio.testing
import trio_websocket as tws
import trustme

import seqactor.server.gateway
from seqactor._proto import seqactor_pb2 as pb
from seqactor.server.actor import UserActor
from tests._harness import (
    RawClient,
    body,
    raw_connect,
    running_server,
    set_connection_path,
    token,
    update_of,
)
from tests.test_server import service_setup


@pytest.fixture(autouse=True, params=["parked", "task"])
def connection_path(request, monkeypatch):
    """Every fault test runs with idle sessions parked (no task: server/parking.py) and with
    a task per connection (where epoll is missing, and TLS)."""
    set_connection_path(monkeypatch, request.param)
    return request.param

Code = pb.Error.Code
FOLLOWED = 5
CHANGES = 10_000
STUCK_RCVBUF_BYTES = 4096


async def _stuck_session(server, user: str) -> tws.WebSocketConnection:
    """A session that subscribes to everything and then never reads again."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STUCK_RCVBUF_BYTES)
    await sock.connect(("127.0.0.1", server.port))
    conn = await tws.wrap_client_stream(
        server._test_nursery, trio.SocketStream(sock), "127.0.0.1", "/v1", message_queue_size=0,
    )
    c = RawClient(conn)
    await c.request("hello", token=token(user))
    await c.request("subscribe", all=True)
    return conn


async def test_stuck_reader_is_bounded_and_does_not_delay_others():
    async with running_server(write_timeout_s=60) as server:
        convs = [f"{i}-" + "g" * 120 for i in range(FOLLOWED)]  # long ids: big frames
        for cid in convs:
            await service_setup(server, cid, ["stuck", "live"])
        async with trio.open_nursery() as nursery:
            server._test_nursery = nursery
            stuck = await _stuck_session(server, "stuck")
            async with raw_connect(server, "live") as live, \
                    raw_connect(server, "backend", role="service") as svc:
                await live.request("subscribe", all=True)
                max_pending = 0
                for i in range(CHANGES):
                    rid = i + 1000
                    await svc.send(pb.ClientMessage(
                        request_id=rid,
                        allocate_sequences=pb.AllocateSequences(
                            conversation_id=convs[i % FOLLOWED], count=1),
                    ))
                    if i % 64 == 63:
                        # Drain the service replies so the backend itself is not the bottleneck.
                        for _ in range(64):
                            await svc.recv()
                    actor = server.hub.actors["stuck"]
                    for s in actor.sessions:
                        max_pending = max(max_pending, s.pending_count)
                while len([f for f in svc.frames if body(f) == "allocated"]) < CHANGES:
                    await svc.recv()
                # The live session is served up to the last allocation promptly.
                expected = CHANGES // FOLLOWED
                with trio.fail_after(5):
                    seen: dict[str, int] = {}
                    while not all(seen.get(c, 0) == expected for c in convs):
                        conv, _, _, _ = update_of(await live.next_push())
                        for cid, (mx, _rd, _mn, _tm, _mb) in conv.items():
                            if mx:
                                seen[cid] = mx
                # The stuck session's backlog is bounded by what it follows (I5).
                assert max_pending <= FOLLOWED
                stuck_state = server.hub.actors["stuck"].sessions[0]
                assert stuck_state.writer_running  # its writer really is blocked on a full socket
                assert stuck_state.pending_count <= FOLLOWED
                assert len(stuck_state.replies) <= server.config.reply_queue_frames
            await stuck.aclose()
            nursery.cancel_scope.cancel()


async def test_write_timeout_closes_stuck_session():
    async with running_server(write_timeout_s=0.5) as server:
        await service_setup(server, "g", ["stuck"])
        async with trio.open_nursery() as nursery:
            server._test_nursery = nursery
            await _stuck_session(server, "stuck")
            async with raw_connect(server, "backend", role="service") as svc:
                with trio.fail_after(20):
                    while "stuck" in server.hub.actors:
                        # Big frames fill the socket buffers quickly.
                        await svc.request("add_members", conversation_id=f"big{len(svc.frames)}",
                                          user_ids=["stuck"])
                        await svc.request("allocate_sequences", conversation_id="g", count=1)
            assert "stuck" not in server.hub.actors  # closed and retired
            nursery.cancel_scope.cancel()


async def test_actor_failure_closes_only_that_users_sessions(monkeypatch):
    async with running_server() as server:
        await service_setup(server, "g", ["victim", "bystander"])
        original = UserActor.flush

        def failing_flush(self: UserActor) -> None:
            if self.user_id == "victim":
                raise RuntimeError("injected actor failure")
            original(self)

        monkeypatch.setattr(UserActor, "flush", failing_flush)
        async with raw_connect(server, "victim") as victim, \
                raw_connect(server, "bystander") as bystander:
            await victim.request("subscribe", all=True)
            await bystander.request("subscribe", all=True)
            async with raw_connect(server, "backend", role="service") as svc:
                await svc.request("allocate_sequences", conversation_id="g", count=2)
                # A min change is encoded by each actor's flush (not a shared frame).
                await svc.request("set_min_sequence", conversation_id="g", min_sequence=1)
            closed = await victim.wait_closed()
            assert closed.code == 1011
            errors = [f for f in victim.pushes if body(f) == "error"]
            assert errors and errors[0].error.code == Code.INTERNAL
            seen = {}
            while seen.get("g", (0, 0, 0, 0))[2] != 1:
                conv, _, _, _ = update_of(await bystander.next_push())
                seen.update(conv)
            r = await bystander.request("ping", client_time_ms=1)
            assert body(r) == "pong"


async def test_websocket_reader_failure_drops_only_that_connection(monkeypatch):
    """A bug in the WebSocket layer's read path (here: answering a ping) ends that connection
    (logged), never the server or other sessions."""
    from seqactor.server.ws import ServerWebSocket

    async def broken_control(self, data):
        raise RuntimeError("reader bug")

    async with running_server() as server, raw_connect(server, "bob") as other:
        async with raw_connect(server, "alice") as victim:
            monkeypatch.setattr(ServerWebSocket, "_send_control", broken_control)
            with trio.move_on_after(2):
                await victim.conn.ping(b"boom")  # never answered: the server drops it
            closed = await victim.wait_closed()
            assert closed.code == 1006
            monkeypatch.undo()
        r = await other.request("ping", client_time_ms=1)
        assert body(r) == "pong"
        with trio.fail_after(2):
            while server.connections != 1:  # the victim's handler ended too
                await trio.sleep(0.01)


async def test_connection_limit_refuses_clearly_and_recovers():
    async with running_server(max_connections=2) as server:
        async with raw_connect(server, "a"), raw_connect(server, "b"):
            try:
                async with raw_connect(server, "c"):
                    raise AssertionError("third connection accepted")
            except tws.HandshakeError as exc:
                assert "503" in repr(exc) or getattr(exc, "status_code", 503) == 503
        async with raw_connect(server, "c") as c:  # accepted again once others left
            assert c.welcome is not None


async def test_metrics_endpoint_counts_sessions_and_ops():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with running_server(metrics_port=port) as server:
        await service_setup(server, "g", ["alice"], allocs=3)
        async with raw_connect(server, "alice") as c:
            await c.request("get_sequences")
            await c.request("mark_read", conversation_id="g", read_sequence=2)
            text = await trio.to_thread.run_sync(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            )
    assert "seqactor_sessions 1.0" in text
    assert 'seqactor_ops_total{op="allocate_sequences",result="OK"} 1.0' in text
    assert 'seqactor_ops_total{op="mark_read",result="OK"} 1.0' in text
    assert "seqactor_op_latency_seconds_bucket" in text
    assert "seqactor_store_commit_seconds_count" in text
    assert "seqactor_frames_sent_total" in text


async def test_tls(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    async with running_server(tls_cert=str(cert_file), tls_key=str(key_file)) as server:
        assert server.url.startswith("wss://")
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        async with tws.open_websocket_url(f"wss://127.0.0.1:{server.port}/v1", ssl_context=ctx) as conn:
            c = RawClient(conn)
            r = await c.request("hello", token=token("alice"))
            assert body(r) == "welcome"
            r = await c.request("ping", client_time_ms=5)
            assert body(r) == "pong"


async def test_pings_while_a_frame_is_half_written_never_corrupt_the_stream():
    """A slow reader that sends WebSocket pings: the server's pongs must not land inside a
    push frame the socket took only in part. Once it reads again, every frame decodes and the
    last max arrives."""
    cid = "p-" + "x" * 120
    changes = 3000
    async with running_server(write_timeout_s=60) as server:
        await service_setup(server, cid, ["slow"])
        async with trio.open_nursery() as nursery:
            server._test_nursery = nursery
            conn = await _stuck_session(server, "slow")
            async with raw_connect(server, "backend", role="service") as svc:
                for i in range(changes):
                    await svc.send(pb.ClientMessage(
                        request_id=i + 1,
                        allocate_sequences=pb.AllocateSequences(conversation_id=cid, count=1)))
                    if i % 50 == 0:
                        nursery.start_soon(conn.ping)  # answered once the client reads again
                    if i % 64 == 63:
                        for _ in range(64):
                            await svc.recv()
                while len([f for f in svc.frames if body(f) == "allocated"]) < changes:
                    await svc.recv()
            state = server.hub.actors["slow"].sessions[0]
            assert state.writer_running  # the socket was full: the server had to wait
            c = RawClient(conn)
            with trio.fail_after(20):
                last = 0
                while last < changes:
                    conv, _, _, _ = update_of(await c.next_push())
                    last = max(last, conv[cid][0])
            assert conn.closed is None  # no protocol error on the way
            await conn.aclose()
            nursery.cancel_scope.cancel()


async def test_activity_stream_reads_like_trio_socket_stream():
    """The gateway's direct read path: data, EOF, a reset, and closing while a read waits
    behave as trio.SocketStream's receive_some (what trio-websocket's reader expects)."""
    from seqactor.server.gateway import ActivityStream

    a, b = trio.socket.socketpair()
    ours = ActivityStream(trio.SocketStream(a))
    peer = trio.SocketStream(b)
    before = ours.last_rx
    await peer.send_all(b"hello")
    assert await ours.receive_some(3) == b"hel"
    assert await ours.receive_some() == b"lo" and ours.last_rx >= before
    with pytest.raises(ValueError):
        await ours.receive_some(0)
    async with trio.open_nursery() as n:
        n.start_soon(peer.send_all, b"late")  # arrives while the read waits
        assert await ours.receive_some(100) == b"late"
    await peer.aclose()
    assert await ours.receive_some(100) == b""  # EOF
    got: list[BaseException] = []

    async def reader() -> None:
        try:
            await ours.receive_some(100)
        except trio.ClosedResourceError as exc:
            got.append(exc)

    c, d = trio.socket.socketpair()
    ours = ActivityStream(trio.SocketStream(c))
    async with trio.open_nursery() as n:
        n.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await ours.aclose()  # closed while the read waits
    assert len(got) == 1
    with pytest.raises(trio.ClosedResourceError):
        await ours.receive_some(100)  # and after
    d.close()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = socket.create_connection(listener.getsockname())
    server_side, _ = listener.accept()
    listener.close()
    ours = ActivityStream(trio.SocketStream(trio.socket.from_stdlib_socket(server_side)))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # SO_LINGER 0: the peer resets the connection
    with pytest.raises(trio.BrokenResourceError):
        await ours.receive_some(100)
    await ours.aclose()


async def test_no_task_outlives_its_connection(tmp_path, connection_path):
    """A connection has at most one task in the server's connection nursery (its handler,
    which also reads; an idle user session on plain TCP, parked, none): however the
    connection ends (client close, abrupt drop, server close, refused handshake; plain and
    TLS), it ends with it."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    for tls in (False, True):
        overrides = {"tls_cert": str(cert_file), "tls_key": str(key_file)} if tls else {}
        async with running_server(**overrides) as server:
            # the accept loop, the watchdog (and the parking's watcher)
            base = len(server.task_nursery.child_tasks)
            parks = connection_path == "parked" and not tls  # (TLS sessions keep their task)
            url = f"{'wss' if tls else 'ws'}://127.0.0.1:{server.port}"
            kw = {"ssl_context": ctx} if tls else {}
            async with tws.open_websocket_url(url + "/v1", **kw) as conn:  # client closes
                r = await RawClient(conn).request("hello", token=token("alice"))
                assert body(r) == "welcome"
                # its handler, its only task (none once parked: it has nothing to read)
                with trio.fail_after(3):
                    while len(server.task_nursery.child_tasks) != base + (0 if parks else 1):
                        await trio.sleep(0.01)
                assert len(server.parking or ()) == (1 if parks else 0)
                r = await RawClient(conn).request("ping")  # (woken: a task until it parks)
                assert body(r) == "pong"
            async with trio.open_nursery() as n:  # abrupt drop
                conn = await tws.connect_websocket_url(n, url + "/v1", **kw)
                r = await RawClient(conn).request("hello", token=token("bob"))
                assert body(r) == "welcome"
                await trio.aclose_forcefully(conn._stream)
                n.cancel_scope.cancel()
            async with tws.open_websocket_url(url + "/v1", **kw) as conn:  # server closes
                c = RawClient(conn)
                await c.send(pb.ClientMessage(request_id=1, ping=pb.Ping()))  # before Hello
                assert (await c.wait_closed()).code == 4001
            with pytest.raises(tws.HandshakeError):  # refused at the handshake
                async with tws.open_websocket_url(url + "/nowhere", **kw):
                    pass
            with trio.fail_after(3):
                while server.connections or len(server.task_nursery.child_tasks) != base:
                    await trio.sleep(0.01)


async def test_a_burst_of_connections_beyond_one_accept_pass_is_all_served(monkeypatch):
    """The accept loop takes at most ACCEPT_BATCH connections a pass, lets other tasks run,
    then takes the rest of the backlog: every client of a burst is welcomed."""
    monkeypatch.setattr(seqactor.server.gateway, "ACCEPT_BATCH", 2)
    async with running_server() as server:
        welcomed: list[str] = []

        async def client(user: str) -> None:
            async with raw_connect(server, user) as c:
                assert c.welcome is not None
                welcomed.append(c.welcome.user_id)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for i in range(7):
                    nursery.start_soon(client, f"u{i}")
    assert sorted(welcomed) == [f"u{i}" for i in range(7)]


async def test_an_accept_loop_out_of_descriptors_at_its_start_waits_and_then_serves(caplog):
    """The accept loop duplicates its listener's descriptor first; out of descriptors there
    (EMFILE), it logs one line and tries again after ACCEPT_RETRY_S instead of taking the
    server down, then accepts once descriptors are free again."""
    async with running_server() as server:
        listener = trio.socket.socket()
        await listener.bind(("127.0.0.1", 0))
        listener.listen()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        async with trio.open_nursery() as nursery:
            lowest_free = os.dup(0)  # the limit bounds descriptor numbers: none is free below
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                nursery.start_soon(server._accept, listener, nursery)
                with trio.fail_after(10):
                    while "cannot duplicate its descriptor" not in caplog.text:
                        await trio.sleep(0.01)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            before = server.connections
            with trio.fail_after(10):
                client = await trio.open_tcp_stream(*listener.getsockname())
                while server.connections == before:  # accepted and handed to a handler
                    await trio.sleep(0.01)
            await client.aclose()
            nursery.cancel_scope.cancel()
        listener.close()


async def test_an_accept_woken_just_before_stop_closes_the_listener_ends_quietly():
    """``stop()`` closes the listeners; an accept loop that meets a closed listener (seen
    once as EBADF when the chaos test restarted its server while clients reconnected) must
    end, not take the server down: here the loop starts on a listener closed before it, and
    the server goes on serving and stops cleanly."""
    async with running_server() as server:
        closed = trio.socket.socket()
        await closed.bind(("127.0.0.1", 0))
        closed.listen()
        closed.close()
        async with trio.open_nursery() as nursery:
            with trio.fail_after(5):
                await server._accept(closed, nursery)  # returns: the listener is gone
        async with raw_connect(server, "alice") as c:  # the real listener still serves
            assert c.welcome is not None and c.welcome.user_id == "alice"
