"""The fan-out kernel: ``fan_slice`` and ``settle`` (compiled and pure Python against each
other, on the server's real actor, view and session-state objects) and ``write_many`` on real
sockets."""

from __future__ import annotations

import errno
import socket
from array import array
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqactor import _delta as C
from seqactor import _delta_py as P
from seqactor.server._view import FIELD_MAX, FIELD_READ, SharedMax, ViewTable
from seqactor.server.actor import SessionState, UserActor
from seqactor.server.metrics import HotCounters

IMPLS = [C, P]
KEY = 7
OTHER_KEY = 8
SHARED = (b"with-token", b"without")
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class _Hub:
    """The two things an actor asks of its hub outside the calls under test."""

    def __init__(self) -> None:
        self.counters = HotCounters()
        self.shared = SharedMax()


def _fatal(code: int, reason: str) -> None:
    raise AssertionError(f"unexpected fatal {code} {reason}")


# One session: (subscription: "all" | "key" | "other", busy: "" | "writer" | "background" |
# "pending" | "removed", fd or -1)
session_st = st.tuples(
    st.sampled_from(["all", "key", "other"]),
    st.sampled_from(["", "", "", "writer", "background", "pending", "removed"]),
    st.sampled_from([-1, 3, 40, 1000, 65_000]),
)
CHANGE = object()  # the change a round hands out (fan_slice compares it by identity)
EARLIER = object()
# One member: (what an earlier round handed it: None | "this" | "earlier", sessions)
member_st = st.tuples(
    st.sampled_from([None, "this", "earlier"]),
    st.lists(session_st, max_size=3),
)


def _on_base(cls: type, base: type) -> Any:
    """``cls`` (the server's ``UserActor`` or ``SessionState``) on ``base``, the other
    kernel's fan-out class: the same methods and slots. The server's classes extend the
    selected kernel's (``FanoutActor``, ``FanoutSession``), and the compiled kernel reads
    its own classes' C fields, so comparing both kernels on the same server objects takes
    both bases."""
    if issubclass(cls, base):
        return cls
    own = set(cls.__slots__)  # type: ignore[attr-defined]
    namespace = {k: v for k, v in vars(cls).items() if k not in own and k != "__weakref__"}
    return type(cls.__name__, (base,), namespace)


def _build(spec: list[Any], impl: Any = C) -> list[UserActor]:
    """Actors with sessions from ``spec``, on ``impl``'s fan-out base classes."""
    actor_cls = _on_base(UserActor, impl.FanoutActor)
    session_cls = _on_base(SessionState, impl.FanoutSession)
    hub = _Hub()
    members = []
    for n, (fanned, sessions) in enumerate(spec):
        actor = actor_cls(hub, f"u{n}")
        actor.table.upsert(OTHER_KEY, 5, 5, 0, 1, 1)
        actor.table.upsert(KEY, 10, 0, 0, 100, 10)
        actor.fanned = {None: None, "this": CHANGE, "earlier": EARLIER}[fanned]
        for m, (sub, busy, fd) in enumerate(sessions):
            s = session_cls(f"s{n}.{m}", actor.user_id, "", 4, _fatal, hub.counters)
            if sub == "all":
                s.subscribed_all = True
            elif sub == "key":
                s.follow([KEY])
            else:
                s.follow([OTHER_KEY])
            s.writer_running = busy == "writer"
            s.background = busy == "background"
            if busy == "pending":
                s.pending[OTHER_KEY] = FIELD_READ
            if busy == "removed":
                s.mark_removed("gone")
            s.fd = fd
            actor.sessions.append(s)
        members.append(actor)
    return members


def _observe(members: list[UserActor], out: tuple[Any, ...]) -> Any:
    """Everything a fan-out slice may change, as plain data."""
    i, failures, fds, sessions = out
    names = {id(s): s.session_id for a in members for s in a.sessions}
    state = []
    for a in members:
        t = a.table
        row = t.row_of(KEY)
        state.append((
            (t.max_seq[row], t.time_ms[row], t.pos[row], a.fanned is CHANGE),
            a._woken,
            [(dict(s.pending), s.shared) for s in a.sessions],
        ))
    return (
        i,
        None if failures is None else [(a.user_id, type(e).__name__) for a, e in failures],
        [list(f) for f in fds],
        [[names[id(s)] for s in lst] for lst in sessions],
        state,
    )


