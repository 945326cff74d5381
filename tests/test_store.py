"""One behaviour suite for every store backend (docs/protocol.md "Invariants", the Store contract).

Add a backend by adding a factory to ``STORE_FACTORIES`` (and to ``PERSISTENT`` if it
survives a reopen).
"""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from seqactor.store import open_store
from seqactor.store._base import (
    Allocated,
    Change,
    IncompatibleStore,
    InvalidArgument,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    NotFound,
    NotMember,
    ReadMarked,
    Store,
    TooLarge,
    Unavailable,
    wall_clock_ms,
)
from seqactor.store.memory import MemoryStore
from seqactor.store.sqlite import SCHEMA_VERSION, SQLiteStore
from tests._redis import redis_store_factory

StoreFactory = Callable[..., Store]

STORE_FACTORIES: dict[str, Callable[[Path], StoreFactory]] = {
    "memory": lambda tmp: MemoryStore,
    "sqlite": lambda tmp: lambda **kw: SQLiteStore(tmp / "store.db", **kw),
    "redis": redis_store_factory(cluster=False),
    "redis-cluster": redis_store_factory(cluster=True),
}
PERSISTENT = {"sqlite", "redis", "redis-cluster"}


@pytest.fixture(params=list(STORE_FACTORIES))
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path) -> StoreFactory:
    """Make a new (unopened) store of the backend; persistent ones share one file."""
    return STORE_FACTORIES[backend](tmp_path)


@pytest.fixture
async def store(make_store: StoreFactory) -> AsyncIterator[Store]:
    s = make_store()
    await s.open()
    try:
        yield s
    finally:
        await s.aclose()


async def snapshot(store: Store, users: list[str], convs: list[str]) -> Any:
    """Everything observable about ``users`` and ``convs`` (for "nothing changed")."""
    views = {}
    for u in users:
        v = await store.load_view(u)
        views[u] = (v.position, {cid: row(v, cid) for cid in v.conversation_ids})
    states = {c: await store.conversation(c) for c in convs}
    removed = {u: await store.removed_since(u, 0) for u in users}
    return store.position, views, states, removed


def row(view: Any, cid: str) -> dict[str, int]:
    i = view.conversation_ids.index(cid)
    return {
        "max": view.max_seq[i], "read": view.read_seq[i], "min": view.min_seq[i],
        "time": view.time_ms[i], "pos": view.pos[i], "frozen": view.frozen[i],
    }


# ------------------------------------------------------------------ allocation (I1)


async def test_allocate_contiguous_ranges_and_positions(store: Store) -> None:
    assert len(store.epoch) == 16
    assert store.position == 0
    a = await store.allocate("c", 0)
    assert (a.first, a.last, a.position, a.changed) == (1, 1, 1, True)
    assert a.sender_user_id is None and a.sender_read == 0
    expected_next = 2
    for i, n in enumerate([1, 5, 10_000, 3, 7]):
        b = await store.allocate("c", n)
        assert (b.first, b.last) == (expected_next, expected_next + n - 1)
        assert b.position == i + 2
        expected_next += n
    st = await store.conversation("c")
    assert st is not None
    assert st.max_sequence == expected_next - 1
    assert st.time_ms == b.time_ms > 0
    assert st.member_count == 0
    assert store.position == 6
    other = await store.allocate("d", 2)
    assert (other.first, other.last) == (1, 2)


async def test_allocate_creates_conversation(store: Store) -> None:
    assert await store.conversation("new") is None
    await store.allocate("new", 1)
    assert await store.conversation("new") is not None


# ------------------------------------------------------------------ read (I2) and I6


async def test_mark_read_monotonic_and_clamped(store: Store) -> None:
    await store.add_members("c", ["u"])
    await store.allocate("c", 10)
    r = await store.mark_read("c", "u", 4)
    assert (r.read_sequence, r.changed, r.position) == (4, True, 3)
    below = await store.mark_read("c", "u", 2)
    assert (below.read_sequence, below.changed, below.position) == (4, False, 3)
    same = await store.mark_read("c", "u", 4)
    assert (same.read_sequence, same.changed) == (4, False)
    above = await store.mark_read("c", "u", 99)
    assert (above.read_sequence, above.changed, above.position) == (10, True, 4)
    again = await store.mark_read("c", "u", 99)
    assert (again.read_sequence, again.changed, again.position) == (10, False, 4)
    assert row(await store.load_view("u"), "c")["read"] == 10
    assert store.position == 4


