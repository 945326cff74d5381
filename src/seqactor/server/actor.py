"""User actors: one per online user, owning the view, the sessions' subscriptions and pending sets.

The hub hands changes to an actor synchronously (update the row, mark the change pending on
every session that follows it, wake the actor) and never waits. The actor task's flush loop
encodes whatever is pending for a session as one ``SequenceUpdate`` as soon as that session's
writer is idle; changes that arrive while a send is in progress coalesce (latest wins per
conversation) into the next frame. So a session's pending set is bounded by the number of
conversations it follows, never by the message rate (I5).
"""

from __future__ import annotations

import logging
from array import array
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import trio

from seqactor import _kernel as kernel
from seqactor.server._frames import ws_binary_frame
from seqactor.server._view import (
    FIELD_ALL,
    FIELD_MAX,
    FIELD_MEMBERSHIP,
    FIELD_MIN,
    FIELD_READ,
    SharedMax,
    ViewTable,
)
from seqactor.server.metrics import HotCounters
from seqactor.store import ViewData


class ActorHost(Protocol):
    """What an actor needs of its hub (:class:`~seqactor.server.hub.Hub`)."""

    keys: Any  # the node's kernel KeyTable: conversation id <-> key id
    counters: HotCounters
    shared: SharedMax  # each conversation's newest max, which active rows may lag behind

    def token(self) -> bytes: ...
    def owes_max(self, actor: UserActor, key_id: int) -> bool: ...

log = logging.getLogger("seqactor.actor")
T = TypeVar("T")

ACTOR_TASK_NAME = "seqactor.server.actor.UserActor.run"  # (shared: not formatted per task)