def _run(impl: Any, spec: list[Any], start: int, slice_s: float, every: int) -> Any:
    members = _build(spec, impl)
    fds = (array("i"), array("i"))
    sessions: tuple[list[SessionState], list[SessionState]] = ([], [])
    i, failures = impl.fan_slice(
        members, start, KEY, CHANGE, FIELD_MAX, SHARED, fds, sessions, slice_s, every,
    )
    return _observe(members, (i, failures, fds, sessions))


@SETTINGS
@given(st.lists(member_st, max_size=12), st.data())
def test_fan_slice_compiled_equals_python(spec: list[Any], data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(spec)))
    every = data.draw(st.integers(1, 5))
    for slice_s in (60.0, -1.0):  # all of them; stop at the first look at the clock
        got = _run(C, spec, start, slice_s, every)
        assert got == _run(P, spec, start, slice_s, every)


@pytest.mark.parametrize("impl", IMPLS)
def test_fan_slice_what_each_member_gets(impl: Any) -> None:
    spec = [
        (None, [("all", "", 40), ("key", "", 41), ("other", "", 42)]),  # idle: batch
        (None, [("all", "writer", 43)]),  # busy: pending, actor woken
        ("this", [("all", "", 44)]),  # an earlier round handed it this change: nothing
        ("earlier", [("all", "", 45)]),  # it had an older one: batch
        (None, [("key", "", -1)]),  # no direct write now: pending
    ]
    i, failures, fds, sessions, state = _run(impl, spec, 0, 60.0, 16)
    assert i == len(spec) and failures is None
    assert fds == [[40, 45], [41]]
    assert sessions == [["s0.0", "s3.0"], ["s0.1"]]
    row = (10, 100, 10, True)  # no row is touched: reads settle it from the shared max
    assert state[0] == (row, False, [({}, None), ({}, None), ({}, None)])
    assert state[1] == (row, True, [({KEY: FIELD_MAX}, SHARED)])
    assert state[2] == (row, False, [({}, None)])
    assert state[3] == (row, False, [({}, None)])
    assert state[4] == (row, True, [({KEY: FIELD_MAX}, SHARED)])


def _route(impl: Any, spec: list[Any], shared: Any) -> Any:
    """``route`` over the sessions of one member built from ``spec`` (its row is not touched)."""
    (actor,) = _build([(None, spec)], impl)
    fds = (array("i"), array("i"))
    out: tuple[list[SessionState], list[SessionState]] = ([], [])
    marked = impl.route(actor.sessions, KEY, FIELD_READ, shared, fds, out)
    names = {id(s): s.session_id for s in actor.sessions}
    return (marked, [list(f) for f in fds], [[names[id(s)] for s in lst] for lst in out],
            [(dict(s.pending), s.shared) for s in actor.sessions])


@SETTINGS
@given(st.lists(session_st, max_size=6), st.sampled_from([None, SHARED]))
def test_route_compiled_equals_python(spec: list[Any], shared: Any) -> None:
    """The one fan-out rule (who gets a change, and how): both kernels agree, and without a
    shared frame no session is picked for a batch write."""
    got = _route(C, spec, shared)
    assert got == _route(P, spec, shared)
    if shared is None:
        assert got[1] == [[], []]
    followers = [n for n, (sub, _, _) in enumerate(spec) if sub != "other"]
    picked = set(got[2][0] + got[2][1])
    for n, (pending, _) in enumerate(got[3]):
        name = f"s0.{n}"
        if n in followers:  # a follower is either written now or has it pending
            assert (name in picked) != (KEY in pending), (name, got)
        else:
            assert name not in picked and KEY not in pending
    assert got[0] == any(KEY in p for p, _ in got[3])


@pytest.mark.parametrize("impl", IMPLS)
def test_fan_slice_stops_at_the_deadline(impl: Any) -> None:
    spec = [(None, [("all", "", 10 + n)]) for n in range(10)]
    i, _, fds, _, state = _run(impl, spec, 2, -1.0, 3)  # deadline already passed
    assert i == 3  # the clock is read when i % 3 == 0
    assert fds == [[12], []]
    assert [s[0][3] for s in state] == [False, False, True] + [False] * 7