async def test_sender_has_read_i6(store: Store) -> None:
    await store.add_members("c", ["alice", "bob"])
    a = await store.allocate("c", 3, sender_user_id="alice")
    assert (a.sender_user_id, a.sender_read) == ("alice", 3)
    assert row(await store.load_view("alice"), "c")["read"] == 3
    assert row(await store.load_view("bob"), "c")["read"] == 0
    # a non-member sender: nothing happens to them
    b = await store.allocate("c", 2, sender_user_id="mallory")
    assert (b.sender_user_id, b.sender_read) == (None, 0)
    assert not await store.view_contains("mallory", "c")
    # proto3's empty string means "no sender"
    c = await store.allocate("c", 1, sender_user_id="")
    assert c.sender_user_id is None
    # a frozen (left with keep_history) sender is not an active member
    await store.remove_members("c", ["bob"], keep_history=True)
    d = await store.allocate("c", 1, sender_user_id="bob")
    assert d.sender_user_id is None
    assert row(await store.load_view("bob"), "c")["read"] == 0


# ------------------------------------------------------------------ membership


async def test_add_members(store: Store) -> None:
    added = await store.add_members("c", ["u1", "u2", "u1"])
    assert added.user_ids == ("u1", "u2") and added.changed
    assert (added.max_sequence, added.position) == (0, 1)
    await store.allocate("c", 5)
    await store.mark_read("c", "u1", 2)
    again = await store.add_members("c", ["u1", "u3"])
    assert again.user_ids == ("u3",)
    assert (again.max_sequence, again.min_sequence) == (5, 0)
    assert row(await store.load_view("u3"), "c")["read"] == 5  # no backlog of unread
    assert row(await store.load_view("u1"), "c")["read"] == 2  # existing member unchanged
    noop = await store.add_members("c", ["u1", "u2"])
    assert (noop.changed, noop.user_ids, noop.position) == (False, (), store.position)
    st = await store.conversation("c")
    assert st is not None and st.member_count == 3
    # creating an empty conversation is a change
    empty = await store.add_members("e", [])
    assert empty.changed and await store.conversation("e") is not None
    assert not (await store.add_members("e", [])).changed


async def test_remove_members_tombstones_and_rejoin(store: Store) -> None:
    await store.add_members("c", ["u", "v"])
    await store.add_members("d", ["u"])
    await store.allocate("c", 4)
    p0 = store.position
    gone = await store.remove_members("c", ["u", "nobody"], keep_history=False)
    assert gone.user_ids == ("u",) and gone.changed and not gone.keep_history
    assert not await store.view_contains("u", "c")
    assert (await store.load_view("u")).conversation_ids == ["d"]
    assert await store.removed_since("u", p0) == ["c"]
    assert await store.removed_since("u", gone.position) == []
    assert await store.removed_since("v", p0) == []
    assert await store.removed_since("u", 0) == ["c"]
    with pytest.raises(NotMember):
        await store.mark_read("c", "u", 1)
    st = await store.conversation("c")
    assert st is not None and st.member_count == 1
    noop = await store.remove_members("c", ["u"], keep_history=False)
    assert not noop.changed and noop.position == store.position
    # rejoin: in the view again, read = max, not reported as removed any more
    await store.allocate("c", 2)
    back = await store.add_members("c", ["u"])
    assert back.user_ids == ("u",)
    assert row(await store.load_view("u"), "c")["read"] == 6
    assert await store.removed_since("u", p0) == []
    with pytest.raises(NotFound):
        await store.remove_members("zzz", ["u"], keep_history=False)