class SessionState(kernel.FanoutSession):
    """Per-connection state the actor owns: subscriptions, pending changes, outbox.

    Output goes straight to the socket when nothing else is queued and the socket takes it
    without waiting (``direct``); otherwise into the outbox (the unsent rest of a direct write,
    held by the transport and flushed first; then ``push_frame``; then ``replies``), which a
    writer task drains. The writer is started on demand (``start_writer``) and ends when the
    outbox is empty, so an idle session holds no writer task.
    """

    # Slots: no per-instance dict. What the fan-out reads per recipient (``subscribed_all``,
    # ``fd``, ``writer_running``, ``background``, ``pending``, ``pending_removed``,
    # ``subscribed``) is the kernel's ``FanoutSession``: C fields in the compiled kernel.
    __slots__ = (
        "session_id", "user_id", "device_id", "shared", "inflight_reads",
        "replies", "reply_queue_frames", "_reply_space", "push_frame", "rest_held", "direct",
        "wire", "hold", "start_writer", "counters", "on_fatal",
    )

    def __init__(
        self, session_id: str, user_id: str, device_id: str, reply_queue_frames: int,
        on_fatal: Callable[[int, str], None], counters: HotCounters,
    ) -> None:
        self.session_id = session_id
        self.user_id = user_id
        self.device_id = device_id
        self.subscribed_all = False
        # Both sets start as the shared empty frozenset and become a set on their first
        # member (an empty set is 216 bytes; most sessions follow all and remove nothing).
        self.subscribed: set[int] | frozenset[int] = NO_KEYS
        self.background = False
        self.pending: dict[int, int] = {}  # key id -> field mask
        self.pending_removed: set[str] | frozenset[str] = NO_IDS
        self.shared: tuple[bytes, bytes] | None = None  # (frame with token, without) from the hub
        self.inflight_reads: dict[int, int] = {}
        # Replies waiting for the writer, at most ``reply_queue_frames`` (a short list: popping
        # its head is cheaper than a deque's 600-byte block per session). The semaphore that
        # bounds it is made when the first reply has to queue: most sessions never need it.
        self.replies: list[bytes] = []
        self.reply_queue_frames = reply_queue_frames
        self._reply_space: trio.Semaphore | None = None
        self.push_frame: bytes | None = None  # a ServerMessage for the writer to frame and send
        self.rest_held = False  # the transport holds the unsent rest of a direct write
        self.writer_running = False
        # Set by the session: write a ServerMessage without waiting (None = not possible now,
        # b"" = all written, else the framed bytes still to send); start the writer task.
        self.direct: Callable[[bytes], bytes | None] | None = None
        # Published by the connection's stream: the socket's descriptor while a direct write
        # is possible (nothing being sent, no rest held, open), else -1. ``wire`` is that
        # stream, kept so the socket lives as long as this state can name its descriptor.
        self.fd = -1
        self.wire: object | None = None
        self.hold: Callable[[bytes], None] | None = None  # give the transport a rest to keep
        self.start_writer: Callable[[], None] = _no_writer
        self.counters = counters
        self.on_fatal = on_fatal  # (close code, reason): ends the connection

    # ---- subscriptions
    def follows(self, key_id: int) -> bool:
        return self.subscribed_all or key_id in self.subscribed

    def follow(self, key_ids: Iterable[int]) -> None:
        """Subscribe to the listed conversations (key ids) too."""
        self.subscribed = _added(self.subscribed, key_ids)

    def unfollow(self, key_id: int) -> None:
        _discard(self.subscribed, key_id)

    def unfollow_all(self) -> None:
        self.subscribed = NO_KEYS

    def mark_removed(self, conversation_id: str) -> None:
        """The conversation left the view: the next push says so."""
        self.pending_removed = _added(self.pending_removed, (conversation_id,))

    def unmark_removed(self, conversation_id: str) -> None:
        _discard(self.pending_removed, conversation_id)

    @property
    def pending_count(self) -> int:
        return len(self.pending) + len(self.pending_removed)

    def has_pending(self) -> bool:
        return bool(self.pending) or bool(self.pending_removed)

    def mark(self, key_id: int, mask: int, shared: tuple[bytes, bytes] | None = None) -> None:
        pending = self.pending
        old = pending.get(key_id)
        if old is None:
            if shared is not None and not pending and not self.pending_removed:
                self.shared = shared
            else:
                self.shared = None
            pending[key_id] = mask
            return
        self.counters.coalesced += 1
        if shared is not None and old == FIELD_MAX and mask == FIELD_MAX and len(pending) == 1:
            self.shared = shared  # the newer shared frame supersedes the older one
        else:
            self.shared = None
        pending[key_id] = old | mask

    def clear_pending(self) -> None:
        self.pending.clear()
        self.pending_removed = NO_IDS
        self.shared = None

    # ---- outbox
    def idle(self) -> bool:
        """Nothing pending or being written, and not in background: a push may go out now."""
        return not (
            self.writer_running or self.background or self.pending or self.pending_removed
        )

    def kick(self) -> None:
        """Make sure a writer drains the outbox."""
        if not self.writer_running:
            self.writer_running = True
            self.start_writer()

    def _write_now(self, frame: bytes) -> bool:
        """Write ``frame`` without waiting if nothing is queued before it; True when done
        (written, or its unsent rest queued first in line)."""
        direct = self.direct
        if direct is None or self.writer_running:
            return False
        rest = direct(frame)
        if rest is None:
            return False
        self.counters.frames_sent += 1
        self.counters.bytes_sent += len(frame)
        if rest:  # the transport keeps it and sends it before anything else
            self.rest_held = True
            self.kick()
        return True

    def wrote_raw(self, raw: bytes, written: int) -> None:
        """Account for a batch write of ``raw`` (``written`` bytes, or -errno) by the hub."""
        if written == len(raw):
            self.counters.frames_sent += 1
            self.counters.bytes_sent += len(raw)
            return
        # The socket took part or nothing (or failed: the writer meets the error and ends
        # the session): the transport keeps the rest, to go out before any other byte.
        assert self.hold is not None  # batch writes only pick sessions whose transport can
        self.hold(raw[written:] if written > 0 else raw)
        self.rest_held = True
        self.kick()

    def deliver(self, frame: bytes) -> None:
        """A push: now if the socket takes it without waiting, else through the writer."""
        if not self._write_now(frame):
            self.push_frame = frame
            self.kick()

    async def put_reply(self, frame: bytes) -> None:
        """A reply: now if possible, else queued (waits while the reply queue is full)."""
        if self._write_now(frame):
            return
        space = self._reply_space
        if space is None:
            space = self._reply_space = trio.Semaphore(self.reply_queue_frames)
        await space.acquire()
        self.replies.append(frame)
        self.kick()

    def next_frame(self) -> tuple[bytes, bool] | None:
        """For the writer: the next (frame, is the held rest), or None when the outbox is empty."""
        # Encode order: a push frame is only handed over while the outbox is empty, so it
        # (and the rest of a direct write) came before any reply queued behind it.
        if self.rest_held:
            self.rest_held = False
            return b"", True
        if self.push_frame is not None:
            frame, self.push_frame = self.push_frame, None
            return frame, False
        if self.replies:
            assert self._reply_space is not None  # made by the put_reply that queued it
            self._reply_space.release()
            return self.replies.pop(0), False
        return None