@pytest.mark.parametrize("impl", IMPLS)
def test_fan_slice_reports_a_failing_member_and_goes_on(impl: Any) -> None:
    members = _build([(None, [("all", "", 10)]), (None, [("all", "", 11)])], impl)
    members.insert(1, object())  # type: ignore[arg-type]  # not an actor
    fds = (array("i"), array("i"))
    sessions: tuple[list[Any], list[Any]] = ([], [])
    i, failures = impl.fan_slice(
        members, 0, KEY, CHANGE, FIELD_MAX, SHARED, fds, sessions, 60.0, 16)
    assert i == 3
    # the compiled kernel checks the class (it reads C fields), the twin finds no ``fanned``
    error = TypeError if impl is C else AttributeError
    assert [(a is members[1], type(e)) for a, e in failures] == [(True, error)]
    assert list(fds[0]) == [10, 11]


@pytest.mark.parametrize("impl", IMPLS)
def test_fan_slice_over_odd_members_well_past_the_prefetch(impl: Any) -> None:
    """The compiled loop reads ahead of itself (up to 8 members: actor, sessions list, items,
    first session, its pending dict). Whatever it meets ahead — not an actor, an actor without
    sessions or whose sessions are not a list of session states — the slice hands out the
    same as the twin: every idle session written, every odd member reported."""
    spec = [(None, [("all", "", 100 + n)]) for n in range(40)]
    members: list[Any] = _build(spec, impl)
    members[3] = object()  # not an actor
    members[9].sessions.clear()  # no session
    members[12].sessions = None  # compiled: a typed list field also takes None
    members[20].sessions.insert(0, object())  # not a session state, before a real one
    members[25].sessions[0].pending = None  # (the rule reads it as "nothing pending")
    del members[-1].sessions[:]
    fds = (array("i"), array("i"))
    sessions: tuple[list[Any], list[Any]] = ([], [])
    i, failures = impl.fan_slice(
        members, 0, KEY, CHANGE, FIELD_MAX, SHARED, fds, sessions, 60.0, 16)
    assert i == len(members)
    assert sorted(members.index(a) for a, _ in failures) == [3, 12, 20]
    written = [100 + n for n in range(39) if n not in (3, 9, 12, 20)]
    assert list(fds[0]) == written and not fds[1]


@pytest.mark.parametrize("impl", IMPLS)
def test_fan_slice_stops_when_a_callee_empties_the_member_list(impl: Any) -> None:
    """A busy session's ``mark()`` runs Python code inside the loop; if that shortens the
    member list the slice ends there (no read past the list: the compiled loop would crash)."""
    members: list[Any] = _build([(None, [("all", "", 10 + n)]) for n in range(12)], impl)
    session_cls = _on_base(SessionState, impl.FanoutSession)

    class Shrinking(session_cls):  # type: ignore[misc, valid-type]
        __slots__ = ()

        def mark(self, *args: Any) -> None:
            super().mark(*args)
            members.clear()

    busy = Shrinking("busy", "u2", "", 4, _fatal, HotCounters())
    busy.subscribed_all = True
    busy.writer_running = True  # busy: the change is marked pending
    members[2].sessions[0] = busy
    fds = (array("i"), array("i"))
    i, failures = impl.fan_slice(
        members, 0, KEY, CHANGE, FIELD_MAX, SHARED, fds, ([], []), 60.0, 16)
    assert (i, failures, list(fds[0])) == (3, None, [10, 11])
    assert busy.pending == {KEY: FIELD_MAX}


@pytest.mark.parametrize("impl", IMPLS)
def test_fan_slice_refuses_a_negative_start(impl: Any) -> None:
    members = _build([(None, [("all", "", 10)])], impl)
    with pytest.raises(ValueError):
        impl.fan_slice(members, -1, KEY, CHANGE, FIELD_MAX, SHARED, (array("i"), array("i")),
                       ([], []), 1.0, 16)


def test_fan_slice_rejects_bad_arguments() -> None:
    members = _build([(None, [("all", "", 10)])])
    with pytest.raises(TypeError):
        C.fan_slice(members, 0, KEY, CHANGE, FIELD_MAX, SHARED, (array("q"), array("i")),
                    ([], []), 1.0, 16)
    with pytest.raises(ValueError):
        C.fan_slice(members, 0, KEY, CHANGE, FIELD_MAX, SHARED, (array("i"), array("i")),
                    ([], []), 1.0, 0)
    # a session's descriptor is a C int: anything else is refused when it is set
    with pytest.raises(TypeError):
        members[0].sessions[0].fd = "10"  # type: ignore[assignment]
    assert members[0].sessions[0].fd == 10
    # a member that is not an actor is an error for that member, not a wrong write
    members.append(object())  # type: ignore[arg-type]
    _, failures = C.fan_slice(members, 0, KEY, CHANGE, FIELD_MAX, SHARED,
                              (array("i"), array("i")), ([], []), 1.0, 16)
    assert failures is not None and isinstance(failures[0][1], TypeError)


