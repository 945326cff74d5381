"""The invariants (docs/protocol.md, "Invariants") under the conditions that break IM servers:
a crash under load, a reconnect storm, slow and stuck consumers. CI-sized;
``bench/reliability.py`` runs the same at full size.

Servers run as child processes (``seqactor serve`` as a user runs it, or ``tests/_load.py``'s
launcher for settings the CLI has no flag for) so a crash is a real ``kill -9`` and memory is
the server's own RSS. Clients are the SDK (``seqactor.Client``: backoff with jitter, resume
with the sync token).
"""

from __future__ import annotations

import random
from pathlib import Path

import trio

from seqactor import Client, SeqactorError, ServiceClient
from seqactor.store.sqlite import SQLiteStore
from tests._load import (
    Crowd,
    Model,
    ServerProcess,
    check_store_invariants,
    free_port,
    jittered,
    launcher_argv,
    metric_async,
    serve_argv,
    setup_members,
    snapshot,
    stuck_session,
    token,
    view_rows,
    wait_converged,
    wait_reconnected,
    write_secret,
)

CONVERGE_TIMEOUT_S = 60.0


async def _quiet(op):
    try:
        return await op
    except (SeqactorError, trio.TooSlowError):
        return None  # the connection went away mid-request: no acknowledgement


# ---------------------------------------------------------------- crash under load (I1, I3)

CRASH_USERS = 80  # > 64 online members in "all": its pushes go through fan-out rounds
CRASH_GROUP = 8
CRASH_MIN_ALLOC_ACKS = 300
CRASH_MIN_READ_ACKS = 60


class Acks:
    """Every acknowledgement the backend and the users received before the crash."""

    def __init__(self) -> None:
        self.ranges: dict[str, list[tuple[int, int]]] = {}
        self.sender_read: dict[tuple[str, str], int] = {}
        self.read: dict[tuple[str, str], int] = {}
        self.allocs = 0
        self.reads = 0

    def allocated(self, cid: str, first: int, last: int, sender: str | None) -> None:
        self.ranges.setdefault(cid, []).append((first, last))
        if sender:
            key = (cid, sender)
            self.sender_read[key] = max(self.sender_read.get(key, 0), last)
        self.allocs += 1

    def marked(self, cid: str, user: str, read: int) -> None:
        self.read[(cid, user)] = max(self.read.get((cid, user), 0), read)
        self.reads += 1

    def max_last(self, cid: str) -> int:
        return max((last for _f, last in self.ranges.get(cid, [])), default=0)