async def test_keep_history_freezes_row(store: Store) -> None:
    await store.add_members("c", ["u", "v"])
    await store.allocate("c", 10)
    await store.set_min_sequence("c", 2)
    await store.mark_read("c", "u", 3)
    left = await store.remove_members("c", ["u"], keep_history=True)
    assert left.keep_history and left.user_ids == ("u",)
    frozen_before = row(await store.load_view("u"), "c")
    assert frozen_before["frozen"] == 1
    assert (frozen_before["max"], frozen_before["min"], frozen_before["read"]) == (10, 2, 3)
    assert frozen_before["pos"] == left.position
    assert await store.view_contains("u", "c")
    st = await store.conversation("c")
    assert st is not None and st.member_count == 1
    # later changes of the conversation do not touch the frozen row
    await store.allocate("c", 5)
    await store.set_min_sequence("c", 8)
    assert row(await store.load_view("u"), "c") == frozen_before
    # MarkRead still works, clamped to the frozen max
    r = await store.mark_read("c", "u", 100)
    assert (r.read_sequence, r.changed) == (10, True)
    after = row(await store.load_view("u"), "c")
    assert (after["max"], after["read"], after["pos"]) == (10, 10, r.position)
    assert not (await store.mark_read("c", "u", 12)).changed
    # leaving again with keep_history: already frozen, nothing happens
    assert not (await store.remove_members("c", ["u"], keep_history=True)).changed
    # rejoin: active again with read = current max
    await store.add_members("c", ["u"])
    r2 = row(await store.load_view("u"), "c")
    assert (r2["frozen"], r2["max"], r2["read"], r2["min"]) == (0, 15, 15, 8)
    # without keep_history a frozen row leaves the view too (tombstone)
    await store.remove_members("c", ["u"], keep_history=True)
    p = store.position
    dropped = await store.remove_members("c", ["u"], keep_history=False)
    assert dropped.user_ids == ("u",)
    assert not await store.view_contains("u", "c")
    assert await store.removed_since("u", p) == ["c"]


# ------------------------------------------------------------------ min


async def test_set_min_sequence(store: Store) -> None:
    await store.allocate("c", 10)
    m = await store.set_min_sequence("c", 4)
    assert (m.min_sequence, m.changed) == (4, True)
    lower = await store.set_min_sequence("c", 2)
    assert (lower.min_sequence, lower.changed) == (4, False)
    clamped = await store.set_min_sequence("c", 50)
    assert (clamped.min_sequence, clamped.changed) == (10, True)
    st = await store.conversation("c")
    assert st is not None and st.min_sequence == 10
    with pytest.raises(NotFound):
        await store.set_min_sequence("nope", 1)


# ------------------------------------------------------------------ errors


async def test_errors_change_nothing(make_store: StoreFactory) -> None:
    store = make_store(max_view_conversations=3, max_conversation_members=3)
    await store.open()
    try:
        seen: list[Change] = []
        await store.add_members("c", ["u1", "u2"])
        await store.allocate("c", 5, sender_user_id="u1")
        await store.add_members("d", ["u1"])
        await store.add_members("e", ["u1"])
        store.add_listener(seen.append)
        users, convs = ["u1", "u2", "u3", "u4"], ["c", "d", "e", "f", "x"]
        before = await snapshot(store, users, convs)
        bad_ids = ["", "x" * 129, "é" * 65, "a\x00b", "tab\there", "del\x7f", "c1\x85", "\ud800"]
        failing: list[tuple[type[Exception], Any]] = []
        for bad in bad_ids:
            failing += [
                (InvalidArgument, store.allocate(bad, 1)),
                (InvalidArgument, store.allocate("c", 1, sender_user_id=bad or "\x01")),
                (InvalidArgument, store.mark_read(bad, "u1", 1)),
                (InvalidArgument, store.mark_read("c", bad, 1)),
                (InvalidArgument, store.add_members(bad, ["u1"])),
                (InvalidArgument, store.add_members("c", ["u3", bad])),
                (InvalidArgument, store.remove_members("c", ["u2", bad], keep_history=False)),
                (InvalidArgument, store.set_min_sequence(bad, 1)),
                (InvalidArgument, store.load_view(bad)),
                (InvalidArgument, store.view_contains(bad, "c")),
                (InvalidArgument, store.conversation(bad)),
            ]
        failing += [
            (InvalidArgument, store.allocate("c", -1)),
            (InvalidArgument, store.mark_read("c", "u1", -1)),
            (InvalidArgument, store.set_min_sequence("c", -5)),
            (InvalidArgument, store.removed_since("u1", -1)),
            (InvalidArgument, store.add_members("c", "u3")),  # a str is not a list of ids
            (TooLarge, store.allocate("c", 10_001)),
            (TooLarge, store.add_members("c", ["u3", "u4"])),  # 4 members > 3
            (TooLarge, store.add_members("f", ["u1"])),  # u1's view would hold 4
            (NotFound, store.mark_read("x", "u1", 1)),
            (NotFound, store.set_min_sequence("x", 1)),
            (NotFound, store.remove_members("x", ["u1"], keep_history=True)),
            (NotMember, store.mark_read("c", "u3", 1)),
        ]
        for exc_type, coro in failing:
            with pytest.raises(exc_type):
                await coro
        assert await snapshot(store, users, convs) == before
        assert seen == []
        assert InvalidArgument.code == "BAD_REQUEST" and NotMember.code == "FORBIDDEN"
        # within the limits it works
        await store.add_members("c", ["u3"])
        assert store.position == before[0] + 1
    finally:
        await store.aclose()
    with pytest.raises(Unavailable):
        await store.allocate("c", 1)