# ------------------------------------------------------------------ settle

# One row: (max, time, pos, frozen); the shared column: (max, time, pos) per key id 0..3
row_st = st.tuples(st.integers(0, 9), st.integers(0, 99), st.integers(0, 9), st.booleans())
shared_st = st.lists(st.tuples(st.integers(0, 9), st.integers(0, 99), st.integers(0, 9)),
                     max_size=4)


def _settle(impl: Any, rows: list[Any], shared: list[Any], which: Any, upto: Any) -> Any:
    sm = SharedMax()
    for k, (mx, tm, pos) in enumerate(shared):
        sm.advance(k, mx, tm, pos)
    t = ViewTable(sm)
    for k, (mx, tm, pos, frozen) in enumerate(rows):
        t.upsert(k, mx, 0, 0, tm, pos, frozen)
    changed = impl.settle(t, which, upto)
    return changed, list(t.max_seq), list(t.time_ms), list(t.pos)


@SETTINGS
@given(st.lists(row_st, max_size=6), shared_st, st.data())
def test_settle_compiled_equals_python(rows: list[Any], shared: list[Any],
                                       data: st.DataObject) -> None:
    which = data.draw(st.none() | st.lists(st.integers(0, max(0, len(rows) - 1)),
                                           max_size=len(rows)))
    upto = data.draw(st.none() | st.integers(-3, 12) | st.sampled_from([2**64 - 1, 2**64, 2**70]))
    got = _settle(C, rows, shared, which, upto)
    assert got == _settle(P, rows, shared, which, upto)


@pytest.mark.parametrize("impl", IMPLS)
def test_settle_what_each_row_takes(impl: Any) -> None:
    rows = [
        (3, 30, 3, False),  # behind the shared max: takes max, time and the later position
        (3, 30, 3, True),  # frozen: keeps its values
        (9, 90, 1, False),  # ahead of the shared max: unchanged
        (1, 10, 9, False),  # behind, but its own position is later: keeps it
        (0, 0, 0, False),  # key 4: nothing shared recorded for it
    ]
    shared = [(5, 50, 6), (5, 50, 6), (5, 50, 6), (5, 50, 6)]
    assert _settle(impl, rows, shared, None, None) == (
        2, [5, 3, 9, 5, 0], [50, 30, 90, 50, 0], [6, 3, 1, 9, 0])
    # only the listed rows; with ``upto`` only what was recorded at or before that position
    assert _settle(impl, rows, shared, [3], None)[1] == [3, 3, 9, 5, 0]
    assert _settle(impl, rows, shared, None, 5)[0] == 0
    assert _settle(impl, rows, shared, None, 6)[0] == 2
    with pytest.raises(IndexError):
        _settle(impl, rows, shared, [5], None)
    # a view without a shared column is always exact: nothing to do
    assert impl.settle(ViewTable(), None, None) == 0


# ------------------------------------------------------------------ write_many


@pytest.mark.parametrize("impl", IMPLS)
def test_write_many_real_sockets(impl: Any) -> None:
    pairs = [socket.socketpair() for _ in range(3)]
    try:
        for a, _ in pairs:
            a.setblocking(False)
        full = pairs[2][0]
        try:  # fill the third socket's buffer completely
            while True:
                full.send(b"x" * 65536)
        except BlockingIOError:
            pass
        r, w = socket.socketpair()
        bad = w.fileno()
        w.close()  # a descriptor that is closed now
        r.close()
        fds = array("i", [pairs[0][0].fileno(), pairs[1][0].fileno(), full.fileno(), bad])
        results = array("q", bytes(8 * len(fds)))
        impl.write_many(fds, b"frame", results)
        assert list(results) == [5, 5, -errno.EAGAIN, -errno.EBADF]
        assert pairs[0][1].recv(100) == b"frame"
        assert pairs[1][1].recv(100) == b"frame"
        with pytest.raises(ValueError):
            impl.write_many(fds, b"frame", array("q", bytes(8)))
    finally:
        for a, b in pairs:
            a.close()
            b.close()