NO_KEYS: frozenset[int] = frozenset()  # a session's subscriptions / removals before the first
NO_IDS: frozenset[str] = frozenset()


def _added(members: set[T] | frozenset[T], items: Iterable[T]) -> set[T] | frozenset[T]:
    """``members`` with ``items`` added (a new set when it is a shared empty frozenset)."""
    if isinstance(members, frozenset):
        grown = set(items)
        return grown if grown else members
    members.update(items)
    return members


def _discard(members: set[T] | frozenset[T], item: T) -> None:
    if item in members:
        assert isinstance(members, set)  # (the shared empty frozenset holds nothing)
        members.discard(item)


def _no_writer() -> None:
    raise RuntimeError("session has no writer attached")


class FanoutBatch:
    """Idle sessions collected by a fan-out round (``kernel.fan_slice`` fills ``fds`` and
    ``sessions``), written together with ``write_many``."""

    __slots__ = ("fds", "sessions")

    def __init__(self) -> None:
        self.fds = (array("i"), array("i"))  # (with token, without)
        self.sessions: tuple[list[SessionState], list[SessionState]] = ([], [])

    def write(self, raw: tuple[bytes, bytes]) -> int:
        """Write ``raw[0]`` to the with-token sockets and ``raw[1]`` to the others; returns
        how many sessions were served. The rest of a partial write goes through the writer."""
        served = 0
        for fds, sessions, data in zip(self.fds, self.sessions, raw, strict=True):
            n = len(fds)
            if not n:
                continue
            results = array("q", bytes(8 * n))
            kernel.write_many(fds, data, results)
            size = len(data)
            written_all = results.count(size)
            if written_all != n:
                for session, written in zip(sessions, results, strict=True):
                    if written != size:
                        try:
                            session.wrote_raw(data, written)
                        except Exception:  # that session ends; the batch goes on
                            log.exception("session %s failed; closing it", session.session_id)
                            session.on_fatal(1011, "internal error")
            counters = sessions[0].counters
            counters.frames_sent += written_all
            counters.bytes_sent += written_all * size
            served += n
            del fds[:]
            sessions.clear()
        return served


_ACTOR_BATCH = FanoutBatch()  # an actor's own changes: filled and written in one call, never nested