# ------------------------------------------------------------------ listeners


async def test_listeners_in_position_order_once_per_change(store: Store) -> None:
    seen: list[Change] = []
    store.add_listener(seen.append)
    results: list[Change] = [
        await store.add_members("c", ["u", "v"]),
        await store.allocate("c", 3, sender_user_id="u"),
        await store.mark_read("c", "v", 2),
        await store.mark_read("c", "v", 1),  # no-op
        await store.set_min_sequence("c", 1),
        await store.set_min_sequence("c", 0),  # no-op
        await store.add_members("c", ["u"]),  # no-op
        await store.remove_members("c", ["v"], keep_history=True),
        await store.remove_members("c", ["nobody"], keep_history=False),  # no-op
        await store.remove_members("c", ["u"], keep_history=False),
    ]
    changed = [r for r in results if r.changed]
    assert seen == changed
    assert [c.position for c in seen] == list(range(1, len(seen) + 1))
    assert [type(c) for c in seen] == [
        MembersAdded, Allocated, ReadMarked, MinChanged, MembersRemoved, MembersRemoved,
    ]
    store.remove_listener(seen.append)
    await store.allocate("c", 1)
    assert len(seen) == len(changed)


async def test_failing_listener_does_not_break_the_store(store: Store) -> None:
    def bad(change: Change) -> None:
        raise RuntimeError("listener bug")

    seen: list[Change] = []
    store.add_listener(bad)
    store.add_listener(seen.append)
    a = await store.allocate("c", 1)
    assert seen == [a]


async def test_concurrent_listeners_see_only_committed_state(
    store: Store, backend: str, tmp_path: Path
) -> None:
    """Visible state and listeners lag the durable state, never lead it."""
    db = sqlite3.connect(tmp_path / "store.db") if backend == "sqlite" else None
    convs = [f"c{i}" for i in range(4)]
    for c in convs:
        await store.add_members(c, ["u"])
    published: list[Change] = []

    def durable_max(cid: str) -> int | None:
        if db is None:
            return None
        r = db.execute("SELECT max_seq FROM conversations WHERE id = ?", (cid,)).fetchone()
        return int(r[0]) if r else 0

    def listener(change: Change) -> None:
        published.append(change)
        if isinstance(change, Allocated) and hasattr(store, "_state"):
            # the change is already visible and already durable when published
            view = store._state.load_view("u")  # type: ignore[attr-defined]
            assert row(view, change.conversation_id)["max"] == change.last
            dm = durable_max(change.conversation_id)
            assert dm is None or dm >= change.last

    store.add_listener(listener)
    done = False
    acked: dict[str, int] = dict.fromkeys(convs, 0)

    async def allocator(i: int) -> None:
        rng = random.Random(i)
        for _ in range(30):
            cid = rng.choice(convs)
            a = await store.allocate(cid, rng.randint(1, 5))
            acked[cid] = max(acked[cid], a.last)

    async def prober() -> None:
        while not done:
            view = await store.load_view("u")
            for cid in view.conversation_ids:
                visible = row(view, cid)["max"]
                dm = durable_max(cid)
                assert dm is None or visible <= dm
            await trio.sleep(0)

    async with trio.open_nursery() as outer:
        outer.start_soon(prober)
        async with trio.open_nursery() as n:
            for i in range(16):
                n.start_soon(allocator, i)
        done = True
    allocs = [c for c in published if isinstance(c, Allocated)]
    assert len(allocs) == 16 * 30
    assert [c.position for c in published] == sorted(c.position for c in published)
    view = await store.load_view("u")
    for cid in convs:
        assert row(view, cid)["max"] == acked[cid]
    if db is not None:
        db.close()


