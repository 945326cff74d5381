"""The ops a session runs (docs/protocol.md "Operations"), each ``async (ctx, request_id, body)
-> reply frame | None``, over a narrow :class:`OpContext`: this session's user (identity, view
state, actor) and the node's shared parts it may use (hub, store, read indexes, limits, metrics).

:data:`HANDLERS` maps a ``ClientMessage`` body field to its handler and whether it needs a
service token; :class:`~seqactor.server.session_protocol.SessionProtocol` decides which one a
frame asks for, and the session runs it. A handler refuses a request by raising
:class:`OpRefused` (or a :class:`~seqactor.store.StoreError`, whose code the reply keeps).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from seqactor import _kernel as kernel
from seqactor._proto import seqactor_pb2 as pb
from seqactor._synctoken import make_token, token_position
from seqactor.protocol import MAX_READERS_LIMIT, READERS_DEFAULT_LIMIT
from seqactor.server import _frames as frames
from seqactor.server._view import FIELD_READ
from seqactor.server.readcounts import NOT_IN_VIEW, ReadIndex, ReadIndexes, StartSoon
from seqactor.store import NotFound, NotMember, TooLarge
from seqactor.store._base import validate_id

if TYPE_CHECKING:
    from seqactor.auth import Identity
    from seqactor.server.actor import SessionState, UserActor
    from seqactor.server.config import ServerConfig
    from seqactor.server.hub import Hub
    from seqactor.server.metrics import Metrics
    from seqactor.store import Store

Code = pb.Error.Code


class OpRefused(Exception):
    """An op refused with ``code`` (an ``Error.Code``) and ``message``; the session goes on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OpContext:
    """What an op may use. ``read_indexes`` is made on first use (the node's read-count
    indexes); ``start_soon`` starts a task in the session's nursery (False: it is closing)."""

    __slots__ = ("identity", "state", "actor", "hub", "store", "limits", "metrics",
                 "_read_indexes", "start_soon")

    def __init__(
        self, identity: Identity, state: SessionState, actor: UserActor, hub: Hub, store: Store,
        limits: ServerConfig, metrics: Metrics, read_indexes: Callable[[], ReadIndexes],
        start_soon: StartSoon,
    ) -> None:
        self.identity = identity
        self.state = state
        self.actor = actor
        self.hub = hub
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self._read_indexes = read_indexes
        self.start_soon = start_soon

    @property
    def read_indexes(self) -> ReadIndexes:
        return self._read_indexes()

    def view_key(self, conversation_id: str) -> int:
        """Key id of a conversation in this user's view, or -1 (unknown and foreign alike)."""
        key_id = self.hub.keys.lookup(conversation_id)
        if key_id < 0 or self.actor.table.row_of(key_id) < 0:
            return -1
        return key_id

    def in_view(self, conversation_id: str) -> bool:
        return self.view_key(conversation_id) >= 0

    def check_ids(self, repeated: Iterable[str]) -> list[str]:
        """The ids of a request, TOO_LARGE above ``max_ids_per_request``."""
        ids = list(repeated)
        limit = self.limits.max_ids_per_request
        if len(ids) > limit:
            raise OpRefused(Code.TOO_LARGE, f"{len(ids)} ids in one request; the limit is {limit}")
        return ids


# ------------------------------------------------------------------ a user's view


async def get_sequences(ctx: OpContext, rid: int, m: pb.GetSequences) -> bytes:
    """Listed ids: their rows. Else a snapshot, or with ``since`` the delta since that token."""
    hub, table = ctx.hub, ctx.actor.table
    ids = ctx.check_ids(m.conversation_ids)
    if ids:
        rows: list[int] = []
        seen: set[int] = set()
        for cid in ids:
            key_id = ctx.view_key(cid)
            if key_id >= 0 and key_id not in seen:
                seen.add(key_id)
                rows.append(table.row_of(key_id))
        kernel.settle(table, rows)  # (rows may lag behind the conversations' shared max)
        return kernel.frame_update(rid, kernel.encode_rows(hub.keys, table, rows))
    token = make_token(hub.epoch, hub.synced_position)
    since = token_position(m.since, hub.epoch, hub.position) if m.since else None
    removed: list[str] | None = None
    if since is not None:
        removed = await ctx.store.removed_since(ctx.actor.user_id, since)
    kernel.settle(table)
    if since is None or removed is None:
        payload = kernel.encode_snapshot(hub.keys, table, token, True)
    else:
        keys = hub.keys
        gone = [cid for cid in removed if keys.lookup(cid) < 0 or table.row_of(keys.lookup(cid)) < 0]
        payload = kernel.encode_delta(keys, table, since, token, gone)
    return kernel.frame_update(rid, payload)


