"""Group read counts (docs/protocol.md "Group read counts"): the per-conversation read indexes
of a node, their upkeep from the store's change stream, and read-count watches (the ops
``GetReadCounts``, ``WatchReadCounts`` and ``GetReaders`` are in :mod:`seqactor.server.ops`).

**Index.** :class:`ReadIndex` wraps the kernel's :class:`~seqactor._kernel.ReadCounter` (counts
over seqs, see ``_readindex_py``) with the member ids: ``slots`` (user id → slot), ``uids``
(the members sorted by user id; Python orders ``str`` by code point, which is the bytewise order
of their UTF-8) and ``order`` (their slots in that order, ``array('I')``, scanned in C by
``GetReaders``).

**Upkeep.** :class:`ReadIndexes` is a store listener: it sees every committed change in
position order, as the hub does, and applies it to the index of its conversation if one is
held. An index is built lazily on first use from ``store.load_members``; changes that arrive
while it loads are buffered and those above the snapshot's position are replayed. A
``StoreReset`` drops every index (they are rebuilt on next use).

**Consistency.** Before answering, an op awaits ``store.sync()``: on Redis this waits until every
change committed on any node before the request has reached this node's listeners, so a
MarkRead acknowledged on node A is counted by node B's next reply.

**Bounded memory.** An index that no watch uses and nobody queried for ``read_index_idle_s``
(default :data:`~seqactor.server.config.READ_INDEX_IDLE_S`) is dropped at the next load or query, and
indexes beyond ``read_index_max_members`` members in total (default
:data:`~seqactor.server.config.READ_INDEX_MAX_MEMBERS`) are dropped least recently used first; indexes
with watches are kept while watched.

**Watches.** A session's watches (at most ``max_read_count_watches``) are served by one task in
the session's nursery. A change marks the watches of its conversation dirty only when it moves
something in their range (``O(watches of the conversation)`` per change); the task pushes a
dirty watch's counts for the newest ``max_read_count_range`` seqs of ``[from, max]`` at most once
per ``read_counts_interval_ms``, computed when it is sent (``O(range)``, never ``O(members)``).
A push goes through the session's bounded reply queue; while a reader is stuck the task waits,
and the watch's changes coalesce into its dirty flag (latest wins): memory stays bounded.
"""

from __future__ import annotations

import logging
import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from seqactor import _kernel as kernel
from seqactor.server.config import ServerConfig
from seqactor.store import (
    Allocated,
    Change,
    MemberReads,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    NotFound,
    NotMember,
    ReadMarked,
    Store,
    StoreReset,
    TooLarge,
    Unavailable,
)
from seqactor.store._base import validate_id

if TYPE_CHECKING:
    from seqactor.auth import Identity
    from seqactor.server.actor import SessionState

StartSoon = Callable[[Callable[[], Awaitable[None]]], bool]  # start a task; False: closing

log = logging.getLogger("seqactor.readcounts")

EVERYTHING = (1 << 64) - 1  # "every seq's count may have changed" (membership, max, min)
BULK_MEMBERSHIP = 256  # joins in one change above this rebuild the sorted order (O(n log n))
NOT_IN_VIEW = "conversation is not in your view"  # the same for foreign and unknown ones (I4)
BUILD_IN_THREAD_MEMBERS = 50_000  # bigger indexes are built in a worker thread
BACKGROUND_POLL_S = 0.25  # a session in background: its dirty watches are looked at this often