# The memory store commits at once and Redis in one script: only SQLite has a window.
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_uncommitted_allocation_is_invisible(
    store: Store, backend: str, tmp_path: Path
) -> None:
    await store.add_members("c", ["u"])
    seen: list[Change] = []
    store.add_listener(seen.append)
    result: list[Allocated] = []
    db = sqlite3.connect(tmp_path / "store.db")
    invisible_probes = 0

    async def alloc() -> None:
        result.append(await store.allocate("c", 7))

    async with trio.open_nursery() as n:
        n.start_soon(alloc)
        await trio.sleep(0)  # the allocation is computed (position taken), not committed yet
        while not result:
            # (each read returns without a checkpoint after it: `seen` is checked consistently)
            visible_max = row(await store.load_view("u"), "c")["max"]
            assert visible_max in (0, 7) and (visible_max == 0) == (seen == [])
            st = await store.conversation("c")
            assert st is not None
            if st.max_sequence == 0:
                invisible_probes += 1
                assert seen == []
            else:  # committed: durable, applied and published together
                assert st.max_sequence == 7 and len(seen) == 1
                durable = db.execute("SELECT max_seq FROM conversations WHERE id = 'c'")
                assert durable.fetchone()[0] == 7
            await trio.sleep(0)
    db.close()
    assert invisible_probes >= 1
    assert result[0].last == 7 and seen == result


# ------------------------------------------------------------------ views and positions


class Model:
    """An independent reference implementation of the semantics, for random runs."""

    def __init__(self) -> None:
        self.convs: dict[str, dict[str, int]] = {}
        self.members: dict[tuple[str, str], dict[str, int]] = {}  # (cid, uid)
        self.conv_pos: dict[str, int] = {}
        self.tombs: list[tuple[int, str, str]] = []
        self.position = 0

    def view(self, uid: str) -> dict[str, tuple[int, int, int, int, int, int]]:
        out = {}
        for (cid, u), m in self.members.items():
            if u != uid:
                continue
            c = self.convs[cid]
            if m["frozen"]:
                out[cid] = (m["fmax"], m["read"], m["fmin"], m["ftime"], m["pos"], 1)
            else:
                pos = max(m["pos"], self.conv_pos[cid])
                out[cid] = (c["max"], m["read"], c["min"], c["time"], pos, 0)
        return out

    def apply(self, change: Change) -> None:
        """Check ``change`` against the model's own computation, then apply it."""
        cid = change.conversation_id
        if not change.changed:
            assert change.position == self.position
            return
        self.position += 1
        assert change.position == self.position
        p = self.position
        if isinstance(change, Allocated):
            c = self.convs.setdefault(cid, {"max": 0, "min": 0, "time": 0})
            assert change.first == c["max"] + 1
            c["max"] = change.last
            c["time"] = change.time_ms
            self.conv_pos[cid] = p
            if change.sender_user_id:
                m = self.members[(cid, change.sender_user_id)]
                assert not m["frozen"]
                m["read"] = change.last
                m["pos"] = p
        elif isinstance(change, ReadMarked):
            m = self.members[(cid, change.user_id)]
            cap = m["fmax"] if m["frozen"] else self.convs[cid]["max"]
            assert change.read_sequence == min(cap, max(change.read_sequence, m["read"]))
            assert change.read_sequence > m["read"]
            m["read"] = change.read_sequence
            m["pos"] = p
        elif isinstance(change, MinChanged):
            self.convs[cid]["min"] = change.min_sequence
            self.conv_pos[cid] = p
        elif isinstance(change, MembersAdded):
            if cid not in self.convs:
                self.convs[cid] = {"max": 0, "min": 0, "time": 0}
                self.conv_pos[cid] = p
            c = self.convs[cid]
            for u in change.user_ids:
                self.members[(cid, u)] = {
                    "read": c["max"], "pos": p, "frozen": 0, "fmax": 0, "fmin": 0, "ftime": 0,
                }
        elif isinstance(change, MembersRemoved):
            c = self.convs[cid]
            for u in change.user_ids:
                if change.keep_history:
                    m = self.members[(cid, u)]
                    m.update(frozen=1, fmax=c["max"], fmin=c["min"], ftime=c["time"], pos=p)
                else:
                    del self.members[(cid, u)]
                    self.tombs.append((p, u, cid))

    def removed_since(self, uid: str, pos: int) -> set[str]:
        view = self.view(uid)
        return {c for p, u, c in self.tombs if u == uid and p > pos and c not in view}


