"""The Python SDK against a real in-process server: view, pushes, cache, reconnect, errors."""

from __future__ import annotations

import logging
import pydoc
import random
import statistics
import time

import msgpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from seqactor import (
    AuthenticationError,
    Backoff,
    Client,
    ConnectError,
    ConnectionLost,
    Conversation,
    ErrorCode,
    Forbidden,
    NotFound,
    ServiceClient,
    SessionReplaced,
    unread_count,
)
from seqactor.auth import issue_token
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server
from seqactor.store import open_store
from tests._harness import SECRET, running_server, token
from tests._proxy import running_proxy

FAST = dict(backoff_base=0.02, backoff_cap=0.2)


def fast_backoff(seed: int = 0) -> Backoff:
    return Backoff(0.02, 0.2, rng=random.Random(seed))


async def setup(url: str, convs: dict[str, list[str]], allocs: int = 0) -> None:
    async with ServiceClient.connect(url, token("backend", "service")) as svc:
        for cid, users in convs.items():
            await svc.add_members(cid, users)
            if allocs:
                await svc.allocate(cid, allocs)


def rows_of(view) -> dict[str, tuple[int, int, int, int]]:
    return {
        cid: (view.max_seq[i], view.read_seq[i], view.min_seq[i], view.time_ms[i])
        for i, cid in enumerate(view.conversation_ids)
    }


# ---------------------------------------------------------------------------- backoff


def test_help_shows_connect_as_an_async_context_manager():
    """``help(Client.connect)`` tells a newcomer what ``connect`` returns: something for
    ``async with``, not an async iterator (what a decorated generator's signature said)."""
    for cls in (Client, ServiceClient):
        text = pydoc.render_doc(cls.connect, renderer=pydoc.plaintext)
        assert f"AbstractAsyncContextManager[{cls.__name__}]" in text, text
        assert "AsyncIterator" not in text and f"async with {cls.__name__}.connect(" in text