class ReadIndex:
    """One conversation's current members and their reads (see the module doc)."""

    __slots__ = ("conversation_id", "counter", "slots", "uids", "order", "min_sequence", "used")

    def __init__(self, snap: MemberReads) -> None:
        self.conversation_id = snap.conversation_id
        counter = kernel.ReadCounter(snap.max_sequence)
        first = counter.extend(snap.read_seq)
        self.counter = counter
        self.slots: dict[str, int] = {uid: first + i for i, uid in enumerate(snap.user_ids)}
        self.uids: list[str] = sorted(snap.user_ids)
        slots = self.slots
        self.order = array("I", [slots[u] for u in self.uids])
        self.min_sequence = snap.min_sequence
        self.used = 0.0  # trio.current_time() of the last use (set by the registry)

    @property
    def max_sequence(self) -> int:
        return int(self.counter.max_sequence)

    def first_seq(self) -> int:
        """The first seq counts are given for: ``max(1, min_sequence)``."""
        return max(1, self.min_sequence)

    # ------------------------------------------------------------ changes

    def apply(self, change: Change) -> int | None:
        """Apply a committed change → the highest seq whose count changed (``EVERYTHING`` when
        membership, max or min moved), or None when nothing changed."""
        counter = self.counter
        if type(change) is ReadMarked:  # the hot path: one per MarkRead
            slot = self.slots.get(change.user_id)
            if slot is None:  # a frozen member marking read: not counted
                return None
            read = change.read_sequence
            return read if read > counter.raise_read(slot, read) else None
        if isinstance(change, Allocated):
            counter.set_max(change.last)
            if change.sender_user_id is not None and change.sender_read:
                slot = self.slots.get(change.sender_user_id)
                if slot is not None:
                    counter.raise_read(slot, change.sender_read)
            return EVERYTHING
        if isinstance(change, MembersAdded):
            counter.set_max(change.max_sequence)
            self.min_sequence = max(self.min_sequence, change.min_sequence)
            self._join([u for u in change.user_ids if u not in self.slots], change.max_sequence)
            return EVERYTHING
        if isinstance(change, MembersRemoved):
            gone = [u for u in change.user_ids if u in self.slots]
            for uid in gone:
                counter.remove(self.slots.pop(uid))
                i = bisect_left(self.uids, uid)
                del self.uids[i]
                del self.order[i]
            return EVERYTHING if gone else None
        if isinstance(change, MinChanged):
            if change.min_sequence > self.min_sequence:
                self.min_sequence = change.min_sequence
                return EVERYTHING
        return None

    def _join(self, uids: list[str], read: int) -> None:
        if not uids:
            return
        counter, slots = self.counter, self.slots
        for uid in uids:
            slots[uid] = counter.add(read)
        if len(uids) > BULK_MEMBERSHIP:
            self.uids = sorted(slots)
            self.order = array("I", [slots[u] for u in self.uids])
            return
        for uid in uids:
            i = bisect_left(self.uids, uid)
            self.uids.insert(i, uid)
            self.order.insert(i, slots[uid])

    # ------------------------------------------------------------ queries

    def clamp(self, from_sequence: int, to_sequence: int) -> tuple[int, int]:
        """A request's range → (clamped from, number of seqs); 0 = first / max (docs/protocol.md,
        "Group read counts", Ranges)."""
        first = self.first_seq()
        mx = self.max_sequence
        lo = max(from_sequence or first, first)
        hi = min(to_sequence or mx, mx)
        return lo, max(0, hi - lo + 1)

    def watch_range(self, from_sequence: int, max_range: int) -> tuple[int, int]:
        """A watch's push range: ``[from, max]`` clamped, at most its newest ``max_range``."""
        lo, n = self.clamp(from_sequence, 0)
        if n > max_range:
            lo, n = lo + n - max_range, max_range
        return lo, n

    def readers(self, seq: int, unread: bool, limit: int, after: str) -> tuple[list[str], str]:
        """Members with read >= ``seq`` (``unread``: <), by user id after ``after`` →
        (at most ``limit`` ids, the last one when more remain else "")."""
        start = bisect_right(self.uids, after) if after else 0
        found, more = self.counter.readers(self.order, start, min(seq, EVERYTHING - 1), unread, limit)
        uids = self.uids
        ids = [uids[p] for p in found]
        return ids, (ids[-1] if more and ids else "")

    def nbytes(self) -> int:
        """Bytes of the counting structures (the kernel's C arrays and ``order``); the id
        dictionary and list are Python objects on top (docs/kernel.md gives both)."""
        return int(self.counter.nbytes()) + self.order.itemsize * len(self.order)


class _Loading:
    __slots__ = ("buffer", "done", "reset")

    def __init__(self) -> None:
        self.buffer: list[Change] = []
        self.done = trio.Event()
        self.reset = False


class Watch:
    """One ``WatchReadCounts`` of one session."""

    __slots__ = ("owner", "conversation_id", "from_sequence", "dirty", "last_push")

    def __init__(self, owner: SessionWatches, conversation_id: str, from_sequence: int) -> None:
        self.owner = owner
        self.conversation_id = conversation_id
        self.from_sequence = from_sequence
        self.dirty = True  # the first push: the current counts
        self.last_push = -math.inf


