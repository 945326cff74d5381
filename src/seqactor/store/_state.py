"""The in-memory model shared by every store backend, and the Store logic on top of it.

Two layers:

* **visible** state (:class:`Conv`, :class:`Member`, the per-user view index, tombstones):
  only committed changes, applied in position order. Reads and listeners see this.
* **pending** overlay (:class:`PConv`, :class:`PMem`, :class:`PView`): copies of the entities
  touched by operations that have a position but are not committed yet. Every operation is
  *computed* against visible + pending (so ranges are disjoint and gapless, reads clamp to the
  reserved max, I2 holds across uncommitted I6 reads, ...), which yields its change record and
  the rows to write. After the commit the change is *applied* to the visible state; as changes
  apply in position order, the visible state at apply time equals the pending state the
  operation was computed against, so applying is a plain replay of the record. An overlay entry
  is dropped when the last operation that touched it is applied.

A backend supplies ``_commit`` (make the operation durable, then apply and publish) and
``_settle`` (wait until everything computed so far is committed); :class:`StateStore`
implements every Store method once.
"""

from __future__ import annotations

import abc
import logging
from array import array
from collections import deque
from collections.abc import Iterable, Sequence

import trio

from seqactor.protocol import MAX_ALLOCATE_COUNT
from seqactor.store._base import (
    MAX_UINT64,
    Allocated,
    ConversationState,
    InvalidArgument,
    MemberReads,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    NotFound,
    NotMember,
    ReadMarked,
    Store,
    TooLarge,
    Unavailable,
    ViewData,
    check_uint64,
    check_user_ids,
    normalize_count,
    validate_id,
)

log = logging.getLogger("seqactor.store")

DEFAULT_MAX_TOMBSTONES = 1_000_000
TOMBSTONE_PRUNE_KEEP_RATIO = 0.9  # a prune keeps this share of max_tombstones

# Member status in the pending overlay.
NONE = 0
ACTIVE = 1
FROZEN = 2

# Row written to the durable log: conversations (id, max, min, time_ms, pos) and members
# (conversation_id, user_id, read, pos, frozen, frozen_max, frozen_min, frozen_time_ms).
ConvRow = tuple[str, int, int, int, int]
StateChange = Allocated | ReadMarked | MembersAdded | MembersRemoved | MinChanged
MemberRow = tuple[str, str, int, int, int, int, int, int]
TombRow = tuple[int, str, str]  # (pos, user_id, conversation_id)
MemberKey = tuple[str, str]  # (conversation_id, user_id): the member is deleted
Row = ConvRow | MemberRow | MemberKey | TombRow



# ------------------------------------------------------------------ visible state


class Conv:
    __slots__ = ("id", "max", "min", "time", "pos", "members", "active")

    def __init__(self, cid: str, max_: int = 0, min_: int = 0, time_: int = 0, pos: int = 0):
        self.id = cid
        self.max = max_
        self.min = min_
        self.time = time_
        self.pos = pos  # position of the last change of max/min/time (or creation)
        self.members: dict[str, Member] = {}  # active and frozen
        self.active = 0


class Member:
    __slots__ = ("conv", "read", "pos", "frozen", "fmax", "fmin", "ftime")

    def __init__(self, conv: Conv, read: int, pos: int) -> None:
        self.conv = conv
        self.read = read
        self.pos = pos  # position of the last change of read / join / freeze
        self.frozen = False
        self.fmax = 0
        self.fmin = 0
        self.ftime = 0


# ------------------------------------------------------------------ pending overlay


class PConv:
    __slots__ = ("max", "min", "time", "pos", "active", "last")

    def __init__(self, max_: int, min_: int, time_: int, pos: int, active: int) -> None:
        self.max = max_
        self.min = min_
        self.time = time_
        self.pos = pos
        self.active = active
        self.last = 0  # position of the last pending operation that touched it


class PMem:
    __slots__ = ("status", "read", "pos", "fmax", "fmin", "ftime", "last")

    def __init__(
        self, status: int, read: int, pos: int, fmax: int, fmin: int, ftime: int
    ) -> None:
        self.status = status
        self.read = read
        self.pos = pos
        self.fmax = fmax
        self.fmin = fmin
        self.ftime = ftime
        self.last = 0

    def row(self, cid: str, uid: str) -> MemberRow:
        return (cid, uid, self.read, self.pos, 1 if self.status == FROZEN else 0,
                self.fmax, self.fmin, self.ftime)


