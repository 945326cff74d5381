"""I3 under chaos: clients behind a fault-injecting proxy converge to the server's view.

A real server on a SQLite file, several clients connected through ``tests/_proxy.py`` (which
cuts their connections at random), a backend (ServiceClient) allocating, adding and removing
members and raising min seqs, clients marking read; midway the server is restarted on the
same file (the proxies keep their ports and follow it). At the end every client's view must
equal the store's view of its user, field for field.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable

import pytest
import trio

from seqactor import Backoff, Client, SeqactorError, ServiceClient
from seqactor._proto import seqactor_pb2 as pb
from seqactor.server.config import ServerConfig
from seqactor.server.gateway import Server
from seqactor.store import open_store
from tests._harness import SECRET, token
from tests._proxy import Proxy

USERS = [f"u{i}" for i in range(6)]
CONVERSATIONS = [f"c{i}" for i in range(20)]
CHAOS_S = 3.0
RESTART_AT_S = 1.4
SETTLE_TIMEOUT_S = 15.0


def _config(store_url: str) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1", port=0, goaway_reconnect_after_ms=100, rate_limit_ops_per_s=100_000.0,
        rate_limit_burst_ops=100_000, shutdown_grace_s=1.0,
    )


class ServerRunner:
    """Starts a Server on the SQLite file; restart() stops it and starts a new one."""

    def __init__(self, nursery: trio.Nursery, store_url: str) -> None:
        self.nursery = nursery
        self.store_url = store_url
        self.server: Server | None = None
        self._done: trio.Event | None = None

    async def start(self) -> Server:
        server = Server(_config(self.store_url), open_store(self.store_url), SECRET)
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await server.serve(task_status=task_status)
            finally:
                done.set()

        await self.nursery.start(run)
        self.server, self._done = server, done
        return server

    async def stop(self) -> None:
        assert self.server is not None and self._done is not None
        self.server.stop()
        await self._done.wait()

    async def restart(self) -> Server:
        await self.stop()
        return await self.start()


def _expected(view) -> dict[str, tuple[int, int, int, int]]:
    return {
        cid: (view.max_seq[i], view.read_seq[i], view.min_seq[i], view.time_ms[i])
        for i, cid in enumerate(view.conversation_ids)
    }


def _frozen_in_store(view) -> set[str]:
    return {cid for i, cid in enumerate(view.conversation_ids) if view.frozen[i]}


def _frozen_in_client(client: Client) -> set[str]:
    return {cid for cid, c in client.view.items() if c.frozen}


async def _quiet(op: Awaitable[object]) -> None:
    try:
        await op
    except (SeqactorError, trio.TooSlowError):
        pass  # a lost request or a refused op is part of the chaos


@pytest.mark.parametrize("seed", [11, 22, 33])
async def test_clients_converge_under_chaos(tmp_path, seed):
    with trio.fail_after(40):
        await _scenario(tmp_path, seed)


async def _scenario(tmp_path, seed):
    rng = random.Random(seed)
    store_url = f"sqlite:///{tmp_path}/seqactor.db"
    async with trio.open_nursery() as nursery:
        runner = ServerRunner(nursery, store_url)
        server = await runner.start()
        client_proxy, backend_proxy = Proxy(server.port), Proxy(server.port)
        await nursery.start(client_proxy.serve)
        await nursery.start(backend_proxy.serve)

        members: dict[str, set[str]] = {c: set() for c in CONVERSATIONS}
        async with ServiceClient.connect(
            backend_proxy.url, token("backend", "service"),
            backoff=Backoff(0.02, 0.3, rng=random.Random(seed)), request_timeout_s=5.0,
        ) as svc:
            for cid in CONVERSATIONS:
                users = rng.sample(USERS, rng.randint(2, 4))
                members[cid].update(users)
                await svc.add_members(cid, users)
                await svc.allocate(cid, rng.randint(1, 5))

            clients: list[Client] = []
            async with trio.open_nursery() as cn:
                # each user one client, u0 and u1 two devices
                devices = [(u, "a") for u in USERS] + [("u0", "b"), ("u1", "b")]

                async def run_client(user: str, device: str, ready: trio.Event) -> None:
                    async with Client.connect(
                        client_proxy.url, token(user), device_id=device,
                        backoff=Backoff(0.02, 0.3, rng=random.Random(f"{seed}{user}{device}")),
                    ) as client:
                        clients.append(client)
                        ready.set()
                        await trio.sleep_forever()

                for user, device in devices:
                    ready = trio.Event()
                    cn.start_soon(run_client, user, device, ready)
                    await ready.wait()

                work_done = trio.Event()

                async def backend_worker(wrng: random.Random) -> None:
                    while not work_done.is_set():
                        cid = wrng.choice(CONVERSATIONS)
                        roll = wrng.random()
                        if roll < 0.65:
                            sender = wrng.choice(sorted(members[cid]) + [""])
                            await _quiet(svc.allocate(
                                cid, wrng.randint(1, 3), sender or None))
                        elif roll < 0.78:
                            user = wrng.choice(USERS)
                            members[cid].add(user)
                            await _quiet(svc.add_members(cid, [user]))
                        elif roll < 0.9:
                            user = wrng.choice(USERS)
                            members[cid].discard(user)
                            await _quiet(svc.remove_members(
                                cid, [user], keep_history=wrng.random() < 0.5))
                        else:
                            await _quiet(svc.set_min_sequence(
                                cid, wrng.randint(0, 8)))
                        await trio.sleep(wrng.uniform(0.001, 0.01))

                async def reader(client: Client, wrng: random.Random) -> None:
                    while not work_done.is_set():
                        await trio.sleep(wrng.uniform(0.01, 0.05))
                        rows = client.rows()
                        if not rows:
                            continue
                        cid = wrng.choice(sorted(rows))
                        seq = wrng.randint(0, rows[cid][0] + 1)
                        with trio.move_on_after(1.0):
                            await _quiet(client.mark_read(cid, seq))

                async def chaos() -> None:
                    start = trio.current_time()
                    restarted = False
                    while trio.current_time() - start < CHAOS_S:
                        await trio.sleep(rng.uniform(0.02, 0.12))
                        if not restarted and trio.current_time() - start > RESTART_AT_S:
                            restarted = True
                            new = await runner.restart()
                            client_proxy.target_port = backend_proxy.target_port = new.port
                        elif rng.random() < 0.1:
                            client_proxy.cut_all()
                        else:
                            client_proxy.cut_random(rng)
                    work_done.set()

                async with trio.open_nursery() as work:
                    for i in range(3):
                        work.start_soon(backend_worker, random.Random(seed * 100 + i))
                    for i, client in enumerate(clients):
                        work.start_soon(reader, client, random.Random(seed * 1000 + i))
                    work.start_soon(chaos)

                # quiescence: every client must reach the store's exact view
                store = runner.server.store
                with trio.move_on_after(SETTLE_TIMEOUT_S):
                    while True:
                        diffs = []
                        for client in clients:
                            view = await store.load_view(client.user_id)
                            if (not client.connected or client.rows() != _expected(view)
                                    or _frozen_in_client(client) != _frozen_in_store(view)):
                                diffs.append(client)
                        if not diffs:
                            break
                        await trio.sleep(0.05)
                for client in clients:
                    view = await store.load_view(client.user_id)
                    want = _expected(view)
                    assert client.rows() == want, f"{client.user_id}/{client.device_id} diverged"
                    # I3 holds for membership too: frozen rows exactly where the store has them
                    assert _frozen_in_client(client) == _frozen_in_store(view), client.user_id
                    assert client.total_unread == sum(
                        max(0, m - max(r, n - 1)) if n else max(0, m - r)
                        for m, r, n, _ in want.values()
                    )
                    assert client.error is None
                assert client_proxy.cuts > 5
                assert sum(c.stats.connects for c in clients) > len(clients) + 5
                assert any(not s.full and s.since_token for c in clients for s in c.syncs), \
                    "no client resumed with a delta"
                cn.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ regressions found by chaos


async def test_push_overtaking_the_resume_reply_never_moves_the_resume_point():
    """Seed 33's divergence, with the frames put in order by the proxy instead of by luck.

    The link is cut at token T1; offline, the user is removed from c18; the client reconnects
    and asks for ``since = T1``; a push carrying a newer token T2 arrives before the resume
    reply; the link is cut before that reply. The next resume must still start from T1, so
    the ``removed`` for c18 arrives and the client ends with exactly the server's view.
    """
    async with trio.open_nursery() as nursery:
        runner = ServerRunner(nursery, "memory://")
        server = await runner.start()
        proxy = Proxy(server.port)
        await nursery.start(proxy.serve)
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            await svc.add_members("c18", ["u2", "u3"])
            await svc.add_members("c5", ["u2", "u3"])
            await svc.allocate("c5", 2)
            async with Client.connect(
                proxy.url, token("u2"), device_id="a", backoff=Backoff(0.01, 0.05),
            ) as client:
                await client.wait_synced()
                assert set(client.rows()) == {"c18", "c5"}
                t1 = client.sync_token
                syncs = len(client.syncs)

                removal_done, release_resume = trio.Event(), trio.Event()
                resume_ids: list[int] = []
                phase = ["hold"]

                async def tap(direction: str, payload: bytes) -> bool:
                    if phase[0] == "pass":
                        return True
                    if direction == "up":
                        msg = pb.ClientMessage.FromString(payload)
                        kind = msg.WhichOneof("body")
                        if kind == "hello":
                            await removal_done.wait()  # the removal happens while offline
                        elif kind == "get_sequences" and msg.get_sequences.since:
                            resume_ids.append(msg.request_id)
                            await release_resume.wait()  # a push goes out before the reply
                        return True
                    reply = pb.ServerMessage.FromString(payload)
                    if resume_ids and reply.request_id == resume_ids[0]:
                        phase[0] = "pass"  # the next connection goes through untouched
                        return False  # cut before the resume reply reaches the client
                    return True

                proxy.tap = tap
                proxy.cut_all()
                await svc.remove_members("c18", ["u2"])
                removal_done.set()
                with trio.fail_after(10):
                    while not resume_ids:
                        await trio.sleep(0.005)
                # the session is subscribed (Subscribe went through): this push carries T2
                stream = client.changes()
                await svc.allocate("c5", 1)
                with trio.fail_after(10):
                    while client.rows()["c5"][0] != 3:
                        await stream.__anext__()
                assert client.sync_token == t1  # not adopted while the resume is unanswered
                release_resume.set()
                with trio.fail_after(10):
                    while len(client.syncs) == syncs or not client.connected:
                        await trio.sleep(0.005)
                assert client.last_sync is not None and client.last_sync.since_token
                assert not client.last_sync.full  # a delta from T1, not a snapshot
                want = _expected(await runner.server.store.load_view("u2"))
                assert "c18" not in want
                assert client.rows() == want
        nursery.cancel_scope.cancel()