class SessionWatches:
    """A session's watches and the task that pushes them."""

    __slots__ = ("registry", "state", "user_id", "service", "watches", "wake", "running")

    def __init__(self, registry: ReadIndexes, state: SessionState, service: bool) -> None:
        self.registry = registry
        self.state = state
        self.user_id = state.user_id
        self.service = service  # a backend: watches any conversation, membership not checked
        self.watches: dict[str, Watch] = {}
        self.wake = trio.Event()
        self.running = False

    def mark(self, watch: Watch) -> None:
        watch.dirty = True
        self.wake.set()

    async def run(self) -> None:
        """Push dirty watches, each at most once per interval, until the session ends."""
        reg = self.registry
        interval = reg.config.read_counts_interval_ms / 1000.0
        try:
            while True:
                await self.wake.wait()
                self.wake = trio.Event()
                while True:
                    dirty = [w for w in self.watches.values() if w.dirty]
                    if not dirty:
                        break
                    now = trio.current_time()
                    due = min(w.last_push for w in dirty) + interval
                    if self.state.background:  # held while in background (docs/protocol.md, SetBackground)
                        await trio.sleep(max(interval, BACKGROUND_POLL_S))
                        continue
                    if due > now:  # coalesce: changes until then join this push
                        await trio.sleep_until(due)
                        continue
                    for w in dirty:
                        if not w.dirty or w.last_push + interval > now:
                            continue
                        if self.watches.get(w.conversation_id) is not w:
                            continue
                        w.dirty = False
                        w.last_push = now
                        frame = await reg.push_frame(w)
                        if frame is not None:
                            await self.state.put_reply(frame)
        finally:
            self.running = False
            reg.drop_session(self)


