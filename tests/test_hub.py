"""The hub without sockets: a real memory store, actors attached, fan-out rounds held back.

A round that has not run yet is the state a big group is in for a few milliseconds after each
allocation; these tests freeze the hub in that state and check what users could observe.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

import seqactor.server.hub
from seqactor._kernel import decode_update, settle, split_server_message
from seqactor.server.actor import SessionState, UserActor
from seqactor.server.hub import Hub
from seqactor.server.metrics import Metrics
from seqactor.store.memory import MemoryStore


@pytest.fixture
async def hub_with_rounds(monkeypatch, nursery):
    """A hub whose big-group allocations queue a round that only runs when the test says."""
    monkeypatch.setattr(seqactor.server.hub, "FANOUT_INLINE_MEMBERS", 0)
    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    hub.nursery = nursery  # rounds are queued, but run_fanout is not started
    return hub


def row_values(hub: Hub, user: str, cid: str) -> tuple[int, int, int]:
    """The row as a reader of the view gets it (settled from the shared max first)."""
    actor = hub.actors[user]
    row = actor.table.row_of(hub.keys.lookup(cid))
    t = actor.table
    settle(t, [row])
    return t.max_seq[row], t.read_seq[row], int(t.frozen[row])


async def store_values(hub: Hub, user: str, cid: str) -> tuple[int, int, int]:
    view = await hub.store.load_view(user)
    i = view.conversation_ids.index(cid)
    return view.max_seq[i], view.read_seq[i], view.frozen[i]


async def test_freeze_during_a_pending_round_keeps_the_max_at_leaving(hub_with_rounds, nursery):
    hub = hub_with_rounds
    await hub.store.add_members("g", ["alice", "bob"])
    await hub.attach("alice", nursery)
    await hub.store.allocate("g", 3)  # round queued, not run: no push yet ...
    assert not hub.actors["alice"].table.max_seq[0]  # ... and alice's own row not updated,
    assert row_values(hub, "alice", "g")[0] == 3  # but a read of her view has the new max
    await hub.store.remove_members("g", ["alice"], keep_history=True)
    await hub.store.allocate("g", 2)
    assert row_values(hub, "alice", "g") == await store_values(hub, "alice", "g") == (3, 0, 1)


async def test_tokens_stay_below_an_undelivered_round(hub_with_rounds, nursery):
    hub = hub_with_rounds
    await hub.store.add_members("g", ["alice"])
    await hub.attach("alice", nursery)
    before = hub.synced_position
    change = await hub.store.allocate("g", 1)
    assert hub.position == change.position
    assert hub.synced_position < change.position  # alice has not been given seq 1 yet
    assert hub.synced_position >= before
    await hub._fanout_round(hub.keys.lookup("g"))
    assert row_values(hub, "alice", "g")[0] == 1
    assert hub.synced_position == hub.position


async def test_read_after_a_pending_round_never_exceeds_max(hub_with_rounds, nursery):
    hub = hub_with_rounds
    await hub.store.add_members("g", ["alice", "bob"])
    await hub.attach("alice", nursery)
    await hub.store.allocate("g", 4)
    await hub.store.mark_read("g", "alice", 4)  # commits against the store's max of 4
    max_seq, read_seq, _ = row_values(hub, "alice", "g")
    assert read_seq == 4 and max_seq == 4


async def test_round_delivers_the_newest_max_once(hub_with_rounds, nursery):
    hub = hub_with_rounds
    await hub.store.add_members("g", [f"u{i}" for i in range(5)])
    for i in range(5):
        await hub.attach(f"u{i}", nursery)
    for _ in range(10):
        await hub.store.allocate("g", 1)
    assert len(hub._hot_queue) == 1  # ten allocations, one round
    await hub._fanout_round(hub.keys.lookup("g"))
    assert not hub._hot_queue and not hub._latest
    for i in range(5):
        assert row_values(hub, f"u{i}", "g")[0] == 10


def one_member_slices(monkeypatch, hub: Hub, between_slices) -> None:
    """Rounds take one member per slice and call ``between_slices(n)`` (n = slices done)
    where they would yield to other tasks."""
    monkeypatch.setattr(seqactor.server.hub, "slice_members", lambda *args: 1)
    hub._slice_members = 1
    done = 0

    async def yield_to_others(passes: int) -> None:
        nonlocal done
        done += 1
        await between_slices(done)

    monkeypatch.setattr(seqactor.server.hub, "_yield_to_others", yield_to_others)


async def group_online(
    hub: Hub, nursery, members: int
) -> tuple[dict[str, SessionState], int, list[str]]:
    """Group "g" of ``members`` users, each online with one background session: (session
    state per user, the group's key id, the users in the order a round takes them)."""
    users = [f"u{i}" for i in range(members)]
    await hub.store.add_members("g", users)
    states = {u: (await background_session(hub, u, nursery))[1] for u in users}
    key = hub.keys.lookup("g")
    return states, key, [a.user_id for a in hub.index[key]]


async def test_a_second_round_hands_the_newest_change_only_to_members_without_it(
    hub_with_rounds, nursery, monkeypatch
):
    hub = hub_with_rounds
    states, key, order = await group_online(hub, nursery, 6)

    async def allocate_after_two(n: int) -> None:
        if n == 2:
            await hub.store.allocate("g", 1)

    one_member_slices(monkeypatch, hub, allocate_after_two)
    await hub.store.allocate("g", 1)
    await hub._fanout_round(key)  # the first two get seq 1, the rest seq 2 (and keep it)
    assert list(hub._hot_queue) == [key]  # the first two need another round
    for s in states.values():
        assert s.pending == {key: 1}
        s.clear_pending()
    await hub._fanout_round(key)
    assert [u for u in order if states[u].pending] == order[:2]
    assert not hub._hot_queue and not hub._latest


async def test_a_member_who_leaves_during_a_round_gets_nothing_more_from_it(
    hub_with_rounds, nursery, monkeypatch
):
    hub = hub_with_rounds
    states, key, order = await group_online(hub, nursery, 5)
    leaver, stays_frozen = order[-1], order[-2]

    async def leave_after_one(n: int) -> None:
        if n == 1:
            await hub.store.remove_members("g", [leaver], keep_history=False)
            await hub.store.remove_members("g", [stays_frozen], keep_history=True)

    one_member_slices(monkeypatch, hub, leave_after_one)
    await hub.store.allocate("g", 7)
    await hub._fanout_round(key)
    for u in order[:-2]:
        assert states[u].pending == {key: 1}
    assert states[leaver].pending == {} and states[leaver].pending_removed == {"g"}
    # "you left" (membership 2) with the max it left at: the round never reached it
    assert states[stays_frozen].pending == {key: 8 | 1}
    # what the frozen row holds is the max at leaving, as the store has it
    assert row_values(hub, stays_frozen, "g") == await store_values(hub, stays_frozen, "g")
    assert row_values(hub, stays_frozen, "g") == (7, 0, 1)


async def background_session(hub: Hub, user: str, nursery) -> tuple[UserActor, SessionState]:
    """(actor, session state): the user's actor with one `all` session in background, so
    changes stay pending and the test encodes them itself (``actor.encode_push``)."""
    actor = await hub.attach(user, nursery)
    s = SessionState("s1", user, "phone", 8, lambda code, reason: None, hub.counters)
    s.subscribed_all = True
    s.background = True
    actor.sessions.append(s)
    return actor, s


async def test_push_while_own_read_is_held_back_carries_no_token(nursery):
    from seqactor.store import ReadMarked

    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    await store.add_members("a", ["alice"])
    await store.add_members("b", ["alice"])
    await store.allocate("a", 5)
    await store.allocate("b", 5)
    actor, s = await background_session(hub, "alice", nursery)
    key_a = hub.keys.lookup("a")
    s.inflight_reads[key_a] = 1  # this session's MarkRead on "a" awaits its Ack
    result = await store.mark_read("a", "alice", 3)
    assert isinstance(result, ReadMarked) and result.changed
    await store.allocate("b", 1)  # something else to push meanwhile
    frame = actor.encode_push(s)
    assert frame is not None
    _, _, body = split_server_message(frame)
    conversations, token, _, _ = decode_update(body)
    assert set(conversations) == {"b"} and token == b""
    assert s.pending == {key_a: 2}  # the read stays pending until the Ack settles it
    s.inflight_reads.clear()
    _, _, body = split_server_message(actor.encode_push(s))
    conversations, token, _, _ = decode_update(body)
    assert conversations["a"][1] == 3 and token  # with nothing held back, a token again


async def test_resync_applies_a_freeze_and_a_re_add_it_missed_and_pushes_them(nursery):
    """Events lost (e.g. a Redis reconnect): resync_actor brings the frozen flag to the store's
    and pushes the membership change, in both directions."""
    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    await store.add_members("g", ["alice", "bob"])
    await store.allocate("g", 3)
    actor, s = await background_session(hub, "alice", nursery)

    def pushed() -> dict[str, tuple[int, ...]]:
        frame = actor.encode_push(s)
        assert frame is not None
        return {k: tuple(v) for k, v in decode_update(split_server_message(frame)[2])[0].items()}

    for keep, (frozen, membership) in ((True, (1, 2)), (False, (0, 1))):
        store.remove_listener(hub.apply)  # the hub misses this change
        if keep:
            await store.remove_members("g", ["alice"], keep_history=True)
        else:
            await store.add_members("g", ["alice"])
        store.add_listener(hub.apply)
        await store.allocate("g", 1)  # reaches the hub: a member row would move
        await hub.resync_actor(actor)
        assert row_values(hub, "alice", "g")[2] == frozen == (await store_values(hub, "alice", "g"))[2]
        assert pushed()["g"][4] == membership
    assert row_values(hub, "alice", "g")[0] == 5  # max of the re-add (seq 5 came after it)


async def test_a_session_joins_its_actor_in_the_attach_step(nursery):
    """Another session closing right after attach must not retire the actor under it."""
    from seqactor.server.actor import SessionState

    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    await store.add_members("g", ["u"])

    def state(name: str) -> SessionState:
        return SessionState(name, "u", name, 8, lambda code, reason: None, hub.counters)

    first, second = state("first"), state("second")
    actor = await hub.attach("u", nursery, first)
    assert actor.sessions == [first]
    assert await hub.attach("u", nursery, second) is actor
    assert actor.sessions == [first, second]
    actor.sessions.remove(first)  # the first session closes
    hub.detach_if_idle(actor)
    assert hub.actors["u"] is actor and hub.index[hub.keys.lookup("g")] == {actor}
    actor.sessions.remove(second)
    hub.detach_if_idle(actor)
    assert "u" not in hub.actors and not hub.index


@pytest.mark.parametrize("rounds", [False, True])
async def test_one_users_failure_never_stops_the_others_pushes(monkeypatch, nursery, rounds):
    """A session that cannot take output any more (here: starting its writer fails) ends its
    own user's sessions; every other member still gets the change."""
    from seqactor.server.actor import SessionState

    if rounds:
        monkeypatch.setattr(seqactor.server.hub, "FANOUT_INLINE_MEMBERS", 0)
    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    hub.nursery = nursery
    users = ["bad", "good1", "good2"]
    await store.add_members("g", users)
    closed: list[tuple[str, int]] = []
    states = {}
    for u in users:
        s = SessionState(u, u, u, 8, lambda code, reason, u=u: closed.append((u, code)),
                         hub.counters)
        s.subscribed_all = True
        states[u] = s
        await hub.attach(u, nursery, s)

    def broken_writer() -> None:
        raise RuntimeError("Nursery is closed to new arrivals")

    states["bad"].start_writer = broken_writer
    for u in ("good1", "good2"):
        states[u].start_writer = lambda: None  # a writer that will drain later
    await store.allocate("g", 1)
    if rounds:
        await hub._fanout_round(hub.keys.lookup("g"))
    await trio.testing.wait_all_tasks_blocked()  # the actors' flushes (no socket: no direct write)
    for u in ("good1", "good2"):
        s = states[u]
        assert s.push_frame is not None or s.pending, f"{u} got nothing"
        assert row_values(hub, u, "g")[0] == 1
    assert closed == [("bad", 1011)]


async def test_the_reply_queue_is_bounded_with_its_semaphore_made_on_demand():
    """A session's reply queue takes ``reply_queue_frames`` replies, then put_reply waits until
    the writer takes one; an idle session holds no semaphore for it."""
    import trio

    from seqactor.server.actor import SessionState

    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    limit = 4
    s = SessionState("s1", "alice", "phone", limit, lambda code, reason: None, hub.counters)
    s.start_writer = lambda: None  # a writer that is stuck: nothing drains the queue
    assert s._reply_space is None  # never needed yet: not made
    for i in range(limit):
        with trio.fail_after(1):
            await s.put_reply(b"r%d" % i)
    assert len(s.replies) == limit and s.writer_running
    done = trio.Event()

    async def one_more() -> None:
        await s.put_reply(b"late")
        done.set()

    async with trio.open_nursery() as n:
        n.start_soon(one_more)
        await trio.sleep(0.05)
        assert not done.is_set() and len(s.replies) == limit  # waits for room
        assert s.next_frame() == (b"r0", False)
        with trio.fail_after(1):
            await done.wait()
    assert s.replies == [b"r1", b"r2", b"r3", b"late"]


@pytest.mark.parametrize("change", ["allocate", "read-on-another-device"])
async def test_one_sessions_failure_never_stops_the_change_reaching_the_users_others(
    nursery, change
):
    """Found by the chaos test: a commit handed to a session whose nursery was closing made
    starting its writer raise, and that aborted the loop over the user's sessions, so the
    user's other devices missed the change while later pushes carried tokens past it. Now
    only the failing session ends; the user's other sessions get the change, the actor lives."""
    from seqactor.server.actor import SessionState

    store = MemoryStore()
    await store.open()
    hub = Hub(store, Metrics())
    hub.nursery = nursery
    await store.add_members("g", ["alice"])
    await store.allocate("g", 2)
    closed: list[tuple[str, int]] = []
    states = []
    for name in ("closing", "phone", "laptop"):
        s = SessionState(name, "alice", name, 8,
                         lambda code, reason, n=name: closed.append((n, code)), hub.counters)
        s.subscribed_all = True
        states.append(s)
        actor = await hub.attach("alice", nursery, s)

    def closed_nursery() -> None:
        raise RuntimeError("Nursery is closed to new arrivals")

    states[0].start_writer = closed_nursery
    for s in states[1:]:
        s.start_writer = lambda: None  # a writer that will drain later
    if change == "allocate":
        await store.allocate("g", 1)
        field, value = 0, 3  # the new max
    else:
        await store.mark_read("g", "alice", 2)
        field, value = 1, 2  # the read from another device
    actor.flush()
    assert actor.failed is None
    assert closed == [("closing", 1011)]
    for s in states[1:]:
        assert s.push_frame is not None, f"{s.session_id} got nothing"
        _, _, body = split_server_message(s.push_frame)
        conversations, _, _, _ = decode_update(body)
        assert conversations["g"][field] == value


def test_slices_fit_their_budget_and_yield_passes_per_cpu_taken():
    hub_mod = seqactor.server.hub
    budget = hub_mod.FANOUT_SLICE_S
    # 256 members took 10x the budget (their writes): the next slice takes a tenth of them
    assert hub_mod.slice_members(256, 10 * budget, 256) == 25
    # a cheap slice grows the next one at most 2x; never below the clock's stride
    assert hub_mod.slice_members(256, budget / 100, 256) == 512
    assert hub_mod.slice_members(256, 0.0, 256) == 512
    assert hub_mod.slice_members(16, 1000 * budget, 16) == hub_mod.FANOUT_MIN_SLICE_MEMBERS
    passes = hub_mod.FANOUT_YIELD_PASSES
    assert hub_mod.yield_passes(budget / 2) == passes
    assert hub_mod.yield_passes(2.5 * budget) == 3 * passes
    assert hub_mod.yield_passes(1000 * budget) == hub_mod.FANOUT_MAX_YIELD_PASSES


async def test_a_task_that_needs_a_pass_per_item_progresses_during_a_long_round(
    hub_with_rounds, nursery, monkeypatch
):
    """A session open on Redis needs scheduler passes, not CPU (coredis's connection writer
    takes one queued command per pass). A round whose writes take far longer than a slice's
    budget still lets such a task through: slices are capped to the budget and each is
    followed by passes. Counted, not timed: the slice's CPU is a fake clock advanced by 7 µs
    per member (a write on loopback), and ``fan_slice`` never reads its own clock."""
    hub = hub_with_rounds
    cpu = [0.0]
    served: list[int] = []
    real_fan_slice = seqactor.server.hub.kernel.fan_slice

    def fan_slice(members, start, *args):
        *args, _slice_s, _clock_every = args  # never cut by the real clock
        end, failures = real_fan_slice(members, start, *args, 1.0, 1 << 30)
        cpu[0] += (end - start) * 7e-6
        served.append(end - start)
        return end, failures

    monkeypatch.setattr(seqactor.server.hub.kernel, "fan_slice", fan_slice)
    monkeypatch.setattr(seqactor.server.hub, "cpu_time", lambda: cpu[0])
    users = [f"u{i}" for i in range(2000)]
    await hub.store.add_members("g", users)
    for user in users:
        await hub.attach(user, nursery)
    await hub.store.allocate("g", 1)
    finished_after: list[int] = []

    async def one_item_per_pass(items: int) -> None:
        for _ in range(items):
            await trio.sleep(0)
        finished_after.append(sum(served))

    async with trio.open_nursery() as inner:
        inner.start_soon(one_item_per_pass, 20)
        await hub._fanout_round(hub.keys.lookup("g"))
    assert finished_after and finished_after[0] < len(users)  # done before the round was
    assert all(row_values(hub, user, "g")[0] == 1 for user in users)  # and it reached everyone
    assert served[0] == seqactor.server.hub.FANOUT_FIRST_SLICE_MEMBERS
    assert max(served[1:]) * 7e-6 <= seqactor.server.hub.FANOUT_SLICE_S


class HeldViewLoads(MemoryStore):
    """A memory store whose view loads finish only when the test says (as a remote store's
    take a round trip): changes can land while a view is loading."""

    def __init__(self) -> None:
        super().__init__()
        self.release = trio.Event()

    async def load_view(self, user_id: str):  # type: ignore[no-untyped-def]
        view = await super().load_view(user_id)
        await self.release.wait()
        return view


async def test_sessions_that_attach_while_the_view_loads_share_it_with_the_changes_meanwhile(
    nursery,
):
    store = HeldViewLoads()
    await store.open()
    hub = Hub(store, Metrics())
    hub.nursery = nursery
    await store.add_members("g", ["alice"])
    await store.allocate("g", 2)
    phone = SessionState("s1", "alice", "phone", 8, lambda code, reason: None, hub.counters)
    laptop = SessionState("s2", "alice", "laptop", 8, lambda code, reason: None, hub.counters)
    attached = []

    async def attach(state: SessionState) -> None:
        attached.append(await hub.attach("alice", nursery, state))

    nursery.start_soon(attach, phone)
    await trio.testing.wait_all_tasks_blocked()
    nursery.start_soon(attach, laptop)  # the view is still loading: it waits for that load
    await trio.testing.wait_all_tasks_blocked()
    await store.allocate("g", 3)  # lands after the view was read, before it is ready
    assert attached == []
    store.release.set()
    await trio.testing.wait_all_tasks_blocked()
    assert len(attached) == 2 and attached[0] is attached[1] is hub.actors["alice"]
    assert attached[0].sessions == [phone, laptop]
    assert row_values(hub, "alice", "g")[0] == 5


# ---- what users' sessions are pushed when a round does not reach them (a round updates no
# row: a view read may settle a row without pushing, so a row's max is not what was pushed)


def pushed_max(actor: UserActor, s: SessionState) -> tuple[int, int] | None:
    """(max, read) of "g" in the push pending on ``s``, or None when nothing is pending."""
    frame = actor.encode_push(s)
    if frame is None:
        return None
    conversations = decode_update(split_server_message(frame)[2])[0]
    mx, rd = conversations["g"][:2]
    return mx, rd


async def test_a_member_who_leaves_before_the_round_reaches_it_is_pushed_the_max_at_leaving(
    hub_with_rounds, nursery
):
    hub = hub_with_rounds
    await hub.store.add_members("g", ["alice", "bob"])
    actor, s = await background_session(hub, "alice", nursery)
    await hub.store.allocate("g", 7)  # round queued, not run
    settle(actor.table)  # a view read (GetSequences) meanwhile: the row takes 7, nothing pushed
    await hub.store.remove_members("g", ["alice"], keep_history=True)
    await hub._fanout_round(hub.keys.lookup("g"))  # alice is out of it
    assert pushed_max(actor, s) == (7, 0)
    assert row_values(hub, "alice", "g") == await store_values(hub, "alice", "g") == (7, 0, 1)


async def test_a_failed_round_leaves_the_max_pending_on_the_members_it_did_not_reach(
    hub_with_rounds, nursery, monkeypatch
):
    hub = hub_with_rounds
    users = ["u0", "u1", "u2"]
    await hub.store.add_members("g", users)
    states = {u: await background_session(hub, u, nursery) for u in users}

    async def fail(n: int) -> None:
        raise RuntimeError("the round fails after its first slice")

    one_member_slices(monkeypatch, hub, fail)
    nursery.start_soon(hub.run_fanout)
    await hub.store.allocate("g", 5)
    await trio.testing.wait_all_tasks_blocked()  # the round failed; the resync ran
    assert not hub._hot_queue and not hub._latest
    assert {u: pushed_max(a, s) for u, (a, s) in states.items()} == {u: (5, 0) for u in users}


async def test_a_read_pushed_during_a_round_carries_the_max_it_needs(hub_with_rounds, nursery):
    hub = hub_with_rounds
    await hub.store.add_members("g", ["alice", "bob"])
    actor, s = await background_session(hub, "alice", nursery)
    await hub.store.allocate("g", 4)  # round queued, not run: s has not been pushed 4
    settle(actor.table)  # another session's GetSequences settled the row
    await hub.store.mark_read("g", "alice", 4)
    assert pushed_max(actor, s) == (4, 4)  # never read 4 with max 0