async def subscribe(ctx: OpContext, rid: int, m: pb.Subscribe) -> bytes:
    keys: list[int] = []
    for cid in ctx.check_ids(m.conversation_ids):
        key_id = ctx.view_key(cid)
        if key_id < 0:
            raise OpRefused(Code.FORBIDDEN, f"conversation {cid[:128]!r} is not in your view")
        keys.append(key_id)
    if m.all:
        ctx.state.subscribed_all = True
    ctx.state.follow(keys)
    return frames.ack(rid)


async def unsubscribe(ctx: OpContext, rid: int, m: pb.Unsubscribe) -> bytes:
    state = ctx.state
    ids = ctx.check_ids(m.conversation_ids)
    if m.all:
        state.subscribed_all = False
        state.unfollow_all()
        state.clear_pending()
        return frames.ack(rid)
    for cid in ids:
        key_id = ctx.hub.keys.lookup(cid)
        if key_id >= 0:
            state.unfollow(key_id)
            if not state.follows(key_id) and state.pending.pop(key_id, None) is not None:
                state.shared = None
    return frames.ack(rid)


async def mark_read(ctx: OpContext, rid: int, m: pb.MarkRead) -> bytes:
    """Commit the read seq (the store keeps the highest); the Ack carries the stored one. The
    session's own pending read push is dropped when the Ack already tells it."""
    state, actor = ctx.state, ctx.actor
    key_id = ctx.view_key(m.conversation_id)
    if key_id < 0:
        raise OpRefused(Code.FORBIDDEN, NOT_IN_VIEW)
    inflight = state.inflight_reads
    inflight[key_id] = inflight.get(key_id, 0) + 1
    started = time.perf_counter()
    try:
        result = await ctx.store.mark_read(m.conversation_id, actor.user_id, m.read_sequence)
    except (NotMember, NotFound):
        raise OpRefused(Code.FORBIDDEN, NOT_IN_VIEW) from None
    finally:
        left = inflight[key_id] - 1
        if left:
            inflight[key_id] = left
        else:
            del inflight[key_id]
    ctx.metrics.commit_latency.observe(time.perf_counter() - started)
    row = actor.table.row_of(key_id)
    pending = state.pending.get(key_id)
    if row >= 0 and pending is not None and actor.table.read_seq[row] == result.read_sequence:
        rest = pending & ~FIELD_READ
        if rest:
            state.pending[key_id] = rest
        else:
            del state.pending[key_id]
    if state.has_pending():
        actor.wake()
    return frames.ack(rid, result.read_sequence)


async def set_background(ctx: OpContext, rid: int, m: pb.SetBackground) -> bytes:
    ctx.state.background = m.background
    if not m.background and ctx.state.has_pending():
        ctx.actor.wake()
    return frames.ack(rid)


async def ping(ctx: OpContext, rid: int, m: pb.Ping) -> bytes:
    return frames.pong(rid, m.client_time_ms)


# ------------------------------------------------------------------ service


async def allocate(ctx: OpContext, rid: int, m: pb.AllocateSequences) -> bytes:
    started = time.perf_counter()
    result = await ctx.store.allocate(m.conversation_id, m.count, m.sender_user_id or None)
    ctx.metrics.commit_latency.observe(time.perf_counter() - started)
    return frames.allocated(rid, result.first, result.last, result.time_ms)