async def random_ops(store: Store, model: Model, rng: random.Random, n: int) -> None:
    users = [f"u{i}" for i in range(6)]
    convs = [f"c{i}" for i in range(5)]
    for _ in range(n):
        cid = rng.choice(convs)
        k = rng.random()
        try:
            if k < 0.3:
                ch: Change = await store.allocate(
                    cid, rng.randint(0, 4), sender_user_id=rng.choice(users + [None])
                )
            elif k < 0.55:
                ch = await store.mark_read(cid, rng.choice(users), rng.randint(0, 40))
            elif k < 0.7:
                ch = await store.add_members(cid, rng.sample(users, rng.randint(0, 3)))
            elif k < 0.85:
                ch = await store.remove_members(
                    cid, rng.sample(users, rng.randint(1, 2)), keep_history=rng.random() < 0.5
                )
            else:
                ch = await store.set_min_sequence(cid, rng.randint(0, 30))
        except (NotFound, NotMember):
            continue
        model.apply(ch)


async def check_against_model(store: Store, model: Model, positions: list[int]) -> None:
    assert store.position == model.position
    for uid in [f"u{i}" for i in range(6)]:
        v = await store.load_view(uid)
        assert v.position == model.position
        got = {
            cid: (v.max_seq[i], v.read_seq[i], v.min_seq[i], v.time_ms[i], v.pos[i], v.frozen[i])
            for i, cid in enumerate(v.conversation_ids)
        }
        assert got == model.view(uid)
        for cid in got:
            assert await store.view_contains(uid, cid)
        for p in positions:
            removed = await store.removed_since(uid, p)
            assert removed is not None and set(removed) == model.removed_since(uid, p)
            assert len(removed) == len(set(removed))


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_operations_match_model(make_store: StoreFactory, seed: int) -> None:
    """Views (values, frozen flags and change positions) and tombstones follow the model;
    a row's pos > p iff it changed after p."""
    store = make_store()
    await store.open()
    model = Model()
    rng = random.Random(seed)
    try:
        await random_ops(store, model, rng, 300)
        await check_against_model(store, model, sorted(rng.sample(range(model.position), 10)))
    finally:
        await store.aclose()


async def test_row_positions_mark_changes(store: Store) -> None:
    await store.add_members("a", ["u"])
    await store.add_members("b", ["u"])
    p = store.position
    v = await store.load_view("u")
    assert all(x <= p for x in v.pos)
    await store.allocate("a", 1)
    v = await store.load_view("u")
    assert {cid for i, cid in enumerate(v.conversation_ids) if v.pos[i] > p} == {"a"}
    p = store.position
    await store.mark_read("b", "u", 0)  # no-op: no change
    await store.allocate("b", 2)
    await store.mark_read("b", "u", 2)
    v = await store.load_view("u")
    changed = {cid for i, cid in enumerate(v.conversation_ids) if v.pos[i] > p}
    assert changed == {"b"} and row(v, "b")["pos"] == store.position
    assert v.position == store.position
    empty = await store.load_view("nobody")
    assert empty.conversation_ids == [] and len(empty.max_seq) == 0


