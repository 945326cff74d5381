"""Group read counts in the Python SDK: ``Client.read_counts``, ``Client.readers`` (pages),
``Client.watch_read_counts`` (an async iterator that survives a reconnect), the service client,
and the errors a caller sees."""

from __future__ import annotations

import random

import pytest
import trio

from seqactor import Backoff, Client, Forbidden, NotFound, ReadCounts, ServiceClient, TooLarge
from tests._harness import running_server, token
from tests._proxy import running_proxy


def fast_backoff() -> Backoff:
    return Backoff(0.02, 0.2, rng=random.Random(0))

MEMBERS = ["alice", "bob", "carol", "dave", "erin"]


async def _setup(url: str) -> None:
    async with ServiceClient.connect(url, token("backend", "service")) as svc:
        await svc.add_members("g", MEMBERS)
        await svc.allocate("g", 4, "alice")  # alice has read 1..4 (I6)


async def test_read_counts_and_readers_pages():
    async with running_server() as server:
        await _setup(server.url)
        async with Client.connect(server.url, token("bob")) as bob:
            assert await bob.mark_read("g", 2) == 2
            rc = await bob.read_counts("g")
            assert rc == ReadCounts("g", 1, 5, (2, 2, 1, 1))
            assert rc.to_sequence == 4 and rc.count(2) == 2 and rc.count(9) is None
            assert (await bob.read_counts("g", 3, 3)).counts == (1,)
            pages = [p async for p in bob.readers("g", 2, page_size=1)]
            assert pages == [["alice"], ["bob"]]
            pages = [p async for p in bob.readers("g", 2, unread=True, page_size=2)]
            assert pages == [["carol", "dave"], ["erin"]]
            with pytest.raises(Forbidden):
                await bob.read_counts("nope")
            with pytest.raises(TooLarge):
                async for _ in bob.readers("g", 1, page_size=5000):
                    pass
        async with ServiceClient.connect(server.url, token("backend", "service")) as svc:
            assert (await svc.read_counts("g", 4)).counts == (1,)
            assert [p async for p in svc.readers("g", 1)] == [["alice", "bob"]]
            with pytest.raises(NotFound):
                await svc.read_counts("nope")


async def test_watch_iterator_gets_updates_and_survives_a_reconnect():
    async with running_server(read_counts_interval_ms=10) as server:
        await _setup(server.url)
        async with running_proxy(server.port) as proxy:
            async with Client.connect(proxy.url, token("bob"), backoff=fast_backoff()) as bob, \
                    ServiceClient.connect(server.url, token("backend", "service")) as svc:
                async with await bob.watch_read_counts("g", 3) as watch:
                    first = await watch.__anext__()
                    assert first == ReadCounts("g", 3, 5, (1, 1))
                    await bob.mark_read("g", 4)
                    with trio.fail_after(5):
                        async for update in watch:
                            if update.counts == (2, 2):
                                break
                    proxy.cut_all()  # the connection drops; the client re-watches on its own
                    await svc.allocate("g", 1, "carol")
                    with trio.fail_after(10):
                        async for update in watch:
                            if update.counts == (3, 3, 1):  # carol sent 5: she has read 3..5
                                break
                    assert update.member_count == 5
                # leaving the block stops the watch; the iterator is over
                assert [u async for u in watch] == []


async def test_watch_ends_when_the_conversation_leaves_the_view_on_reconnect():
    async with running_server(read_counts_interval_ms=10) as server:
        await _setup(server.url)
        async with running_proxy(server.port) as proxy:
            async with Client.connect(proxy.url, token("bob"), backoff=fast_backoff()) as bob, \
                    ServiceClient.connect(server.url, token("backend", "service")) as svc:
                watch = await bob.watch_read_counts("g")
                await watch.__anext__()
                proxy.pause()
                await svc.remove_members("g", ["bob"])
                proxy.cut_all()
                proxy.resume()
                with trio.fail_after(10), pytest.raises(Forbidden):
                    async for _ in watch:
                        pass


async def test_watch_raises_forbidden_when_the_conversation_leaves_the_view():
    async with running_server(read_counts_interval_ms=10) as server:
        await _setup(server.url)
        async with Client.connect(server.url, token("bob")) as bob, \
                ServiceClient.connect(server.url, token("backend", "service")) as svc:
            watch = await bob.watch_read_counts("g")
            await watch.__anext__()
            await svc.remove_members("g", ["bob"])
            with trio.fail_after(10), pytest.raises(Forbidden):
                async for _ in watch:
                    pass
