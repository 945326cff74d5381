"""The hub: applies each committed change and hands it to the actors of online members.

It is the store's listener (called synchronously after each commit, in position order). It
keeps an index conversation -> online actors (active rows only; frozen rows ignore
conversation changes) and never awaits: handing over is a row update (a big group's max:
one ``SharedMax`` entry, whatever its size) plus a wake-up.
A new max in a group is the same for every recipient (read seq unchanged, so omitted): its
frame is encoded once, lazily, and the same bytes go to every session whose pending set holds
nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import trio

from seqactor import _kernel as kernel
from seqactor._synctoken import make_token
from seqactor.server import _frames as frames
from seqactor.server._view import FIELD_MAX, SharedMax
from seqactor.server.actor import FanoutBatch, SessionState, UserActor
from seqactor.server.metrics import Metrics
from seqactor.store import (
    Allocated,
    Change,
    MembersAdded,
    MembersRemoved,
    MinChanged,
    ReadMarked,
    Store,
    StoreReset,
)

log = logging.getLogger("seqactor.hub")

FANOUT_INLINE_MEMBERS = 64  # groups up to this many online members are pushed inline
FANOUT_SLICE_S = 0.002  # a fan-out slice (its member loop, then its writes) lasts about this
FANOUT_CLOCK_EVERY = 16  # members between looks at the clock
FANOUT_FIRST_SLICE_MEMBERS = 256  # a hub's first slice, before it has timed one
FANOUT_MIN_SLICE_MEMBERS = 16  # a slice takes at least this many
FANOUT_YIELD_PASSES = 4  # scheduler passes given to other tasks per FANOUT_SLICE_S of a slice
FANOUT_MAX_YIELD_PASSES = 64  # at most this many after one slice
cpu_time = time.thread_time  # what a slice costs (the tests put a counted clock here)


def slice_members(members: int, elapsed: float, current: int) -> int:
    """How many members the next slice takes, after one of ``members`` took ``elapsed`` s
    (of the thread's CPU time: preemption by other processes is not the slice's cost).

    A slice's time is mostly its writes (``write_many``: on loopback each write runs the
    receiver's TCP path, ~8 µs), which ``kernel.fan_slice``'s clock does not see: it only
    bounds the member loop, which takes a fraction of a microsecond per member. So the round
    bounds the members per slice itself, from the last slice's whole time, to fit
    ``FANOUT_SLICE_S`` (growing at most 2x a slice, never below ``FANOUT_MIN_SLICE_MEMBERS``).
    """
    fit = int(members * FANOUT_SLICE_S / elapsed) if elapsed > 0 else 2 * current
    return max(FANOUT_MIN_SLICE_MEMBERS, min(2 * current, fit))


def yield_passes(elapsed: float) -> int:
    """Scheduler passes to give other tasks after a slice of ``elapsed`` s of CPU:
    ``FANOUT_YIELD_PASSES`` per ``FANOUT_SLICE_S`` begun, at most ``FANOUT_MAX_YIELD_PASSES``
    (a slice can outlast its budget: the first one before the round has timed any, or one
    whose members' sockets all took their writes slowly)."""
    slices = int(elapsed / FANOUT_SLICE_S) + 1 if FANOUT_SLICE_S > 0 else 1
    return min(FANOUT_MAX_YIELD_PASSES, FANOUT_YIELD_PASSES * slices)


async def _yield_to_others(passes: int) -> None:
    """Give other tasks ``passes`` scheduler passes before the next slice.

    One pass is not enough: a request goes through several tasks (the WebSocket reader, the
    session reader, the op) and each hop needs a pass, so a round that took back the CPU after
    a single pass would let a backend's requests through at one hop per slice. Some tasks
    need a pass per item of work: the Redis client's writer takes one queued command per pass
    (``coredis``' connection writer checkpoints between the requests it gathers), so a
    session's ``load_view`` (two commands) needs passes, not CPU time.
    """
    for _ in range(passes):
        await trio.sleep(0)


class Hub:
    def __init__(self, store: Store, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.keys = kernel.KeyTable()
        self.shared = SharedMax()  # each conversation's newest max (rows settle from it)
        self.actors: dict[str, UserActor] = {}
        self.index: dict[int, set[UserActor]] = {}
        self._loading: set[UserActor] = set()
        self.counters = metrics.counters
        self.epoch = store.epoch
        self.position = store.position
        # Fan-out rounds for big groups (see _allocated): the newest allocation per hot
        # conversation, the conversations waiting for a round, and per conversation the first
        # position not yet delivered to all its online members (tokens stay below it).
        self._latest: dict[int, Allocated] = {}
        self._hot_queue: dict[int, None] = {}
        self._hot_floor: dict[int, int] = {}
        # Per conversation in a round: the members that left its index meanwhile (the round
        # drops them from the rest of its member list before the next slice).
        self._round_gone: dict[int, set[UserActor]] = {}
        self._fanout_wake = trio.Event()
        self._slice_members = FANOUT_FIRST_SLICE_MEMBERS  # adapted by every slice
        self.nursery: trio.Nursery | None = None  # for resyncs; set by the server
        self._resyncing = False
        self._resync_again = False
        self._reset_floor: int | None = None  # token ceiling while a resync is running
        store.add_listener(self.apply)

    # ---------------------------------------------------------------- actors
    async def attach(
        self, user_id: str, nursery: trio.Nursery, session: SessionState | None = None
    ) -> UserActor:
        """The user's actor, spawned (view loaded, task started) on the first session.

        ``session`` joins the actor's sessions in the same step as the actor is found or made
        ready, so no other session's closing can retire the actor in between.
        """
        actor = self.actors.get(user_id)
        if actor is not None:
            if actor in self._loading:  # another session is loading the view: wait for it
                if actor.ready is None:
                    actor.ready = trio.Event()
                await actor.ready.wait()
            else:
                await trio.lowlevel.checkpoint()
            if actor.failed is None and self.actors.get(user_id) is actor:
                if session is not None:
                    actor.sessions.append(session)
                return actor
        actor = UserActor(self, user_id, nursery)
        self.actors[user_id] = actor
        self._loading.add(actor)
        try:
            view = await self.store.load_view(user_id)
            actor.load(view)
            for change in actor.backlog:
                if change.position > view.position:  # type: ignore[attr-defined]
                    self._apply_to(actor, change)  # type: ignore[arg-type]
            actor.backlog.clear()
        except BaseException as exc:
            actor.failed = exc
            if self.actors.get(user_id) is actor:
                del self.actors[user_id]
            raise
        finally:
            self._loading.discard(actor)
            ready, actor.ready = actor.ready, None
            if ready is not None:
                ready.set()
        for key_id, frozen in zip(actor.table.keys, actor.table.frozen, strict=True):
            if not frozen:
                self.index.setdefault(key_id, set()).add(actor)
        if session is not None:
            actor.sessions.append(session)
        # (No task yet: the actor's first wake-up starts it in ``nursery``.)
        self.metrics.actors.set(len(self.actors))
        return actor

    def detach_if_idle(self, actor: UserActor) -> None:
        """Retire the actor after its last session closed."""
        if actor.sessions:
            return
        if self.actors.get(actor.user_id) is actor:
            del self.actors[actor.user_id]
        for key_id in actor.table.keys:
            self._unindex(key_id, actor)
        actor.retire()
        self.metrics.actors.set(len(self.actors))

    # ---------------------------------------------------------------- changes
    def apply(self, change: Change) -> None:
        """Store listener: called after each commit, in position order."""
        if isinstance(change, StoreReset):
            # The store may have missed changes (or started a new epoch): reload every online
            # view. Until that is done, tokens stay at what the actors are known to hold.
            if self._reset_floor is None:
                self._reset_floor = self.position
            self.epoch = self.store.epoch
            self.position = max(self.position, change.position)
            self.request_resync()
            return
        self.position = max(self.position, change.position)
        for actor in self._loading:
            actor.backlog.append(change)
        if isinstance(change, Allocated):
            self._allocated(change)
        elif isinstance(change, ReadMarked):
            reader = self.actors.get(change.user_id)
            if reader is not None and reader.loaded:
                try:
                    self._apply_to(reader, change)
                except Exception as exc:
                    reader.fail(exc)
        elif isinstance(change, MinChanged):
            key_id = self.keys.lookup(change.conversation_id)
            for actor in list(self.index.get(key_id, ())):
                try:
                    actor.on_min(key_id, change.min_sequence, change.position)
                except Exception as exc:
                    actor.fail(exc)
        elif isinstance(change, MembersAdded | MembersRemoved):
            for actor in self._online(change.user_ids):
                try:
                    self._apply_to(actor, change, targeted=True)
                except Exception as exc:
                    actor.fail(exc)

    def owes_max(self, actor: UserActor, key_id: int) -> bool:
        """A fan-out round of the conversation has a newer max than the one it last handed
        ``actor`` (a view read may have settled the row already: the row's max is not what the
        user's sessions were pushed)."""
        latest = self._latest.get(key_id)
        return latest is not None and actor.fanned is not latest

    def _unindex(self, key_id: int, actor: UserActor) -> None:
        """``actor`` no longer follows the conversation's changes (it left, froze or went
        offline); a round in progress skips it from now on."""
        members = self.index.get(key_id)
        if members is not None:
            members.discard(actor)
            if not members:
                del self.index[key_id]
        gone = self._round_gone.get(key_id)
        if gone is not None:
            gone.add(actor)

    def _online(self, user_ids: Iterable[str]) -> list[UserActor]:
        found = []
        for uid in user_ids:
            actor = self.actors.get(uid)
            if actor is not None and actor.loaded:
                found.append(actor)
        return found

    # ---------------------------------------------------------------- tokens
    @property
    def synced_position(self) -> int:
        """The newest position whose changes every online actor holds (the token position)."""
        position = self.position
        if self._reset_floor is not None:
            position = min(position, self._reset_floor)
        if self._hot_floor:
            position = min(position, min(self._hot_floor.values()) - 1)
        return position

    def token(self) -> bytes:
        return make_token(self.epoch, self.synced_position)

    # ---------------------------------------------------------------- allocations
    def _shared_frames(self, key_id: int, change: Allocated) -> tuple[bytes, bytes]:
        """The push of a new max, the same for every member: (with token, without)."""
        payload = kernel.encode_single(self.keys, key_id, change.last, 0, 0, change.time_ms)
        token = self.token()
        with_token = kernel.encode_single(
            self.keys, key_id, change.last, 0, 0, change.time_ms, token
        )
        return kernel.frame_update(0, with_token), kernel.frame_update(0, payload)

    def _allocated(self, change: Allocated) -> None:
        key_id = self.keys.lookup(change.conversation_id)
        if key_id < 0:
            return  # no online user has ever had this conversation in view
        self.shared.advance(key_id, change.last, change.time_ms, change.position)
        sender = None
        if change.sender_user_id is not None and change.sender_read:
            sender = self.actors.get(change.sender_user_id)
            if sender is not None and sender.loaded:
                # I6 at once for the sender, max first so read never exceeds max.
                try:
                    sender.on_max(key_id, change.last, change.time_ms, change.position, None)
                    sender.on_read(key_id, change.sender_read, change.position)
                except Exception as exc:
                    sender.fail(exc)
        members = self.index.get(key_id)
        if not members:
            return
        if len(members) <= FANOUT_INLINE_MEMBERS or self.nursery is None:
            shared = self._shared_frames(key_id, change)
            for actor in list(members):
                try:
                    actor.on_max(key_id, change.last, change.time_ms, change.position, shared)
                except Exception as exc:  # one user's failure never stops the others' pushes
                    actor.fail(exc)
            return
        # A big group: the allocation costs O(1) here; a fan-out round delivers the newest
        # max to every member, so allocations that arrive during a round coalesce.
        self._latest[key_id] = change
        if sender is not None and sender.loaded and sender.failed is None:
            sender.fanned = change  # it has this max already: a round skips it
        self._hot_floor.setdefault(key_id, change.position)
        self._hot_queue[key_id] = None
        self._fanout_wake.set()

    async def run_fanout(self) -> None:
        """Deliver hot conversations' newest max to their members, round after round."""
        while True:
            await self._fanout_wake.wait()
            self._fanout_wake = trio.Event()
            while self._hot_queue:
                key_id = next(iter(self._hot_queue))
                del self._hot_queue[key_id]
                try:
                    await self._fanout_round(key_id)
                except Exception:  # keep serving other conversations; resync this one's members
                    log.exception("fan-out round failed; resyncing online views")
                    self._round_failed(key_id)
                    self.request_resync()

    def _round_failed(self, key_id: int) -> None:
        """A round that raised: the members it had not reached get the max pending (the
        resync compares settled rows with the store, so it would not push it), and the
        conversation leaves the fan-out queue."""
        for actor in list(self.index.get(key_id, ())):
            if self.owes_max(actor, key_id):
                try:
                    actor.push_max(key_id)
                except Exception as exc:  # that user's sessions end; the others still get it
                    actor.fail(exc)
        self._latest.pop(key_id, None)
        self._hot_floor.pop(key_id, None)
        self._hot_queue.pop(key_id, None)

    async def _fanout_round(self, key_id: int) -> None:
        """One pass over the conversation's online members with its newest max.

        Work is done in time slices of about ``FANOUT_SLICE_S`` (``kernel.fan_slice``: the
        per-member loop in C): no member's row is touched (the hub's ``shared`` max holds the
        conversation's max for every view; reads settle rows from it), idle sockets
        are collected and then written together (``write_many``: one C loop of non-blocking
        writes of the same ready bytes), busy sessions get the change pending. A slice takes
        at most ``slice_members`` members, so that its writes fit the budget too. Between
        slices the round yields (``yield_passes``), so ops and session opens keep flowing.
        """
        change = self._latest[key_id]
        start = change.position
        members = list(self.index.get(key_id, ()))
        gone = self._round_gone[key_id] = set()
        try:
            await self._fan_members(key_id, members, gone)
        finally:
            del self._round_gone[key_id]
        if self._latest[key_id].position == start:
            del self._latest[key_id]
            del self._hot_floor[key_id]
            self._hot_queue.pop(key_id, None)
        else:  # members early in this round missed what came later: another round
            self._hot_floor[key_id] = start + 1
            self._hot_queue[key_id] = None

    async def _fan_members(
        self, key_id: int, members: list[UserActor], gone: set[UserActor]
    ) -> None:
        """The slices of one round over ``members`` (``gone``: members that left the
        conversation's index since, dropped before the next slice)."""
        batch = FanoutBatch()
        counters = self.counters
        clock = cpu_time  # the slice's CPU: a preempted node's wall time would shrink it
        framed: Allocated | None = None
        i, n = 0, len(members)
        while i < n:
            if gone:
                members = [a for a in members[i:] if a not in gone]
                gone.clear()
                i, n = 0, len(members)
                if not n:
                    break
            change = self._latest[key_id]  # newer max arrived meanwhile: the rest get it
            began = clock()
            if change is not framed:  # (a token from earlier in the round stays valid)
                shared = self._shared_frames(key_id, change)
                raw = (frames.ws_binary_frame(shared[0]), frames.ws_binary_frame(shared[1]))
                framed = change
            cap = self._slice_members
            part = members if i == 0 and n <= cap else members[i:i + cap]
            done, failures = kernel.fan_slice(
                part, 0, key_id, change, FIELD_MAX, shared, batch.fds, batch.sessions,
                FANOUT_SLICE_S, FANOUT_CLOCK_EVERY,
            )
            i += done
            counters.pushes += batch.write(raw)
            if failures:
                for actor, exc in failures:  # one user's failure never stops the others
                    actor.fail(exc)
            elapsed = clock() - began
            if done == cap or elapsed > FANOUT_SLICE_S:  # (not a short last slice: its
                self._slice_members = slice_members(done, elapsed, cap)  # fixed cost weighs)
            await _yield_to_others(yield_passes(elapsed))

    def _apply_to(self, actor: UserActor, change: Change, targeted: bool = False) -> None:
        """A change for one actor (also used to replay the backlog after loading).

        ``targeted``: the caller already knows the actor's user is among the change's users.
        """
        cid = change.conversation_id
        if isinstance(change, ReadMarked):
            key_id = self.keys.lookup(cid)
            if key_id >= 0:
                actor.on_read(key_id, change.read_sequence, change.position)
        elif isinstance(change, Allocated):
            key_id = self.keys.lookup(cid)
            if key_id >= 0:
                actor.on_max(key_id, change.last, change.time_ms, change.position, None)
                if change.sender_user_id == actor.user_id and change.sender_read:
                    actor.on_read(key_id, change.sender_read, change.position)
        elif isinstance(change, MinChanged):
            key_id = self.keys.lookup(cid)
            if key_id >= 0:
                actor.on_min(key_id, change.min_sequence, change.position)
        elif isinstance(change, MembersAdded):
            if targeted or actor.user_id in change.user_ids:
                key_id = self.keys.intern(cid)
                actor.on_join(
                    key_id, cid, change.max_sequence, change.max_sequence, change.min_sequence,
                    change.time_ms, change.position,
                )
                self.index.setdefault(key_id, set()).add(actor)
        elif isinstance(change, MembersRemoved) and (targeted or actor.user_id in change.user_ids):
            key_id = self.keys.lookup(cid)
            if key_id < 0:
                return
            self._unindex(key_id, actor)
            if change.keep_history:
                # (the frozen row takes the shared max recorded up to the leave: the max at
                # the moment of leaving, as the store holds it)
                actor.on_freeze(key_id, change.position)
            else:
                actor.on_leave(key_id, cid)

    # ---------------------------------------------------------------- resync
    def request_resync(self) -> None:
        """Reload every online actor's view from the store (events may have been missed)."""
        if self._resyncing:
            self._resync_again = True
            return
        if self.nursery is not None:
            self._resyncing = True
            self.nursery.start_soon(self._resync_loop)

    async def _resync_loop(self) -> None:
        try:
            while True:
                self._resync_again = False
                target = self.position
                for actor in list(self.actors.values()):
                    if actor.loaded and self.actors.get(actor.user_id) is actor:
                        await self.resync_actor(actor)
                if not self._resync_again:
                    self._reset_floor = None  # every view is now at least at ``target``
                    return
                self._reset_floor = min(self._reset_floor or target, target)
        finally:
            self._resyncing = False

    async def resync_actor(self, actor: UserActor) -> None:
        """Bring ``actor``'s table up to the store's view and push what differs.

        Values only move forward (max, read and min never decrease), so a change that reached
        the actor while the view was loading is never undone by the older snapshot.
        """
        view = await self.store.load_view(actor.user_id)
        table = actor.table
        kernel.settle(table)  # compare the store's rows with what the actor holds now
        keys = self.keys
        seen: set[int] = set()
        for i, cid in enumerate(view.conversation_ids):
            key_id = keys.intern(cid)
            seen.add(key_id)
            pos = view.pos[i]
            row = table.row_of(key_id)
            if row < 0:
                actor.on_join(
                    key_id, cid, view.max_seq[i], view.read_seq[i], view.min_seq[i],
                    view.time_ms[i], pos,
                )
                if view.frozen[i]:
                    actor.on_freeze(key_id, pos, settle=False)
                else:
                    self.index.setdefault(key_id, set()).add(actor)
                continue
            if view.frozen[i] and not table.frozen[row]:
                # a leave the actor missed: the row freezes (with the store's max if higher:
                # values never move back)
                if view.max_seq[i] > table.max_seq[row]:
                    actor.on_max(key_id, view.max_seq[i], view.time_ms[i], pos, None)
                actor.on_freeze(key_id, pos, settle=False)
                self._unindex(key_id, actor)
            elif table.frozen[row] and not view.frozen[i] and table.pos[row] <= view.position:
                # a re-add the actor missed (not a freeze that came after the load)
                actor.on_join(
                    key_id, cid, view.max_seq[i], view.read_seq[i], view.min_seq[i],
                    view.time_ms[i], pos,
                )
                self.index.setdefault(key_id, set()).add(actor)
                continue
            if view.max_seq[i] > table.max_seq[row] and not table.frozen[row]:
                actor.on_max(key_id, view.max_seq[i], view.time_ms[i], pos, None)
            if view.read_seq[i] > table.read_seq[row]:
                actor.on_read(key_id, view.read_seq[i], pos)
            if view.min_seq[i] > table.min_seq[row] and not table.frozen[row]:
                actor.on_min(key_id, view.min_seq[i], pos)
        for key_id in [k for k in table.keys if k not in seen]:
            row = table.row_of(key_id)
            if table.pos[row] <= view.position:  # not a join that happened after the load
                self._unindex(key_id, actor)
                actor.on_leave(key_id, keys.key(key_id))