async def test_tombstone_horizon(make_store: StoreFactory) -> None:
    store = make_store(max_tombstones=10)
    await store.open()
    try:
        for i in range(30):
            await store.add_members(f"c{i}", ["u"])
        start = store.position
        for i in range(30):
            await store.remove_members(f"c{i}", ["u"], keep_history=False)
        assert await store.removed_since("u", start) is None  # pruned: full sync
        recent = await store.removed_since("u", store.position - 5)
        assert recent == [f"c{i}" for i in range(25, 30)]
        assert await store.removed_since("u", store.position) == []
        assert await store.removed_since("u", store.position + 1) is None  # from the future
    finally:
        await store.aclose()


# ------------------------------------------------------------------ concurrency


async def test_concurrent_allocations_one_conversation(store: Store) -> None:
    ranges: list[tuple[int, int]] = []

    async def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(10):
            a = await store.allocate("hot", rng.randint(0, 50))
            ranges.append((a.first, a.last))

    async with trio.open_nursery() as n:
        for i in range(64):
            n.start_soon(worker, i)
    ranges.sort()
    expected = 1
    for first, last in ranges:
        assert first == expected and last >= first
        expected = last + 1
    st = await store.conversation("hot")
    assert st is not None and st.max_sequence == expected - 1
    assert store.position == 640