class ReadIndexes:
    """A node's read indexes and watches, kept current as a store listener."""

    def __init__(self, store: Store, config: ServerConfig) -> None:
        self.store = store
        self.config = config
        self.indexes: dict[str, ReadIndex] = {}
        self.loading: dict[str, _Loading] = {}
        self.watches: dict[str, set[Watch]] = {}
        self.sessions: dict[int, SessionWatches] = {}  # id(SessionState) -> its watches
        store.add_listener(self.apply)

    # ------------------------------------------------------------ the change stream

    def apply(self, change: Change) -> None:
        """Store listener: called after each commit, in position order."""
        try:
            self._apply(change)
        except Exception:  # an index that missed a change is wrong: drop them all
            log.exception("read index update failed on %r; dropping the read indexes", change)
            self._reset()

    def _reset(self) -> None:
        self.indexes.clear()
        for ld in self.loading.values():
            ld.reset = True
        for ws in self.watches.values():
            for w in ws:
                w.owner.mark(w)

    def _apply(self, change: Change) -> None:
        if isinstance(change, StoreReset):
            self._reset()
            return
        cid = change.conversation_id
        ld = self.loading.get(cid)
        if ld is not None:
            ld.buffer.append(change)
        idx = self.indexes.get(cid)
        top = EVERYTHING if idx is None else idx.apply(change)
        watches = self.watches.get(cid)
        if not watches or top is None:
            return
        if isinstance(change, MembersRemoved):
            gone = set(change.user_ids)
            for w in [w for w in watches if w.owner.user_id in gone and not w.owner.service]:
                self.end_watch(w)  # the conversation left the user's view: the watch ends
        rng = self.config.max_read_count_range
        for w in list(self.watches.get(cid, ())):
            if w.dirty:
                continue
            if top == EVERYTHING or idx is None or top >= idx.watch_range(w.from_sequence, rng)[0]:
                w.owner.mark(w)

    # ------------------------------------------------------------ indexes

    async def get(self, conversation_id: str) -> ReadIndex | None:
        """The conversation's index (loaded on first use), None when it does not exist."""
        while True:
            idx = self.indexes.get(conversation_id)
            if idx is not None:
                idx.used = trio.current_time()
                return idx
            ld = self.loading.get(conversation_id)
            if ld is not None:
                await ld.done.wait()
                continue
            ld = self.loading[conversation_id] = _Loading()
            try:
                snap = await self.store.load_members(conversation_id)
                if snap is None:
                    return None
                if ld.reset:
                    continue
                if len(snap.user_ids) >= BUILD_IN_THREAD_MEMBERS:
                    # ~1.5 µs per member of Python: let the event loop run meanwhile (changes
                    # keep arriving in ``ld.buffer``)
                    idx = await trio.to_thread.run_sync(ReadIndex, snap)
                else:
                    idx = ReadIndex(snap)
                if ld.reset:
                    continue
                idx.used = trio.current_time()
                for change in ld.buffer:
                    if change.position > snap.position:
                        idx.apply(change)
                self.indexes[conversation_id] = idx
                self.sweep(keep=idx)
                return idx
            finally:
                del self.loading[conversation_id]
                ld.done.set()

    def sweep(self, keep: ReadIndex | None = None) -> None:
        """Drop unwatched indexes idle for ``read_index_idle_s``, then the least recently used
        unwatched ones while more than ``read_index_max_members`` members are held."""
        now = trio.current_time()
        idle = self.config.read_index_idle_s
        for cid, idx in list(self.indexes.items()):
            if idx is not keep and cid not in self.watches and now - idx.used > idle:
                del self.indexes[cid]
        total = sum(idx.counter.size for idx in self.indexes.values())
        limit = self.config.read_index_max_members
        if total <= limit:
            return
        for idx in sorted(self.indexes.values(), key=lambda i: i.used):
            if total <= limit:
                break
            if idx is keep or idx.conversation_id in self.watches:
                continue
            del self.indexes[idx.conversation_id]
            total -= idx.counter.size

    async def authorized(
        self, identity: Identity, in_view: Callable[[str], bool], conversation_id: str
    ) -> ReadIndex:
        """The index for a request of ``identity`` after ``sync`` (docs/protocol.md, "Group read
        counts": who may ask); ``in_view`` says whether a conversation is in the user's view."""
        validate_id(conversation_id, "conversation_id")
        await self.store.sync()
        if identity.is_service:
            idx = await self.get(conversation_id)
            if idx is None:
                raise NotFound(f"conversation {conversation_id[:128]!r} does not exist")
            return idx
        if not in_view(conversation_id):  # not in the view: no index is loaded
            raise NotMember(NOT_IN_VIEW)
        idx = await self.get(conversation_id)
        if idx is None or identity.user_id not in idx.slots:  # frozen (keep_history) too
            raise NotMember(NOT_IN_VIEW)
        self.sweep(keep=idx)
        return idx

    # ------------------------------------------------------------ watches

    def session_watches(
        self, state: SessionState, service: bool, start_soon: StartSoon
    ) -> SessionWatches:
        """The session's watches, with their push task running in the session's nursery
        (``start_soon`` starts it there; False: the session is closing)."""
        sw = self.sessions.get(id(state))
        if sw is not None and sw.running:
            return sw
        if sw is None:
            sw = SessionWatches(self, state, service)
        if not start_soon(sw.run):
            raise Unavailable("the session is closing")
        self.sessions[id(state)] = sw
        sw.running = True
        return sw

    def add_watch(self, sw: SessionWatches, conversation_id: str, from_sequence: int) -> None:
        old = sw.watches.get(conversation_id)
        if old is not None:
            self.end_watch(old)
        elif len(sw.watches) >= self.config.max_read_count_watches:
            raise TooLarge(
                f"at most {self.config.max_read_count_watches} read-count watches per session"
            )
        w = Watch(sw, conversation_id, from_sequence)
        sw.watches[conversation_id] = w
        self.watches.setdefault(conversation_id, set()).add(w)
        sw.mark(w)

    def end_watch(self, w: Watch) -> None:
        sw = w.owner
        if sw.watches.get(w.conversation_id) is w:
            del sw.watches[w.conversation_id]
        ws = self.watches.get(w.conversation_id)
        if ws is not None:
            ws.discard(w)
            if not ws:
                del self.watches[w.conversation_id]

    def drop_session(self, sw: SessionWatches) -> None:
        for w in list(sw.watches.values()):
            self.end_watch(w)
        if self.sessions.get(id(sw.state)) is sw:
            del self.sessions[id(sw.state)]

    async def push_frame(self, w: Watch) -> bytes | None:
        """The push of a watch's current counts; None (and the watch ends) when its user is no
        longer a current member."""
        try:
            idx = await self.get(w.conversation_id)
        except Unavailable:  # the store is away: try again after the next change
            return None
        if idx is None or (not w.owner.service and w.owner.user_id not in idx.slots):
            self.end_watch(w)
            return None
        lo, n = idx.watch_range(w.from_sequence, self.config.max_read_count_range)
        return bytes(idx.counter.encode(0, w.conversation_id, lo, n))



