"""Group read counts, model-checked on every store and both kernels: random allocate / mark
read / add / remove (with and without keep_history) / set min over many members; after every
step the node's read indexes (kept from the change stream, and freshly loaded) give exactly the
brute-force counts and readers of a plain model."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.testing

from seqactor import _kernel
from seqactor import _readindex as C
from seqactor import _readindex_py as P
from seqactor.server import readcounts as _readcounts
from seqactor.server.config import ServerConfig
from seqactor.store import NotFound, NotMember
from tests.test_store import STORE_FACTORIES

USERS = [f"u{i:02d}" for i in range(24)] + ["Zoë", "émile", "ß"]
CONVS = ["g1", "g2"]
STEPS = 120


@pytest.fixture(params=["compiled", "fallback"])
def kernel_impl(request, monkeypatch):
    monkeypatch.setattr(_kernel, "ReadCounter", (C if request.param == "compiled" else P).ReadCounter)
    return request.param


class Model:
    """The SPEC's semantics for what read counts see: active members and their reads."""

    def __init__(self) -> None:
        self.max = 0
        self.min = 0
        self.active: dict[str, int] = {}
        self.frozen: set[str] = set()
        self.exists = False

    def counts(self, lo: int, n: int) -> list[int]:
        return [sum(1 for r in self.active.values() if r >= lo + i) for i in range(n)]


@pytest.mark.parametrize("backend", list(STORE_FACTORIES))
@pytest.mark.parametrize("seed", [1, 2])
async def test_counts_follow_every_change(backend: str, seed: int, kernel_impl: str, tmp_path: Path):
    store = STORE_FACTORIES[backend](tmp_path)()
    await store.open()
    try:
        reg = _readcounts.ReadIndexes(store, ServerConfig())
        rnd = random.Random(seed)
        models = {c: Model() for c in CONVS}
        for step in range(STEPS):
            cid = rnd.choice(CONVS)
            m = models[cid]
            op = rnd.random()
            if op < 0.2:
                count = rnd.choice([1, 1, 3, 50])
                sender = rnd.choice([*USERS, None])
                await store.allocate(cid, count, sender)
                m.exists = True
                m.max += count
                if sender in m.active:
                    m.active[sender] = m.max
            elif op < 0.55:
                uid = rnd.choice(USERS)
                read = rnd.randint(0, m.max + 2)
                try:
                    await store.mark_read(cid, uid, read)
                except (NotMember, NotFound):
                    assert uid not in m.active and uid not in m.frozen
                else:
                    if uid in m.active:
                        m.active[uid] = max(m.active[uid], min(read, m.max))
            elif op < 0.75:
                uids = rnd.sample(USERS, rnd.randint(1, 6))
                await store.add_members(cid, uids)
                m.exists = True
                for u in uids:
                    if u not in m.active:
                        m.active[u] = m.max
                        m.frozen.discard(u)
            elif op < 0.9:
                if not m.exists:
                    continue
                uids = rnd.sample(USERS, rnd.randint(1, 4))
                keep = rnd.random() < 0.5
                await store.remove_members(cid, uids, keep)
                for u in uids:
                    if u in m.active:
                        del m.active[u]
                        if keep:
                            m.frozen.add(u)
                    elif not keep:
                        m.frozen.discard(u)
            else:
                if not m.exists:
                    continue
                target = rnd.randint(0, m.max + 1)
                await store.set_min_sequence(cid, target)
                m.min = max(m.min, min(target, m.max))
            if rnd.random() < 0.1:  # now and then: build the index again from the store
                reg.indexes.pop(cid, None)
            await store.sync()
            for c, mc in models.items():
                idx = await reg.get(c)
                if not mc.exists:
                    assert idx is None
                    continue
                assert idx is not None
                assert idx.counter.size == len(mc.active), (step, c)
                lo, n = idx.clamp(0, 0)
                assert (lo, n) == (max(1, mc.min), max(0, mc.max - max(1, mc.min) + 1)), step
                assert idx.counter.counts(lo, n) == mc.counts(lo, n), (step, c)
                assert idx.counter.counts(0, 2) == mc.counts(0, 2)
                seq = rnd.randint(0, mc.max + 1)
                for unread in (False, True):
                    want = sorted(
                        (u for u, r in mc.active.items() if (r >= seq) != unread),
                        key=lambda s: s.encode(),
                    )
                    got: list[str] = []
                    after = ""
                    while True:
                        ids, after = idx.readers(seq, unread, 5, after)
                        got += ids
                        if not after:
                            break
                    assert got == want, (step, c, seq, unread)
    finally:
        await store.aclose()


async def test_a_big_group_is_built_off_the_event_loop_and_misses_no_change(kernel_impl: str):
    """60 000 members: the index is built in a worker thread while changes keep committing;
    the changes made meanwhile are replayed from the buffer."""
    from seqactor.store.memory import MemoryStore

    store = MemoryStore()
    await store.open()
    users = [f"b{i:05d}" for i in range(60_000)]
    for i in range(0, len(users), 20_000):
        await store.add_members("big", users[i:i + 20_000])
    await store.allocate("big", 10)
    reg = _readcounts.ReadIndexes(store, ServerConfig())

    async with trio.open_nursery() as nursery:
        got: list[object] = []

        async def load() -> None:
            got.append(await reg.get("big"))

        nursery.start_soon(load)
        await trio.testing.wait_all_tasks_blocked()  # the snapshot is taken, the thread builds
        for uid in users[:50]:
            await store.mark_read("big", uid, 7)
        await store.allocate("big", 2, users[50])
        await store.remove_members("big", users[51:53], False)
    (idx,) = got
    assert isinstance(idx, _readcounts.ReadIndex)
    assert idx.counter.size == 60_000 - 2
    assert idx.counter.counts(1, 12) == [51] * 7 + [1] * 5
    await store.aclose()