async def add_members(ctx: OpContext, rid: int, m: pb.AddMembers) -> bytes:
    await ctx.store.add_members(m.conversation_id, ctx.check_ids(m.user_ids))
    return frames.ack(rid)


async def remove_members(ctx: OpContext, rid: int, m: pb.RemoveMembers) -> bytes:
    await ctx.store.remove_members(m.conversation_id, ctx.check_ids(m.user_ids), m.keep_history)
    return frames.ack(rid)


async def set_min_sequence(ctx: OpContext, rid: int, m: pb.SetMinSequence) -> bytes:
    await ctx.store.set_min_sequence(m.conversation_id, m.min_sequence)
    return frames.ack(rid)


# ------------------------------------------------------------------ group read counts


async def _authorized(ctx: OpContext, conversation_id: str) -> ReadIndex:
    return await ctx.read_indexes.authorized(ctx.identity, ctx.in_view, conversation_id)


async def get_read_counts(ctx: OpContext, rid: int, m: pb.GetReadCounts) -> bytes:
    """``GetReadCounts`` → ``ReadCounts`` (docs/protocol.md "Group read counts"); TOO_LARGE above
    the range limit."""
    idx = await _authorized(ctx, m.conversation_id)
    lo, n = idx.clamp(m.from_sequence, m.to_sequence)
    limit = ctx.limits.max_read_count_range
    if n > limit:
        raise TooLarge(f"{n} seqs in the range; the limit is {limit}")
    return bytes(idx.counter.encode(rid, m.conversation_id, lo, n))


async def watch_read_counts(ctx: OpContext, rid: int, m: pb.WatchReadCounts) -> None:
    """``WatchReadCounts`` → ``Ack``, then pushes (docs/protocol.md "Group read counts"); the Ack
    goes out before the first push."""
    reg, state = ctx.read_indexes, ctx.state
    if m.stop:
        validate_id(m.conversation_id, "conversation_id")
        sw = reg.sessions.get(id(state))
        if sw is not None and m.conversation_id in sw.watches:
            reg.end_watch(sw.watches[m.conversation_id])
        await state.put_reply(frames.ack(rid))
        return None
    await _authorized(ctx, m.conversation_id)
    sw = reg.session_watches(state, ctx.identity.is_service, ctx.start_soon)
    limit = ctx.limits.max_read_count_watches
    if m.conversation_id not in sw.watches and len(sw.watches) >= limit:
        raise TooLarge(f"at most {limit} read-count watches per session")
    await state.put_reply(frames.ack(rid))
    reg.add_watch(sw, m.conversation_id, m.from_sequence)
    return None


async def get_readers(ctx: OpContext, rid: int, m: pb.GetReaders) -> bytes:
    """``GetReaders`` → ``Readers`` (docs/protocol.md "Group read counts"): limit 0 = 100, above
    1 000 TOO_LARGE."""
    limit = m.limit or READERS_DEFAULT_LIMIT
    if limit > MAX_READERS_LIMIT:
        raise TooLarge(f"limit {limit} is above {MAX_READERS_LIMIT}")
    idx = await _authorized(ctx, m.conversation_id)
    ids, next_after = idx.readers(m.sequence, m.unread, limit, m.after_user_id)
    return pb.ServerMessage(
        request_id=rid, readers=pb.Readers(user_ids=ids, next_after_user_id=next_after)
    ).SerializeToString()


OpHandler = Callable[[OpContext, int, Any], Awaitable[bytes | None]]
HANDLERS: dict[str, tuple[OpHandler, bool]] = {  # body field -> (handler, service token only)
    "get_sequences": (get_sequences, False),
    "subscribe": (subscribe, False),
    "unsubscribe": (unsubscribe, False),
    "mark_read": (mark_read, False),
    "set_background": (set_background, False),
    "ping": (ping, False),
    "allocate_sequences": (allocate, True),
    "add_members": (add_members, True),
    "remove_members": (remove_members, True),
    "set_min_sequence": (set_min_sequence, True),
    "get_read_counts": (get_read_counts, False),
    "watch_read_counts": (watch_read_counts, False),
    "get_readers": (get_readers, False),
}