async def test_concurrent_allocations_many_conversations_and_reads(store: Store) -> None:
    convs = [f"c{i}" for i in range(8)]
    users = [f"u{i}" for i in range(4)]
    for c in convs:
        await store.add_members(c, users)
    ranges: dict[str, list[tuple[int, int]]] = {c: [] for c in convs}
    reads: dict[tuple[str, str], list[tuple[int, int]]] = {}
    positions: list[int] = []

    async def allocator(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            c = rng.choice(convs)
            a = await store.allocate(c, rng.randint(1, 9), sender_user_id=rng.choice(users))
            ranges[c].append((a.first, a.last))
            positions.append(a.position)

    async def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            c, u = rng.choice(convs), rng.choice(users)
            r = await store.mark_read(c, u, rng.randint(0, 200))
            st = await store.conversation(c)
            assert st is not None and r.read_sequence <= st.max_sequence
            reads.setdefault((c, u), []).append((r.position, r.read_sequence))
            if r.changed:
                positions.append(r.position)

    async with trio.open_nursery() as n:
        for i in range(48):
            n.start_soon(allocator, i)
        for i in range(16):
            n.start_soon(reader, 1000 + i)
    for rs in ranges.values():
        rs.sort()
        expected = 1
        for first, last in rs:
            assert first == expected
            expected = last + 1
    for key, acks in reads.items():
        values = [v for _, v in sorted(acks)]
        assert values == sorted(values), key  # I2: in position order a read never goes back
    # every position handed out exactly once, and only to changes
    assert len(positions) == len(set(positions))
    for u in users:
        v = await store.load_view(u)
        for cid in v.conversation_ids:
            r = row(v, cid)
            assert r["read"] <= r["max"]
            assert r["read"] >= max(v for _, v in reads.get((cid, u), [(0, 0)]))


# ------------------------------------------------------------------ persistence (SQLite)


@pytest.mark.parametrize("backend", sorted(PERSISTENT), indirect=True)
async def test_reopen_keeps_everything(make_store: StoreFactory, backend: str) -> None:
    store = make_store()
    await store.open()
    model = Model()
    rng = random.Random(7)
    await random_ops(store, model, rng, 200)
    epoch = store.epoch
    users = [f"u{i}" for i in range(6)]
    convs = [f"c{i}" for i in range(5)]
    before = await snapshot(store, users, convs)
    await store.aclose()

    again = make_store()
    await again.open()
    try:
        assert again.epoch == epoch
        assert await snapshot(again, users, convs) == before
        await check_against_model(again, model, [0, model.position // 2, model.position])
        # no reuse: allocation continues after the last durable one
        for cid in convs:
            st = await again.conversation(cid)
            a = await again.allocate(cid, 2)
            assert a.first == (st.max_sequence if st else 0) + 1
            assert a.position == model.position + 1
            model.position += 1
    finally:
        await again.aclose()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # a SQLite failure mode
async def test_commit_failure_makes_store_unavailable(
    store: Store, backend: str, tmp_path: Path
) -> None:
    await store.add_members("c", ["u"])
    a = await store.allocate("c", 3)
    # another connection makes every later write of conversations fail (a real SQLite error)
    other = sqlite3.connect(tmp_path / "store.db")
    other.execute(
        "CREATE TRIGGER sabotage BEFORE UPDATE ON conversations "
        "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
    )
    other.commit()
    other.close()
    seen: list[Change] = []
    store.add_listener(seen.append)
    with pytest.raises(Unavailable):
        await store.allocate("c", 1)
    assert seen == []
    # reads still serve the last committed state
    st = await store.conversation("c")
    assert st is not None and st.max_sequence == a.last
    assert store.position == a.position
    for write in (store.mark_read("c", "u", 1), store.add_members("d", ["u"])):
        with pytest.raises(Unavailable):
            await write


async def test_open_store_url(tmp_path: Path) -> None:
    s = open_store(f"sqlite:///{tmp_path}/via-url.db")
    assert isinstance(s, SQLiteStore)
    await s.open()
    await s.allocate("c", 1)
    await s.aclose()
    assert (tmp_path / "via-url.db").exists()
    assert isinstance(open_store("memory://"), MemoryStore)


async def test_wal_and_full_sync(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "s.db")
    await s.open()
    await s.allocate("c", 1)
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    assert meta["app"] == "seqactor" and meta["epoch"] == s.epoch and meta["position"] == 1
    db.close()
    await s.aclose()
    with pytest.raises(InvalidArgument):
        SQLiteStore(tmp_path / "t.db", synchronous="SOMETIMES")


def _foreign_sqlite(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    db.execute("INSERT INTO users (name) VALUES ('ada')")
    db.commit()
    db.close()


def _newer_schema(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value)")
    db.execute("INSERT INTO meta VALUES ('app', 'seqactor'), ('epoch', ?), ('position', 0)",
               (os.urandom(16),))
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()


def _random_bytes(path: Path) -> None:
    path.write_bytes(random.Random(3).randbytes(8192))


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (_foreign_sqlite, "not a seqactor store"),
        (_newer_schema, "newer"),
        (_random_bytes, "not a SQLite database"),
    ],
)
async def test_incompatible_files_refused(
    tmp_path: Path, prepare: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "x.db"
    prepare(path)
    content = path.read_bytes()
    s = SQLiteStore(path)
    with pytest.raises(IncompatibleStore, match=message):
        await s.open()
    assert path.read_bytes() == content  # untouched
    with pytest.raises(Unavailable):
        await s.allocate("c", 1)


# ------------------------------------------------------------------ message time


HOUR_MS = 3_600_000


async def test_message_time_never_goes_back_when_the_clock_steps_back(store: Store) -> None:
    """The wall clock steps back one hour: the next allocation's time is not an hour earlier
    (an app sorting chats by it would reorder them); it stays at the previous time, and moves
    on once the clock has caught up."""
    now = wall_now = store.clock_ms()
    store.clock_ms = lambda: now
    first = await store.allocate("c", 1)
    assert first.time_ms == wall_now
    now = wall_now - HOUR_MS
    second = await store.allocate("c", 1)
    assert second.time_ms == first.time_ms
    st = await store.conversation("c")
    assert st is not None and st.time_ms == first.time_ms
    # another conversation is stamped with the (stepped back) clock itself
    other = await store.allocate("d", 1)
    assert other.time_ms == wall_now - HOUR_MS
    now = wall_now + 5
    third = await store.allocate("c", 1)
    assert third.time_ms == wall_now + 5


@pytest.mark.parametrize("backend", sorted(PERSISTENT), indirect=True)
async def test_message_time_never_goes_back_across_a_restart(
    make_store: StoreFactory, backend: str
) -> None:
    """Allocate, stop, start again with the clock one hour behind: the time does not decrease."""
    wall_now = wall_clock_ms()
    store = make_store()
    await store.open()
    store.clock_ms = lambda: wall_now
    before = await store.allocate("c", 3, None)
    await store.aclose()

    again = make_store()
    await again.open()
    try:
        again.clock_ms = lambda: wall_now - HOUR_MS
        after = await again.allocate("c", 1)
        assert after.first == before.last + 1
        assert after.time_ms == before.time_ms == wall_now
        st = await again.conversation("c")
        assert st is not None and st.time_ms == wall_now
    finally:
        await again.aclose()