def test_backoff_full_jitter_bounded_spread_and_reset():
    b = Backoff(base_s=0.1, cap_s=2.0, stable_after_s=5.0, rng=random.Random(7))
    ceilings = []
    for _ in range(12):
        ceiling = b.ceiling()
        ceilings.append(ceiling)
        delay = b.next_delay()
        assert 0.0 <= delay <= ceiling <= 2.0
    assert ceilings[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert ceilings[5:] == [2.0] * 7  # capped
    # spread: at the cap, 200 delays cover the range rather than clustering
    delays = [b.next_delay() for _ in range(200)]
    assert min(delays) < 0.2 and max(delays) > 1.8
    assert statistics.pstdev(delays) > 0.4
    # a short-lived connection does not reset; a stable one does
    b.connected(100.0)
    b.disconnected(101.0)
    assert b.ceiling() == 2.0
    b.connected(200.0)
    b.disconnected(205.0)
    assert b.attempt == 0 and b.ceiling() == pytest.approx(0.1)
    # GoAway: never earlier than asked, a little spread
    waits = [b.goaway_delay(1.0) for _ in range(50)]
    assert all(1.0 <= w <= 1.25 for w in waits) and len(set(waits)) > 40


def test_backoff_rejects_bad_bounds():
    with pytest.raises(ValueError):
        Backoff(base_s=0, cap_s=1)
    with pytest.raises(ValueError):
        Backoff(base_s=2, cap_s=1)


# ---------------------------------------------------------------------------- view & pushes


async def test_snapshot_pushes_changes_and_total_unread():
    async with running_server() as server:
        await setup(server.url, {"g1": ["alice", "bob"], "g2": ["alice"]}, allocs=2)
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            async with Client.connect(server.url, token("alice")) as alice:
                assert alice.user_id == "alice"
                assert alice.last_sync.full and not alice.last_sync.since_token
                assert set(alice.view) == {"g1", "g2"}
                # members added before the allocations: 2 unread in each
                assert alice.total_unread == 4 and alice.get("g2").unread == 2
                assert alice.get("g1").max_sequence == 2 and alice.get("nope") is None
                stream = alice.changes()
                await svc.allocate("g1", 3, sender_user_id="bob")
                with trio.fail_after(5):
                    batch = await stream.__anext__()
                (change,) = batch.changes
                assert change.conversation_id == "g1"
                assert change.old.max_sequence == 2 and change.new.max_sequence == 5
                assert change.new.read_sequence == 0 and change.new.unread == 5
                assert batch.total_unread == alice.total_unread == 7
                # MarkRead: the Ack's effective value (clamped to max) is applied
                assert await alice.mark_read("g1", 99) == 5
                assert alice.get("g1").read_sequence == 5 and alice.total_unread == 2
                with trio.fail_after(5):
                    batch = await stream.__anext__()
                assert batch.changes[0].new.read_sequence == 5 and batch.total_unread == 2
                # a conversation joining and leaving the view
                await svc.add_members("g3", ["alice"])
                await svc.allocate("g3", 4)
                with trio.fail_after(5):
                    while "g3" not in alice or alice.get("g3").max_sequence != 4:
                        await stream.__anext__()
                # a new member's read starts at the max of the join; 4 allocated after it
                assert alice.get("g3").unread == 4 and alice.total_unread == 6
                stream = alice.changes()  # a fresh stream: only what happens from here
                await svc.remove_members("g3", ["alice"])
                with trio.fail_after(5):
                    batch = await stream.__anext__()
                gone = [c for c in batch.changes if c.conversation_id == "g3"]
                assert gone and gone[0].new is None and gone[0].old.max_sequence == 4
                assert "g3" not in alice and alice.total_unread == 2
                # pushes for an `all` subscription move the resume point
                assert alice.sync_token
                # explicit GetSequences: ids outside the view are simply absent
                got = await alice.fetch(["g1", "g3", "elsewhere"])
                assert set(got) == {"g1"}
                with pytest.raises(Forbidden) as info:
                    await alice.mark_read("elsewhere", 1)
                assert info.value.code == ErrorCode.FORBIDDEN


def spec_unread(max_seq: int, read_seq: int, min_seq: int) -> int:
    """docs/protocol.md "Unread", written out literally."""
    if min_seq > 0:
        return max(0, max_seq - max(read_seq, min_seq - 1))
    return max(0, max_seq - read_seq)


UINT64 = st.integers(min_value=0, max_value=2**64 - 1)


@given(max_seq=UINT64, read_seq=UINT64, min_seq=UINT64)
def test_unread_is_the_protocol_formula(max_seq: int, read_seq: int, min_seq: int) -> None:
    expected = spec_unread(max_seq, read_seq, min_seq)
    assert unread_count(max_seq, read_seq, min_seq) == expected
    assert Conversation("c", max_seq, read_seq, min_seq, 0).unread == expected


async def test_unread_never_counts_cleared_history():
    """max 11, SetMinSequence(10), a member who read 2: only seqs 10 and 11 are readable, so
    unread is 2 — in the view, the total, and the change stream's values."""
    async with running_server() as server:
        await setup(server.url, {"g": ["alice"], "h": ["alice"]})
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc, \
                Client.connect(server.url, token("alice")) as alice:
            stream = alice.changes()
            await svc.allocate("g", 11)
            await svc.allocate("h", 1)
            with trio.fail_after(5):
                while alice.get("g").max_sequence != 11 or "h" not in alice \
                        or alice.get("h").max_sequence != 1:
                    await stream.__anext__()
            await alice.mark_read("g", 2)
            assert alice.get("g").unread == 9 and alice.total_unread == 10
            await svc.set_min_sequence("g", 10)
            with trio.fail_after(5):
                while True:
                    batch = await stream.__anext__()
                    mine = [c for c in batch.changes if c.conversation_id == "g"]
                    if mine and mine[-1].new.min_sequence == 10:
                        break
            assert mine[-1].new.unread == 2
            assert batch.total_unread == 3
            assert alice.get("g").unread == 2 and alice.total_unread == 3
            # reading into the cleared range counts as usual
            await alice.mark_read("g", 10)
            assert alice.get("g").unread == 1 and alice.total_unread == 2


async def test_multi_device_read_sync_and_background():
    async with running_server() as server:
        await setup(server.url, {"d": ["carol", "dave"]})
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc, \
                Client.connect(server.url, token("carol"), device_id="phone") as phone, \
                Client.connect(server.url, token("carol"), device_id="laptop") as laptop:
            await svc.allocate("d", 6)
            with trio.fail_after(5):
                while phone.total_unread != 6 or laptop.total_unread != 6:
                    await trio.sleep(0.01)
            await laptop.set_background(True)
            await phone.mark_read("d", 4)
            await svc.allocate("d", 1)
            await trio.sleep(0.2)
            assert laptop.get("d").max_sequence == 6  # held while in background
            await laptop.set_background(False)
            with trio.fail_after(5):
                while laptop.get("d") != phone.get("d"):
                    await trio.sleep(0.01)
            assert laptop.get("d").read_sequence == 4 and laptop.total_unread == 3


# ---------------------------------------------------------------------------- cache


async def test_cache_restart_resumes_with_a_delta(tmp_path):
    cache = tmp_path / "alice.cache"
    async with running_server() as server:
        convs = {f"c{i:02}": ["alice"] for i in range(50)}
        await setup(server.url, convs, allocs=1)
        async with Client.connect(server.url, token("alice"), cache_path=cache) as c:
            assert c.last_sync.full and c.last_sync.conversations == 50
            # the decoder's records are stored as plain tuples (what rows() promises)
            assert {type(row) for row in c.rows().values()} == {tuple}
        assert cache.exists()
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await svc.allocate("c07", 2)
            await svc.allocate("c31", 1)
            await svc.remove_members("c40", ["alice"])
        async with Client.connect(server.url, token("alice"), cache_path=cache) as c:
            # before the sync reply arrived the cached view was already there; the server
            # answered the cached token with a delta of just what changed
            sync = c.last_sync
            assert sync.since_token and not sync.full
            assert sync.conversations == 2 and sync.removed == 1
            assert c.get("c07").max_sequence == 3 and "c40" not in c and len(c) == 49
            assert c.rows() == rows_of(await server.store.load_view("alice"))
            assert {type(row) for row in c.rows().values()} == {tuple}


async def test_keep_history_row_is_frozen_across_pushes_resume_cache_and_rejoin(tmp_path):
    """Removed with keep_history: the online client sees the row freeze (``frozen``), later
    messages leave its max alone, a resume from before the freeze and a fresh snapshot mark
    it, the cache keeps it; re-added: ``frozen`` is False again and pushes resume."""
    cache = tmp_path / "alice.cache"
    async with running_server() as server:
        await setup(server.url, {"g": ["alice", "bob"], "h": ["alice"]}, allocs=5)
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            async with Client.connect(server.url, token("alice"), cache_path=cache) as c:
                assert c.get("g").frozen is False  # the cache now holds a pre-freeze token
            async with Client.connect(server.url, token("alice"), device_id="live") as live:
                stream = live.changes()
                await svc.remove_members("g", ["alice"], keep_history=True)
                with trio.fail_after(5):
                    batch = await stream.__anext__()
                (change,) = batch.changes
                assert change.old.frozen is False and change.new.frozen is True
                assert live.get("g").frozen is True and live.get("g").max_sequence == 5
                await svc.allocate("g", 3)
                await svc.allocate("h", 1)  # pushed after g's allocation, if that were pushed
                with trio.fail_after(5):
                    while live.get("h").max_sequence != 6:
                        await stream.__anext__()
                assert live.get("g").max_sequence == 5 and live.get("g").unread == 5
                assert await live.mark_read("g") == 5  # a frozen row can still be read
                assert live.get("g").frozen is True and live.get("g").unread == 0
                # a resume across the freeze (the cached token is from before it)
                async with Client.connect(server.url, token("alice"), cache_path=cache) as c:
                    assert c.last_sync.since_token and not c.last_sync.full
                    assert c.get("g").frozen is True and not c.get("h").frozen
                # the cache keeps it (format version 2)
                assert Client(server.url, token("alice"), cache_path=cache).get("g").frozen
                # a fresh client's snapshot marks it
                async with Client.connect(server.url, token("alice"), device_id="new") as c:
                    assert c.last_sync.full
                    assert c.get("g").frozen is True and c.get("g").max_sequence == 5
                    assert not c.get("h").frozen
                # re-added: a member again, at the current max, and pushes resume
                await svc.add_members("g", ["alice"])
                with trio.fail_after(5):
                    while live.get("g").frozen:
                        await stream.__anext__()
                assert live.get("g").max_sequence == 8 and live.get("g").read_sequence == 8
                await svc.allocate("g", 1)
                with trio.fail_after(5):
                    while live.get("g").max_sequence != 9:
                        await stream.__anext__()
                assert live.get("g").frozen is False


def test_cache_of_version_1_is_ignored(tmp_path, caplog):
    """A cache written before ``frozen`` existed (version 1) is ignored with a warning."""
    from seqactor.client import _cache

    old = tmp_path / "v1.cache"
    old.write_bytes(msgpack.packb({
        "format": _cache.CACHE_FORMAT, "version": 1, "user": "u", "url": "ws://x/v1",
        "token": b"t", "view": {"c": [1, 0, 0, 5]},
    }, use_bin_type=True))
    with caplog.at_level(logging.WARNING, logger="seqactor.client"):
        assert _cache.load(old) is None
    assert "cache version 1 is not 2" in caplog.text


@pytest.mark.parametrize("content", [
    b"\x00garbage\xff" * 10,
    msgpack.packb({"some": "other app's file"}),
    b'{"json": true}',
    b"",
])
async def test_corrupt_or_foreign_cache_is_ignored(tmp_path, caplog, content):
    cache = tmp_path / "c.cache"
    cache.write_bytes(content)
    async with running_server() as server:
        await setup(server.url, {"x": ["alice"]}, allocs=3)
        with caplog.at_level(logging.WARNING, logger="seqactor.client"):
            async with Client.connect(server.url, token("alice"), cache_path=cache) as c:
                assert c.last_sync.full and not c.last_sync.since_token
                assert c.get("x").max_sequence == 3
        assert "ignored" in caplog.text
    # the next start finds a valid cache again
    from seqactor.client import _cache

    assert _cache.load(cache).user == "alice"


async def test_cache_of_another_user_is_not_resumed(tmp_path, caplog):
    cache = tmp_path / "shared.cache"
    async with running_server() as server:
        await setup(server.url, {"a1": ["alice"], "b1": ["bob"]}, allocs=1)
        async with Client.connect(server.url, token("alice"), cache_path=cache):
            pass
        with caplog.at_level(logging.WARNING, logger="seqactor.client"):
            async with Client.connect(server.url, token("bob"), cache_path=cache) as c:
                assert c.last_sync.full and set(c.view) == {"b1"}
        assert "belongs to user 'alice'" in caplog.text


# ---------------------------------------------------------------------------- heartbeat


# Heartbeat tests run on trio's MockClock: virtual time jumps to the next timer only after
# every task has been idle this long in real time (loopback bytes in flight land well within
# it), so a busy machine cannot stretch the intervals the client measures.
AUTOJUMP_S = 0.01


async def test_ping_only_when_idle(mock_clock):
    """One Ping per heartbeat interval of silence, none while the client's own traffic flows."""
    mock_clock.autojump_threshold = AUTOJUMP_S
    interval = 0.1
    async with running_server(heartbeat_interval_s=interval) as server:
        await setup(server.url, {"p": ["erin"]}, allocs=1)
        async with Client.connect(server.url, token("erin")) as idle:
            before = idle.stats.pings_sent
            await trio.sleep(7.5 * interval)
            assert 7 <= idle.stats.pings_sent - before <= 8  # one per interval of silence
            # with the client's own traffic flowing, no pings at all
            before = idle.stats.pings_sent
            for _ in range(25):
                await idle.mark_read("p", 1)
                await trio.sleep(interval / 3)
            assert idle.stats.pings_sent - before == 0
            assert idle.connected and idle.stats.connects == 1  # the server never timed us out


async def test_background_pings_less_often(mock_clock):
    mock_clock.autojump_threshold = AUTOJUMP_S
    interval = 0.05
    async with running_server(heartbeat_interval_s=interval) as server:
        async with Client.connect(server.url, token("fred")) as c:
            await c.set_background(True)
            before = c.stats.pings_sent
            await trio.sleep(12.5 * interval)  # a ping every 4 intervals in background
            assert 3 <= c.stats.pings_sent - before <= 4
            assert c.stats.connects == 1 and c.connected


# ---------------------------------------------------------------------------- reconnects


def _server(store_url: str = "memory://", **kw) -> Server:
    cfg = ServerConfig(host="127.0.0.1", port=0, **kw)
    return Server(cfg, open_store(store_url), SECRET)


async def test_goaway_is_honoured_and_resume_is_a_delta(tmp_path):
    db = f"sqlite:///{tmp_path}/g.db"
    async with trio.open_nursery() as nursery:
        first = _server(db, goaway_reconnect_after_ms=400)
        first_closed = trio.Event()

        async def serve_first(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await first.serve(task_status=task_status)
            finally:
                first_closed.set()

        await nursery.start(serve_first)
        await setup(first.url, {"k": ["gina"], "l": ["gina"]}, allocs=2)
        async with running_proxy(first.port) as proxy:
            async with Client.connect(proxy.url, token("gina"), backoff=fast_backoff()) as c:
                c_before = c.stats.connects
                started = trio.current_time()
                first.stop()
                with trio.fail_after(5):
                    while c.stats.goaways == 0:
                        await trio.sleep(0.005)
                seen = trio.current_time()
                # one server per SQLite file: the replacement opens it once the old one closed it
                with trio.fail_after(5):
                    await first_closed.wait()
                second = _server(db, goaway_reconnect_after_ms=400)
                await nursery.start(second.serve)
                proxy.target_port = second.port
                with trio.fail_after(5):
                    while c.stats.connects == c_before or not c.connected:
                        await trio.sleep(0.005)
                waited = trio.current_time() - seen
                assert waited >= 0.4 - 0.02, waited
                assert trio.current_time() - started < 2.0
                # same SQLite file: same epoch, the token resumes with an empty delta
                assert not c.last_sync.full and c.last_sync.since_token
                assert c.last_sync.conversations == 0
                second.stop()
        nursery.cancel_scope.cancel()


async def test_reconnects_after_cuts_and_full_snapshot_replaces_on_new_epoch():
    async with trio.open_nursery() as nursery:
        first = _server()
        await nursery.start(first.serve)
        await setup(first.url, {"old": ["hank"], "both": ["hank"]}, allocs=1)
        async with running_proxy(first.port) as proxy:
            async with Client.connect(proxy.url, token("hank"), backoff=fast_backoff()) as c:
                assert set(c.view) == {"old", "both"}
                for _ in range(3):
                    proxy.cut_all()
                    with trio.fail_after(5):
                        while not c.connected or c.stats.connects < 2:
                            await trio.sleep(0.01)
                assert c.stats.connects >= 2
                # a new store (memory://: new epoch): the token is unusable -> full snapshot
                second = _server()
                await nursery.start(second.serve)
                await setup(second.url, {"both": ["hank"], "new": ["hank"]}, allocs=5)
                proxy.target_port = second.port
                first.stop()
                with trio.fail_after(5):
                    while set(c.view) != {"both", "new"}:
                        await trio.sleep(0.01)
                assert c.last_sync.full and c.last_sync.since_token
                assert c.get("both").max_sequence == 5
                second.stop()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- fatal errors


async def test_bad_token_surfaces_authentication_error():
    async with running_server() as server:
        with pytest.raises(AuthenticationError, match="authentication failed"):
            async with Client.connect(server.url, "not-a-token"):
                pass
        with pytest.raises(AuthenticationError):
            expired = issue_token(SECRET, "svc", role="service", ttl_s=60,
                                  now=time.time() - 120)  # expired a minute ago
            async with ServiceClient.connect(server.url, expired):
                pass


async def test_auth_failure_on_reconnect_stops_and_raises():
    tokens = [token("ivy"), "expired-garbage", "expired-garbage", token("ivy")]
    calls = []

    def provider() -> str:
        calls.append(1)
        return tokens[min(len(calls) - 1, len(tokens) - 1)]

    async with running_server() as server, running_proxy(server.port) as proxy:
        with pytest.raises(AuthenticationError):
            async with Client.connect(proxy.url, provider, backoff=fast_backoff()) as c:
                proxy.cut_all()
                with trio.fail_after(5):
                    await trio.sleep_forever()
        # one retry with a fresh token from the provider, then no more attempts
        assert len(calls) == 3
        assert isinstance(c.error, AuthenticationError)


async def test_session_replaced_stops_and_raises():
    async with running_server() as server:
        with pytest.raises(SessionReplaced):
            async with Client.connect(server.url, token("jo"), device_id="tab") as first:
                async with Client.connect(server.url, token("jo"), device_id="tab"):
                    with trio.fail_after(5):
                        await trio.sleep_forever()
        assert first.stats.connects == 1


async def test_first_connect_errors_are_clear():
    with pytest.raises(ConnectError, match="connection refused"):
        async with Client.connect("ws://127.0.0.1:1/v1", "t"):
            pass
    with pytest.raises(ConnectError, match="bad URL"):
        async with Client.connect("http://example.com/v1", "t"):
            pass
    async with running_server() as server:
        with pytest.raises(ConnectError, match="HTTP 404"):
            async with Client.connect(f"ws://127.0.0.1:{server.port}/nope", token("k")):
                pass


async def test_offline_ok_starts_from_cache_and_connects_later(tmp_path):
    cache = tmp_path / "o.cache"
    async with trio.open_nursery() as nursery:
        server = _server()
        await nursery.start(server.serve)
        await setup(server.url, {"o": ["lena"]}, allocs=2)
        async with running_proxy(server.port) as proxy:
            async with Client.connect(proxy.url, token("lena"), cache_path=cache):
                pass
            proxy.target_port = 1  # nothing listens there: connections fail
            async with Client.connect(
                proxy.url, token("lena"), cache_path=cache, offline_ok=True,
                backoff=fast_backoff(),
            ) as c:
                assert not c.connected and c.get("o").max_sequence == 2
                await trio.sleep(0.1)
                assert c.last_error
                proxy.target_port = server.port
                with trio.fail_after(5):
                    await c.wait_synced()
                assert not c.last_sync.full
        server.stop()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------- service client


async def test_service_requests_in_flight_concurrently():
    async with running_server() as server:
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await svc.add_members("room", ["mia"])
            results = []

            async def one() -> None:
                results.append(await svc.allocate("room", 2))

            async with trio.open_nursery() as n:
                for _ in range(60):
                    n.start_soon(one)
            ranges = sorted((a.first_sequence, a.last_sequence) for a in results)
            assert ranges == [(1 + 2 * i, 2 + 2 * i) for i in range(60)]
            with pytest.raises(NotFound) as info:
                await svc.remove_members("no-such-room", ["mia"])
            assert info.value.code == ErrorCode.NOT_FOUND
            await svc.set_min_sequence("room", 10)
        async with ServiceClient.connect(server.url, token("mia")) as not_service:
            with pytest.raises(Forbidden):
                await not_service.allocate("room")


async def test_service_request_in_flight_fails_on_drop_then_reconnects():
    async with running_server() as server, running_proxy(server.port) as proxy:
        async with ServiceClient.connect(
            proxy.url, token("backend", "service"), backoff=fast_backoff()
        ) as svc:
            await svc.allocate("z")
            proxy.pause()
            failures = []

            async def doomed() -> None:
                with pytest.raises(ConnectionLost) as info:
                    await svc.allocate("z")
                failures.append(info.value)

            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(doomed)
                await trio.sleep(0.1)
                proxy.cut_all()
                proxy.resume()
            assert len(failures) == 3 and "in flight" in str(failures[0])
            with trio.fail_after(5):
                a = await svc.allocate("z")
            assert a.first_sequence >= 2
