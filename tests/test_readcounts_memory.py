"""The read indexes' bounded-memory policy: an unwatched index idle for ``read_index_idle_s``
is dropped, beyond ``read_index_max_members`` members the least recently used unwatched ones
go first, watched ones stay; a dropped index is rebuilt, exact, on next use."""

from __future__ import annotations

import trio
import trio.testing

from seqactor.server.config import ServerConfig
from seqactor.server.readcounts import ReadIndexes
from seqactor.store.memory import MemoryStore
from tests.test_readcounts_watch import StuckState, starter


async def _store() -> MemoryStore:
    store = MemoryStore()
    await store.open()
    for g, n in [("a", 10), ("b", 10), ("c", 10), ("d", 10)]:
        await store.add_members(g, [f"u{i:03d}" for i in range(n)])
        await store.allocate(g, 3)
    return store


async def test_idle_indexes_are_dropped_and_rebuilt_exact(autojump_clock: trio.testing.MockClock):
    store = await _store()
    reg = ReadIndexes(store, ServerConfig(read_index_idle_s=60.0))
    await reg.get("a")
    await trio.sleep(30)
    await reg.get("b")
    await trio.sleep(40)  # "a" idle 70 s, "b" 40 s
    await reg.get("c")
    assert set(reg.indexes) == {"b", "c"}
    await store.mark_read("a", "u001", 2)  # while dropped: nothing held, nothing to update
    idx = await reg.get("a")
    assert idx is not None and idx.counter.counts(1, 3) == [1, 1, 0]
    await store.aclose()


async def test_member_budget_drops_least_recently_used_unwatched(
    autojump_clock: trio.testing.MockClock,
):
    store = await _store()
    reg = ReadIndexes(store, ServerConfig(read_index_max_members=25))
    state = StuckState()
    state.sent.append(b"")  # never blocks
    async with trio.open_nursery() as nursery:
        sw = reg.session_watches(state, False, starter(nursery))  # type: ignore[arg-type]
        await reg.get("a")
        reg.add_watch(sw, "a", 0)  # watched: kept whatever the budget
        await trio.sleep(1)
        await reg.get("b")
        await trio.sleep(1)
        await reg.get("c")  # 30 members > 25: "b" (older than "c", unwatched) goes
        assert set(reg.indexes) == {"a", "c"}
        await trio.sleep(1)
        await reg.get("d")
        assert set(reg.indexes) == {"a", "d"}
        await trio.sleep(10_000)  # idle for long: a watched index still stays
        await reg.get("b")
        assert "a" in reg.indexes
        nursery.cancel_scope.cancel()
    await store.aclose()