async def test_kill9_under_load_loses_nothing_acknowledged_and_clients_converge(tmp_path: Path):
    port = free_port()
    db = tmp_path / "seqactor.db"
    secret = write_secret(tmp_path / "secret")
    argv = serve_argv(port, f"sqlite:///{db}", secret)
    log = tmp_path / "server.log"
    users = [f"u{i}" for i in range(CRASH_USERS)]
    groups = {f"g{k}": users[k * CRASH_GROUP:(k + 1) * CRASH_GROUP]
              for k in range(CRASH_USERS // CRASH_GROUP)}
    groups["all"] = users
    acks = Acks()

    server = await ServerProcess.start(argv, log)
    async with trio.open_nursery() as nursery:
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await setup_members(svc, Model(), groups)
        crowd = await nursery.start(Crowd(server.url, users, jittered(0.05, 1.0, seed=1)).run)

        async def backend(seed: int) -> None:
            wrng = random.Random(seed)
            async with ServiceClient.connect(server.url, token("backend", "service"),
                                             request_timeout_s=5) as svc:
                while True:
                    cid = wrng.choice(sorted(groups))
                    sender = wrng.choice([*groups[cid], None])
                    a = await svc.allocate(cid, wrng.randint(1, 3), sender)
                    acks.allocated(cid, a.first_sequence, a.last_sequence, sender)

        async def reader(seed: int) -> None:
            wrng = random.Random(seed)
            while True:
                user = wrng.choice(users)
                client = crowd.clients[user]
                rows = client.rows()
                cid = wrng.choice(sorted(rows))
                target = wrng.choice([rows[cid][0], wrng.randint(0, rows[cid][0] + 3)])
                read = await client.mark_read(cid, target)
                acks.marked(cid, user, read)

        async with trio.open_nursery() as load:
            for i in range(4):
                load.start_soon(_quiet, backend(100 + i))
            for i in range(6):
                load.start_soon(_quiet, reader(200 + i))
            with trio.fail_after(60):
                while acks.allocs < CRASH_MIN_ALLOC_ACKS or acks.reads < CRASH_MIN_READ_ACKS:
                    await trio.sleep(0.01)
            server.kill9()  # mid-load: writes in flight, pushes in flight
            await server.proc.wait()
            await trio.sleep(0.2)  # replies already in the sockets still count as acks
            load.cancel_scope.cancel()
        assert acks.allocs >= CRASH_MIN_ALLOC_ACKS and acks.reads >= CRASH_MIN_READ_ACKS

        # No seq handed out twice before the crash.
        for cid, ranges in acks.ranges.items():
            ranges.sort()
            for (_f1, l1), (f2, _l2) in zip(ranges, ranges[1:], strict=False):
                assert f2 > l1, f"{cid}: seqs acknowledged twice"

        server = await ServerProcess.start(argv, log)  # same file, same port
        durable = await snapshot(server.url, users[0])  # u0 is in g0 and "all"
        probe = {cid: groups[cid][0] for cid in groups}
        for cid, member in probe.items():
            view = durable if member == users[0] else await snapshot(server.url, member)
            assert view[cid][0] >= acks.max_last(cid), f"{cid}: an acknowledged seq was lost"
            probe_max = view[cid][0]
            async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
                a = await svc.allocate(cid, 1)
            # I1: the next allocation follows the last durable one: no reuse, no gap.
            assert a.first_sequence == probe_max + 1

        # I3: every client reconnected by itself and holds exactly the server's view.
        async def fresh() -> dict[str, dict]:
            return {u: await snapshot(server.url, u) for u in users}

        with trio.fail_after(CONVERGE_TIMEOUT_S):
            while True:
                want = await fresh()
                if not crowd.diverged(want):
                    break
                await trio.sleep(0.2)
        for (cid, user), read in {**acks.read, **acks.sender_read}.items():
            assert want[user][cid][1] >= read, f"{user}/{cid}: an acknowledged read was lost"
        assert all(c.stats.connects >= 2 for c in crowd.clients.values())
        nursery.cancel_scope.cancel()

    assert await server.stop() == 0
    store = SQLiteStore(str(db))
    await store.open()
    try:
        maxes = check_store_invariants(store)
        for cid in groups:
            assert maxes[cid] >= acks.max_last(cid) + 1
        for user in users:
            assert view_rows(await store.load_view(user)) == want[user]
    finally:
        await store.aclose()


# ---------------------------------------------------------------- reconnect storm (I3, I5)

STORM_USERS = 500
STORM_GROUP = 10
STORM_ALLOCS_DURING = 200
RSS_SLACK_KB = 40 * 1024


async def _allocate_some(svc: ServiceClient, model: Model, cids: list[str], n: int,
                         rng: random.Random, pause_s: float = 0.0) -> None:
    for _ in range(n):
        cid = rng.choice(cids)
        a = await svc.allocate(cid, rng.randint(1, 3))
        model.allocated(cid, a.last_sequence, a.time_ms)
        if pause_s:
            await trio.sleep(pause_s)


async def test_reconnect_storm_all_sessions_back_memory_returns(tmp_path: Path):
    rng = random.Random(3)
    secret = write_secret(tmp_path / "secret")
    server = await ServerProcess.start(
        serve_argv(free_port(), "memory://", secret), tmp_path / "server.log")
    users = [f"u{i}" for i in range(STORM_USERS)]
    groups = {f"g{k}": users[k * STORM_GROUP:(k + 1) * STORM_GROUP]
              for k in range(STORM_USERS // STORM_GROUP)}
    groups["lobby"] = users  # one big group: fan-out rounds
    cids = sorted(groups)
    model = Model()
    try:
        async with trio.open_nursery() as nursery, \
                ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await setup_members(svc, model, groups)
            crowd = await nursery.start(
                Crowd(server.url, users, jittered(0.1, 2.0, seed=2)).run)
            await _allocate_some(svc, model, cids, 100, rng)
            await wait_converged(crowd, model.views, CONVERGE_TIMEOUT_S)
            await trio.sleep(1.0)
            rss_before = server.rss_kb()

            peak = rss_before
            connects = {u: c.stats.connects for u, c in crowd.clients.items()}
            dropped = crowd.drop_all()
            assert dropped == STORM_USERS
            with trio.fail_after(CONVERGE_TIMEOUT_S):
                async with trio.open_nursery() as storm:
                    storm.start_soon(_allocate_some, svc, model, cids, STORM_ALLOCS_DURING,
                                     rng, 0.002)

                    async def sample() -> None:
                        nonlocal peak
                        while True:
                            peak = max(peak, server.rss_kb())
                            await trio.sleep(0.02)

                    storm.start_soon(sample)
                    await wait_reconnected(crowd, connects, CONVERGE_TIMEOUT_S)
                    await wait_converged(crowd, model.views, CONVERGE_TIMEOUT_S)
                    storm.cancel_scope.cancel()
            assert server.alive()
            assert all(c.stats.connects >= 2 for c in crowd.clients.values())
            # Every client equals the server's own view, not just our model of it.
            for user in rng.sample(users, 25):
                assert crowd.clients[user].rows() == await snapshot(server.url, user)
            await trio.sleep(1.0)
            rss_after = server.rss_kb()
            assert rss_after <= rss_before * 1.5 + RSS_SLACK_KB, (rss_before, peak, rss_after)
            nursery.cancel_scope.cancel()
    finally:
        await server.stop()
    errors = [line for line in server.log_path.read_text().splitlines()
              if '"level": "error"' in line or "Traceback" in line]
    assert not errors, errors[:3]


# ---------------------------------------------------------------- slow and stuck consumers (I5)

SERVED_USERS = 100
STUCK_USERS = 20
SLOW_GROUPS = 10
WRITE_TIMEOUT_S = 1.0


async def test_stuck_consumers_are_closed_others_served_memory_bounded(tmp_path: Path):
    rng = random.Random(5)
    mport = free_port()
    server = await ServerProcess.start(
        launcher_argv(free_port(), "memory://", write_timeout_s=WRITE_TIMEOUT_S,
                      metrics_port=mport),
        tmp_path / "server.log")
    served = [f"s{i}" for i in range(SERVED_USERS)]
    stuck = [f"x{i}" for i in range(STUCK_USERS)]
    per = SERVED_USERS // SLOW_GROUPS
    # Long ids make big frames; every stuck user follows every group.
    groups = {f"{k:02d}-" + "g" * 110: served[k * per:(k + 1) * per] + stuck
              for k in range(SLOW_GROUPS)}
    cids = sorted(groups)
    model = Model()
    try:
        async with trio.open_nursery() as nursery, \
                ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await setup_members(svc, model, groups)
            crowd = await nursery.start(
                Crowd(server.url, served, jittered(0.1, 2.0, seed=3)).run)
            await trio.sleep(0.5)
            rss_before = server.rss_kb()
            stuck_conns = [await stuck_session(nursery, server.port, u) for u in stuck]
            assert await metric_async(mport, "seqactor_sessions") == SERVED_USERS + STUCK_USERS + 1
            peak = rss_before
            with trio.fail_after(CONVERGE_TIMEOUT_S):
                while await metric_async(mport, "seqactor_session_closes_total",
                                         '{code="1001"}') < STUCK_USERS:
                    await _allocate_some(svc, model, cids, 50, rng)
                    peak = max(peak, server.rss_kb())
                    # Meanwhile the served sessions keep up (I5: nobody waits on the stuck).
                    await wait_converged(crowd, model.views, 10.0)
            await _allocate_some(svc, model, cids, 50, rng)
            await wait_converged(crowd, model.views, CONVERGE_TIMEOUT_S)
            assert await metric_async(mport, "seqactor_sessions") == SERVED_USERS + 1
            assert all(c.stats.connects == 1 for c in crowd.clients.values())  # never dropped
            await trio.sleep(0.5)
            rss_after = server.rss_kb()
            assert rss_after <= rss_before * 1.5 + RSS_SLACK_KB, (rss_before, peak, rss_after)
            assert peak <= rss_before * 2 + RSS_SLACK_KB, (rss_before, peak)
            for conn in stuck_conns:
                with trio.move_on_after(1):
                    await conn.aclose()
            nursery.cancel_scope.cancel()
    finally:
        await server.stop()


async def test_sdk_client_rides_out_a_stuck_phase_of_its_own(tmp_path: Path):
    """A client that stopped reading (a frozen app) is closed after the write timeout and,
    once it reads again, reconnects and converges: being slow costs a resync, never data."""
    mport = free_port()
    server = await ServerProcess.start(
        launcher_argv(free_port(), "memory://", write_timeout_s=WRITE_TIMEOUT_S,
                      metrics_port=mport),
        tmp_path / "server.log")
    cid = "big-" + "x" * 100
    model = Model()
    try:
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await setup_members(svc, model, {cid: ["frozen"]})
            async with Client.connect(server.url, token("frozen"), device_id="d",
                                      backoff=jittered(0.05, 0.5)(0)) as client:
                link = client._link
                assert link is not None
                # Freeze: the client's reader stops (its frames pile up in the kernel).
                frozen = trio.Event()
                original = link.conn.get_message

                async def stalled():
                    await frozen.wait()
                    return await original()

                link.conn.get_message = stalled  # type: ignore[method-assign]
                with trio.fail_after(CONVERGE_TIMEOUT_S):
                    while await metric_async(mport, "seqactor_session_closes_total",
                                             '{code="1001"}') < 1:
                        await _allocate_some(svc, model, [cid], 200, random.Random(1))
                frozen.set()
                await _allocate_some(svc, model, [cid], 5, random.Random(2))
                with trio.fail_after(CONVERGE_TIMEOUT_S):
                    while not (client.connected and client.rows() == model.views()["frozen"]):
                        await trio.sleep(0.05)
                assert client.stats.connects >= 2
    finally:
        await server.stop()