class PView:
    __slots__ = ("count", "last")

    def __init__(self, count: int) -> None:
        self.count = count
        self.last = 0


class Op:
    """A computed operation: its change record and the overlay keys it touched."""

    __slots__ = ("change", "conv", "mkeys", "users", "task")

    def __init__(
        self,
        change: StateChange,
        conv: bool = False,
        mkeys: Sequence[tuple[str, str]] = (),
        users: Sequence[str] = (),
    ) -> None:
        self.change = change
        self.conv = conv
        self.mkeys = mkeys
        self.users = users
        self.task: trio.lowlevel.Task | None = None  # waiting for the commit (SQLite)

    def abort(self, _: object) -> trio.lowlevel.Abort:
        """``wait_task_rescheduled`` abort: the waiter is gone, the operation stays."""
        self.task = None
        return trio.lowlevel.Abort.SUCCEEDED


class Sink:
    """Rows written by operations, in order (a SQLite batch is one). The kind of a row is its
    length: 5 a conversation, 8 a member, 2 a member deleted (its key), 3 a tombstone. The
    writer keeps the last row per key, so a batch writes each conversation / member once."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[Row] = []


# ------------------------------------------------------------------ the model


class State:
    """Visible state + pending overlay + the logic of every operation."""

    def __init__(self, max_tombstones: int = DEFAULT_MAX_TOMBSTONES) -> None:
        self.convs: dict[str, Conv] = {}
        self.views: dict[str, dict[str, Member]] = {}
        self.tombs: dict[str, deque[tuple[int, str]]] = {}  # user -> (pos, conversation)
        self.tomb_log: deque[tuple[int, str]] = deque()  # (pos, user), oldest first
        self.tomb_horizon = 0  # tombstones at or below were pruned
        self.max_tombstones = max_tombstones
        self.position = 0  # last applied (committed) position
        self.reserved = 0  # last position handed out
        self.pconv: dict[str, PConv] = {}
        self.pmem: dict[tuple[str, str], PMem] = {}
        self.pview: dict[str, PView] = {}

    # ---------------------------------------------------------- loading (SQLite open)

    def load(
        self,
        position: int,
        tomb_horizon: int,
        convs: Iterable[ConvRow],
        members: Iterable[MemberRow],
        tombs: Iterable[TombRow],
    ) -> None:
        self.position = self.reserved = position
        self.tomb_horizon = tomb_horizon
        all_convs = self.convs
        for cid, mx, mn, tm, pos in convs:
            all_convs[cid] = Conv(cid, mx, mn, tm, pos)
        views = self.views
        for cid, uid, read, pos, frozen, fmax, fmin, ftime in members:
            c = all_convs[cid]
            m = Member(c, read, pos)
            if frozen:
                m.frozen = True
                m.fmax = fmax
                m.fmin = fmin
                m.ftime = ftime
            else:
                c.active += 1
            c.members[uid] = m
            view = views.get(uid)
            if view is None:
                view = views[uid] = {}
            view[cid] = m
        for pos, uid, cid in tombs:  # ordered by position
            self._add_tomb(pos, uid, cid)

    # ---------------------------------------------------------- overlay access

    def _pc(self, cid: str) -> PConv | None:
        """Pending copy of a conversation (not registered), or None if it does not exist."""
        pc = self.pconv.get(cid)
        if pc is None:
            c = self.convs.get(cid)
            if c is None:
                return None
            pc = PConv(c.max, c.min, c.time, c.pos, c.active)
        return pc

    def _pm(self, key: tuple[str, str]) -> PMem:
        pm = self.pmem.get(key)
        if pm is None:
            c = self.convs.get(key[0])
            m = c.members.get(key[1]) if c is not None else None
            if m is None:
                return PMem(NONE, 0, 0, 0, 0, 0)
            return PMem(FROZEN if m.frozen else ACTIVE, m.read, m.pos, m.fmax, m.fmin, m.ftime)
        return pm

    def _pv(self, uid: str) -> PView:
        pv = self.pview.get(uid)
        if pv is None:
            view = self.views.get(uid)
            pv = PView(len(view) if view is not None else 0)
        return pv

    # ---------------------------------------------------------- compute (pending)

    def allocate(
        self, cid: str, count: int, sender: str | None, time_ms: int, sink: Sink | None
    ) -> Op:
        pos = self.reserved + 1
        pc = self.pconv.get(cid)
        if pc is None:
            c = self.convs.get(cid)
            if c is None:
                pc = PConv(0, 0, 0, pos, 0)
            else:
                pc = PConv(c.max, c.min, c.time, c.pos, c.active)
            self.pconv[cid] = pc
        first = pc.max + 1
        last = pc.max + count
        if last > MAX_UINT64:
            if pc.last == 0:  # registered just now: undo
                del self.pconv[cid]
            raise TooLarge("the conversation's sequence space is exhausted")
        pc.max = last
        # max_sequence_time_ms never decreases, also when the wall clock steps back
        if time_ms < pc.time:
            time_ms = pc.time
        pc.time = time_ms
        pc.pos = pc.last = self.reserved = pos
        if sink is not None:
            sink.rows.append((cid, last, pc.min, time_ms, pos))
        if sender is not None:
            key = (cid, sender)
            pm = self._pm(key)
            if pm.status == ACTIVE:
                pm.read = last
                pm.pos = pos
                pm.last = pos
                self.pmem[key] = pm
                if sink is not None:
                    sink.rows.append(pm.row(cid, sender))
                return Op(Allocated(cid, first, last, time_ms, pos, sender, last), True, (key,))
        return Op(Allocated(cid, first, last, time_ms, pos), True)

    def mark_read(self, cid: str, uid: str, read: int, sink: Sink | None) -> Op:
        pc = self._pc(cid)
        if pc is None:
            raise NotFound(f"conversation {cid!r} not found")
        key = (cid, uid)
        pm = self._pm(key)
        if pm.status == NONE:
            raise NotMember(f"conversation {cid!r} is not in the view of {uid!r}")
        cap = pc.max if pm.status == ACTIVE else pm.fmax
        effective = read if read < cap else cap
        if effective <= pm.read:
            return Op(ReadMarked(cid, uid, pm.read, self.reserved, False))
        pos = self.reserved = self.reserved + 1
        pm.read = effective
        pm.pos = pos
        pm.last = pos
        self.pmem[key] = pm
        if sink is not None:
            sink.rows.append(pm.row(cid, uid))
        return Op(ReadMarked(cid, uid, effective, pos, True), False, (key,))

    def set_min(self, cid: str, min_seq: int, sink: Sink | None) -> Op:
        pc = self._pc(cid)
        if pc is None:
            raise NotFound(f"conversation {cid!r} not found")
        effective = min_seq if min_seq < pc.max else pc.max
        if effective <= pc.min:
            return Op(MinChanged(cid, pc.min, self.reserved, False))
        pos = self.reserved = self.reserved + 1
        pc.min = effective
        pc.pos = pos
        pc.last = pos
        self.pconv[cid] = pc
        if sink is not None:
            sink.rows.append((cid, pc.max, effective, pc.time, pos))
        return Op(MinChanged(cid, effective, pos, True), True)

    def add_members(
        self,
        cid: str,
        uids: Sequence[str],
        max_view: int,
        max_members: int,
        sink: Sink | None,
    ) -> Op:
        pc = self._pc(cid)
        created = pc is None
        joiners: list[tuple[str, PMem]] = []
        for uid in uids:
            pm = self._pm((cid, uid))
            if pm.status != ACTIVE:
                joiners.append((uid, pm))
        active = pc.active if pc is not None else 0
        if active + len(joiners) > max_members:
            raise TooLarge(
                f"conversation {cid!r} would have {active + len(joiners)} members; "
                f"the limit is {max_members}"
            )
        for uid, pm in joiners:
            if pm.status == NONE and self._pv(uid).count + 1 > max_view:
                raise TooLarge(f"the view of {uid!r} would exceed {max_view} conversations")
        if pc is None:
            pc = PConv(0, 0, 0, self.reserved + 1, 0)
        elif not joiners:
            return Op(MembersAdded(cid, (), pc.max, pc.min, pc.time, self.reserved, False))
        # --- validated: mutate from here on
        pos = self.reserved = self.reserved + 1
        pc.active += len(joiners)
        pc.last = pos
        self.pconv[cid] = pc
        if created and sink is not None:
            sink.rows.append((cid, 0, 0, 0, pos))
        mkeys = []
        users = []
        for uid, pm in joiners:
            if pm.status == NONE:
                pv = self._pv(uid)
                pv.count += 1
                pv.last = pos
                self.pview[uid] = pv
                users.append(uid)
            pm.status = ACTIVE
            pm.read = pc.max
            pm.pos = pos
            pm.fmax = pm.fmin = pm.ftime = 0
            pm.last = pos
            key = (cid, uid)
            self.pmem[key] = pm
            mkeys.append(key)
            if sink is not None:
                sink.rows.append(pm.row(cid, uid))
        change = MembersAdded(
            cid, tuple(u for u, _ in joiners), pc.max, pc.min, pc.time, pos, True
        )
        return Op(change, True, mkeys, users)

    def remove_members(
        self, cid: str, uids: Sequence[str], keep_history: bool, sink: Sink | None
    ) -> Op:
        pc = self._pc(cid)
        if pc is None:
            raise NotFound(f"conversation {cid!r} not found")
        leavers: list[tuple[str, PMem]] = []
        for uid in uids:
            pm = self._pm((cid, uid))
            # keep_history freezes active members; without it the conversation leaves the
            # view of active members and of users who kept a frozen row.
            if pm.status == ACTIVE or (pm.status == FROZEN and not keep_history):
                leavers.append((uid, pm))
        if not leavers:
            return Op(MembersRemoved(cid, (), keep_history, self.reserved, False))
        pos = self.reserved = self.reserved + 1
        pc.last = pos
        self.pconv[cid] = pc
        mkeys = []
        users = []
        for uid, pm in leavers:
            key = (cid, uid)
            if pm.status == ACTIVE:
                pc.active -= 1
            if keep_history:
                pm.status = FROZEN
                pm.fmax = pc.max
                pm.fmin = pc.min
                pm.ftime = pc.time
                pm.pos = pos
                if sink is not None:
                    sink.rows.append(pm.row(cid, uid))
            else:
                pm.status = NONE
                pm.read = pm.pos = pm.fmax = pm.fmin = pm.ftime = 0
                pv = self._pv(uid)
                pv.count -= 1
                pv.last = pos
                self.pview[uid] = pv
                users.append(uid)
                if sink is not None:
                    sink.rows.append(key)
                    sink.rows.append((pos, uid, cid))
            pm.last = pos
            self.pmem[key] = pm
            mkeys.append(key)
        change = MembersRemoved(cid, tuple(u for u, _ in leavers), keep_history, pos, True)
        return Op(change, True, mkeys, users)

    # ---------------------------------------------------------- apply (visible)

    def apply(self, op: Op) -> None:
        """Apply a committed operation to the visible state (in position order)."""
        ch = op.change
        pos = ch.position
        cid = ch.conversation_id
        if type(ch) is Allocated:
            c = self.convs.get(cid)
            if c is None:
                c = self.convs[cid] = Conv(cid)
            c.max = ch.last
            c.time = ch.time_ms
            c.pos = pos
            if ch.sender_user_id is not None:
                m = c.members[ch.sender_user_id]
                m.read = ch.last
                m.pos = pos
        elif type(ch) is ReadMarked:
            m = self.convs[cid].members[ch.user_id]
            m.read = ch.read_sequence
            m.pos = pos
        elif type(ch) is MembersAdded:
            c = self.convs.get(cid)
            if c is None:
                c = self.convs[cid] = Conv(cid, pos=pos)
            for uid in ch.user_ids:
                m2 = c.members.get(uid)
                if m2 is None:
                    m2 = c.members[uid] = Member(c, ch.max_sequence, pos)
                    view = self.views.get(uid)
                    if view is None:
                        view = self.views[uid] = {}
                    view[cid] = m2
                else:  # rejoin after leaving with keep_history
                    m2.frozen = False
                    m2.fmax = m2.fmin = m2.ftime = 0
                    m2.read = ch.max_sequence
                    m2.pos = pos
                c.active += 1
        elif type(ch) is MembersRemoved:
            c = self.convs[cid]
            for uid in ch.user_ids:
                m3 = c.members[uid]
                if not m3.frozen:
                    c.active -= 1
                if ch.keep_history:
                    m3.frozen = True
                    m3.fmax = c.max
                    m3.fmin = c.min
                    m3.ftime = c.time
                    m3.pos = pos
                else:
                    del c.members[uid]
                    view = self.views[uid]
                    del view[cid]
                    if not view:
                        del self.views[uid]
                    self._add_tomb(pos, uid, cid)
        elif type(ch) is MinChanged:
            c = self.convs[cid]
            c.min = ch.min_sequence
            c.pos = pos
        # drop overlay entries no later pending operation touched
        if op.conv:
            pc = self.pconv.get(cid)
            if pc is not None and pc.last == pos:
                del self.pconv[cid]
        for key in op.mkeys:
            pm = self.pmem.get(key)
            if pm is not None and pm.last == pos:
                del self.pmem[key]
        for uid in op.users:
            pv = self.pview.get(uid)
            if pv is not None and pv.last == pos:
                del self.pview[uid]
        self.position = pos

    def _add_tomb(self, pos: int, uid: str, cid: str) -> None:
        dq = self.tombs.get(uid)
        if dq is None:
            dq = self.tombs[uid] = deque()
        dq.append((pos, cid))
        self.tomb_log.append((pos, uid))
        if len(self.tomb_log) > self.max_tombstones:
            self._prune_tombs()

    def _prune_tombs(self) -> None:
        keep = int(self.max_tombstones * TOMBSTONE_PRUNE_KEEP_RATIO)
        log_, tombs = self.tomb_log, self.tombs
        while len(log_) > keep:
            pos, uid = log_.popleft()
            dq = tombs[uid]
            dq.popleft()
            if not dq:
                del tombs[uid]
            self.tomb_horizon = pos

    # ---------------------------------------------------------- reads (visible)

    def load_view(self, uid: str) -> ViewData:
        view = self.views.get(uid)
        if not view:
            return ViewData(self.position)
        # One pass filling the columns (a comprehension per column and ViewData's default
        # columns, replaced at once, cost a session open ~1.4 µs for a one-row view).
        max_seq, read_seq, min_seq, pos = array("Q"), array("Q"), array("Q"), array("Q")
        time_ms, frozen = array("q"), bytearray()
        for m in view.values():
            if m.frozen:
                max_seq.append(m.fmax)
                min_seq.append(m.fmin)
                time_ms.append(m.ftime)
                pos.append(m.pos)
            else:
                conv = m.conv
                max_seq.append(conv.max)
                min_seq.append(conv.min)
                time_ms.append(conv.time)
                pos.append(m.pos if m.pos >= conv.pos else conv.pos)
            read_seq.append(m.read)
            frozen.append(m.frozen)
        return ViewData(self.position, list(view), max_seq, read_seq, min_seq, time_ms, pos, frozen)

    def removed_since(self, uid: str, position: int) -> list[str] | None:
        if position < self.tomb_horizon or position > self.position:
            return None
        dq = self.tombs.get(uid)
        if not dq:
            return []
        view = self.views.get(uid) or {}
        found: dict[str, None] = {}
        for pos, cid in reversed(dq):
            if pos <= position:
                break
            if cid not in view:
                found[cid] = None
        return list(reversed(found))

    def view_contains(self, uid: str, cid: str) -> bool:
        view = self.views.get(uid)
        return view is not None and cid in view

    def conversation(self, cid: str) -> ConversationState | None:
        c = self.convs.get(cid)
        if c is None:
            return None
        return ConversationState(cid, c.max, c.min, c.time, c.active)

    def load_members(self, cid: str) -> MemberReads | None:
        c = self.convs.get(cid)
        if c is None:
            return None
        active = [(uid, m.read) for uid, m in c.members.items() if not m.frozen]
        return MemberReads(
            cid, self.position, c.max, c.min, [uid for uid, _ in active],
            array("Q", [read for _, read in active]),
        )


# ------------------------------------------------------------------ argument checks


# written once in _base for every store (the names here are kept for older imports)
_uint64 = check_uint64
_user_ids = check_user_ids


# ------------------------------------------------------------------ the Store on top


class StateStore(Store):
    """Every Store method, over :class:`State`; a backend provides durability."""

    def __init__(
        self,
        *,
        max_view_conversations: int | None = None,
        max_conversation_members: int | None = None,
        max_tombstones: int = DEFAULT_MAX_TOMBSTONES,
    ) -> None:
        super().__init__()
        if max_view_conversations is not None:
            self.max_view_conversations = max_view_conversations
        if max_conversation_members is not None:
            self.max_conversation_members = max_conversation_members
        if max_tombstones < 1:
            raise InvalidArgument("max_tombstones must be at least 1")
        self._state = State(max_tombstones)
        self.epoch = b""
        self.position = 0
        self._opened = False
        self._closed = False
        self._writable = False  # opened, not closed, not failed

    # ---------------------------------------------------------- backend hooks

    @abc.abstractmethod
    def _sink(self) -> Sink | None:
        """Where the next operation writes its rows (None: nothing durable)."""

    @abc.abstractmethod
    async def _commit(self, op: Op) -> None:
        """Make ``op`` durable; return once it is committed, applied and published."""

    @abc.abstractmethod
    async def _settle(self) -> None:
        """Return once every operation computed so far is committed (for no-op answers)."""

    def _check_writable(self) -> None:
        if not self._writable:
            raise self._unwritable()

    def _unwritable(self) -> Unavailable:
        return Unavailable("the store is not open")

    def _apply(self, op: Op) -> None:
        """Apply a committed op to the visible state and tell the listeners."""
        self._state.apply(op)
        change = op.change
        self.position = change.position
        self._publish(change)

    def _apply_many(self, ops: Sequence[Op]) -> None:
        """:meth:`_apply` for a committed batch, in order."""
        apply = self._state.apply
        publish = self._publish
        for op in ops:
            apply(op)
            change = op.change
            self.position = change.position
            publish(change)

    async def _run(self, op: Op) -> StateChange:
        if op.change.changed:
            await self._commit(op)
        else:
            await self._settle()
        return op.change

    # ---------------------------------------------------------- writes

    async def allocate(
        self, conversation_id: str, count: int, sender_user_id: str | None = None
    ) -> Allocated:
        await trio.lowlevel.checkpoint_if_cancelled()
        state = self._state
        # ids of known conversations were validated when they were created
        if type(conversation_id) is not str or conversation_id not in state.convs:
            validate_id(conversation_id, "conversation_id")
        n = count if type(count) is int and 0 < count <= MAX_ALLOCATE_COUNT else (
            normalize_count(count))
        # proto3 leaves an unset string empty: "" means no sender
        sender = validate_id(sender_user_id, "sender_user_id") if sender_user_id else None
        if not self._writable:
            raise self._unwritable()
        op = state.allocate(conversation_id, n, sender, self.clock_ms(), self._sink())
        await self._commit(op)
        return op.change  # type: ignore[return-value]

    async def mark_read(
        self, conversation_id: str, user_id: str, read_sequence: int
    ) -> ReadMarked:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        validate_id(user_id, "user_id")
        read = _uint64(read_sequence, "read_sequence")
        self._check_writable()
        op = self._state.mark_read(conversation_id, user_id, read, self._sink())
        return await self._run(op)  # type: ignore[return-value]

    async def set_min_sequence(self, conversation_id: str, min_sequence: int) -> MinChanged:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        value = _uint64(min_sequence, "min_sequence")
        self._check_writable()
        op = self._state.set_min(conversation_id, value, self._sink())
        return await self._run(op)  # type: ignore[return-value]

    async def add_members(self, conversation_id: str, user_ids: Sequence[str]) -> MembersAdded:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        uids = _user_ids(user_ids)
        self._check_writable()
        op = self._state.add_members(
            conversation_id,
            uids,
            self.max_view_conversations,
            self.max_conversation_members,
            self._sink(),
        )
        return await self._run(op)  # type: ignore[return-value]

    async def remove_members(
        self, conversation_id: str, user_ids: Sequence[str], keep_history: bool
    ) -> MembersRemoved:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        uids = _user_ids(user_ids)
        self._check_writable()
        op = self._state.remove_members(
            conversation_id, uids, bool(keep_history), self._sink()
        )
        return await self._run(op)  # type: ignore[return-value]

    # ---------------------------------------------------------- reads
    # (In memory: a cancel point, not a schedule point. Every session open loads a view, and
    # a pass through the scheduler there cost ~3 µs of each.)

    async def load_view(self, user_id: str) -> ViewData:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(user_id, "user_id")
        return self._state.load_view(user_id)

    async def removed_since(self, user_id: str, position: int) -> list[str] | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(user_id, "user_id")
        return self._state.removed_since(user_id, _uint64(position, "position"))

    async def view_contains(self, user_id: str, conversation_id: str) -> bool:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(user_id, "user_id")
        validate_id(conversation_id, "conversation_id")
        return self._state.view_contains(user_id, conversation_id)

    async def conversation(self, conversation_id: str) -> ConversationState | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        return self._state.conversation(conversation_id)

    async def load_members(self, conversation_id: str) -> MemberReads | None:
        await trio.lowlevel.checkpoint_if_cancelled()
        validate_id(conversation_id, "conversation_id")
        return self._state.load_members(conversation_id)