class UserActor(kernel.FanoutActor):
    """The actor of one online user. Created and retired by the hub."""

    __slots__ = (  # (``fanned`` and ``sessions``, what a round reads: the kernel's FanoutActor)
        "table", "hub", "user_id", "loaded", "ready", "backlog", "_woken", "_nursery",
        "_running", "_retired", "failed",
    )

    def __init__(self, hub: ActorHost, user_id: str, nursery: trio.Nursery | None = None) -> None:
        self.hub = hub
        self.user_id = user_id
        self.table = ViewTable(hub.shared)
        self.sessions: list[SessionState] = []
        # The change a fan-out round last handed this user (``kernel.fan_slice``): the next
        # round of the same conversation skips the user when it is still the newest.
        self.fanned: object | None = None
        self.loaded = False
        # Set when loading finished (or failed), then dropped. Made only when a session
        # waits for the load (the hub's ``_loading`` says whether it runs): most opens never
        # need one, and an idle online user holds none.
        self.ready: trio.Event | None = None
        self.backlog: list[object] = []  # changes that arrived while the view was loading
        # The actor's task runs only while it has work: wake() starts it in ``nursery`` (the
        # server's actor nursery; None: never started, as in kernel tests), and it ends once a
        # pass found nothing new. A parked task per online user would cost ~1.5 KB and a
        # spawn and a scheduler pass per session open.
        self._woken = False  # a wake-up is due: the task runs its loop once more
        self._nursery = nursery
        self._running = False  # the task is started and has not ended
        self._retired = False  # no more passes: the task ends at its next look
        self.failed: BaseException | None = None

    # ---------------------------------------------------------------- loading
    def load(self, view: ViewData) -> None:
        keys = self.hub.keys
        t = self.table
        for i, cid in enumerate(view.conversation_ids):
            t.upsert(
                keys.intern(cid), view.max_seq[i], view.read_seq[i], view.min_seq[i],
                view.time_ms[i], view.pos[i], bool(view.frozen[i]),
            )
        self.loaded = True

    # ---------------------------------------------------------------- hub callbacks
    def wake(self) -> None:
        if self._woken:
            return
        self._woken = True
        if (
            not self._running and not self._retired and self.failed is None
            and self._nursery is not None
        ):
            self._running = True
            self._nursery.start_soon(self.run, name=ACTOR_TASK_NAME)

    def _mark_all(self, key_id: int, mask: int, shared: tuple[bytes, bytes] | None = None) -> None:
        """Hand a change to the user's sessions by the kernel's fan-out rule (``kernel.route``,
        the same rule a fan-out round applies): with ``shared`` (the ready push, with token and
        without), idle sessions get it written now in one batch; the others get it pending."""
        batch = _ACTOR_BATCH  # route() fills it only with a shared frame; write() empties it
        marked = kernel.route(self.sessions, key_id, mask, shared, batch.fds, batch.sessions)
        if shared is not None and (batch.sessions[0] or batch.sessions[1]):
            raw = (ws_binary_frame(shared[0]), ws_binary_frame(shared[1]))
            self.hub.counters.pushes += batch.write(raw)
        if marked:
            self.wake()

    def session_failed(self, s: SessionState, exc: BaseException) -> None:
        """One session could not take output: end that session only (Error INTERNAL, close
        1011); the user's other sessions and the change's other recipients are unaffected."""
        log.error(
            "session %s of user %r failed; closing it", s.session_id, self.user_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        s.on_fatal(1011, "internal error")

    def on_max(
        self, key_id: int, max_seq: int, time_ms: int, pos: int,
        shared: tuple[bytes, bytes] | None,
    ) -> None:
        t = self.table
        row = t.row_of(key_id)
        if row < 0 or t.frozen[row] or max_seq <= t.max_seq[row]:
            return  # values only move forward: a late or repeated delivery changes nothing
        t.max_seq[row] = max_seq
        t.time_ms[row] = time_ms
        if pos > t.pos[row]:
            t.pos[row] = pos
        self._mark_all(key_id, FIELD_MAX, shared)

    def on_read(self, key_id: int, read_seq: int, pos: int) -> None:
        t = self.table
        row = t.row_of(key_id)
        if row < 0 or read_seq <= t.read_seq[row]:
            return
        t.read_seq[row] = read_seq
        if pos > t.pos[row]:
            t.pos[row] = pos
        mask = FIELD_READ
        # The read committed after an allocation whose max this user's sessions may not have
        # been pushed yet (a fan-out round has not reached it, or the row has not taken it):
        # the push carries the max too, so read never exceeds max on any session.
        if (read_seq > t.max_seq[row] and kernel.settle(t, [row], pos)) or self.hub.owes_max(
            self, key_id
        ):
            mask |= FIELD_MAX
        self._mark_all(key_id, mask)

    def on_min(self, key_id: int, min_seq: int, pos: int) -> None:
        t = self.table
        row = t.row_of(key_id)
        if row < 0 or t.frozen[row] or min_seq <= t.min_seq[row]:
            return
        t.min_seq[row] = min_seq
        if pos > t.pos[row]:
            t.pos[row] = pos
        self._mark_all(key_id, FIELD_MIN)

    def on_join(
        self, key_id: int, conversation_id: str, max_seq: int, read_seq: int, min_seq: int,
        time_ms: int, pos: int,
    ) -> None:
        t = self.table
        row = t.row_of(key_id)
        # A frozen row's user re-added: the push says so (membership = 1); a new row needs
        # no membership (absent = member).
        mask = FIELD_ALL | FIELD_MEMBERSHIP if row >= 0 and t.frozen[row] else FIELD_ALL
        t.upsert(key_id, max_seq, read_seq, min_seq, time_ms, pos, False)
        marked = False
        for s in self.sessions:
            s.unmark_removed(conversation_id)
            if s.follows(key_id):
                s.mark(key_id, mask)
                marked = True
        if marked:
            self.wake()

    def push_max(self, key_id: int) -> None:
        """The conversation's max is pending on the sessions that follow it (a fan-out round
        that would have pushed it ended early)."""
        if self.table.row_of(key_id) >= 0:
            self._mark_all(key_id, FIELD_MAX)

    def on_freeze(self, key_id: int, pos: int, settle: bool = True) -> None:
        """The user left with keep_history (at change position ``pos``): the row keeps its
        values and ignores conversation changes from now on; its sessions get
        ``membership = 2``. With ``settle`` the row first takes the shared max recorded up to
        ``pos`` (without: the caller has set the row to the store's values). When a fan-out
        round owes the user the conversation's max (it leaves the round now), the push carries
        the row's max too."""
        t = self.table
        row = t.row_of(key_id)
        if row < 0 or t.frozen[row]:
            return  # a repeated delivery pushes nothing
        if settle:  # the row keeps the max the conversation had when the user left
            kernel.settle(t, [row], pos)
        t.frozen[row] = 1
        if pos > t.pos[row]:
            t.pos[row] = pos
        owed = self.hub.owes_max(self, key_id)
        self._mark_all(key_id, FIELD_MEMBERSHIP | FIELD_MAX if owed else FIELD_MEMBERSHIP)

    def on_leave(self, key_id: int, conversation_id: str) -> None:
        self.table.remove(key_id)
        marked = False
        for s in self.sessions:
            # A listed subscription survives the conversation leaving the view: nothing about
            # it is pushed while it is outside (there is no row), and on_join sends the full
            # state when the user rejoins (docs/protocol.md, "Subscribe").
            was_following = s.follows(key_id)
            s.pending.pop(key_id, None)
            if was_following:
                s.shared = None
                s.mark_removed(conversation_id)
                marked = True
        if marked:
            self.wake()

    # ---------------------------------------------------------------- encoding
    def token(self) -> bytes:
        return self.hub.token()

    def encode_push(self, s: SessionState) -> bytes | None:
        """The frame for everything pending on ``s`` (None: nothing sendable yet)."""
        if s.shared is not None and len(s.pending) == 1 and not s.pending_removed:
            frame = s.shared[0] if s.subscribed_all else s.shared[1]
            s.clear_pending()
            return frame
        t = self.table
        rows: list[int] = []
        masks = bytearray()
        deferred: dict[int, int] = {}
        for key_id, mask in s.pending.items():
            if mask == FIELD_READ and key_id in s.inflight_reads:
                deferred[key_id] = mask  # the marking session gets the Ack instead
                continue
            row = t.row_of(key_id)
            if row >= 0:
                rows.append(row)
                masks.append(mask)
        removed = sorted(s.pending_removed)
        s.pending.clear()
        s.pending.update(deferred)
        s.pending_removed = NO_IDS
        s.shared = None
        if not rows and not removed:
            return None
        kernel.settle(t, rows)
        # A read held back for the marking session's Ack is not in this frame: a token here
        # would cover it, and a resume from the token would never bring the read back.
        token = self.token() if s.subscribed_all and not deferred else b""
        payload = kernel.encode_rows(
            self.hub.keys, t, rows, bytes(masks), sync_token=token, full=False, removed=removed
        )
        return kernel.frame_update(0, payload)

    def flush(self) -> None:
        for s in self.sessions:
            if s.background or s.writer_running or not s.has_pending():
                continue
            frame = self.encode_push(s)
            if frame is not None:
                self.hub.counters.pushes += 1
                try:
                    s.deliver(frame)
                except Exception as exc:  # that session ends; the others still get theirs
                    self.session_failed(s, exc)

    # ---------------------------------------------------------------- task
    async def run(self) -> None:
        """Flush while woken; end when a pass found no new wake-up (wake() starts it again)."""
        try:
            while self._woken and not self._retired:
                self._woken = False
                self.flush()
                await trio.lowlevel.checkpoint()
        except Exception as exc:  # an actor's failure ends its user's sessions only
            self.fail(exc)
        finally:
            self._running = False

    def fail(self, exc: BaseException) -> None:
        """Log the failure and end this user's sessions (Error INTERNAL, close 1011)."""
        self.failed = exc
        log.error(
            "actor for user %r failed; closing its sessions", self.user_id,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        for s in list(self.sessions):
            s.on_fatal(1011, "internal error")

    def retire(self) -> None:
        """No more flushes: a running task returns at its next look, before flushing."""
        self._retired = True
