"""One client connection: Hello, the op loop, the writer, the idle watchdog, closing.

The session talks to the network only through a :class:`Transport` (``receive``, ``send``,
``close``), so its logic runs the same over a real WebSocket or an in-memory fake.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Protocol

import trio
from google.protobuf.message import DecodeError as ProtoDecodeError

from seqactor import _kernel as kernel
from seqactor._proto import seqactor_pb2 as pb
from seqactor._synctoken import make_token, token_position
from seqactor.auth import AuthError, Identity, verify_token
from seqactor.protocol import Close
from seqactor.server import _frames as frames
from seqactor.server import readcounts as readcounts
from seqactor.server.actor import SessionState, UserActor
from seqactor.store import NotFound, NotMember, StoreError

if TYPE_CHECKING:
    from seqactor.server.gateway import Server

log = logging.getLogger("seqactor.session")
Code = pb.Error.Code


SERVICE_INFLIGHT_OPS = 256  # concurrent service ops per connection (reader waits beyond)
CLOSE_HANDSHAKE_TIMEOUT_S = 2.0


class TransportClosed(Exception):
    """The peer went away (or the connection was closed locally)."""

    def __init__(self, code: int | None = None, reason: str | None = None) -> None:
        super().__init__(f"connection closed ({code} {reason or ''})".strip())
        self.code = code
        self.reason = reason


class Transport(Protocol):
    @property
    def last_rx(self) -> float:
        """trio.current_time() of the last bytes received (any frame, pings too)."""

    async def receive(self) -> bytes | str: ...
    async def send(self, frame: bytes) -> None: ...
    async def flush(self) -> None: ...
    async def close(self, code: int, reason: str) -> None: ...


class RateLimiter:
    """Token bucket: ``rate`` ops/s with a burst of ``burst``."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _store_error_code(exc: StoreError) -> int:
    return int(Code.Value(exc.code))


class Session:
    __slots__ = (
        "server", "cfg", "transport", "peer", "identity", "state", "actor", "session_id",
        "device_id", "opened", "_close", "_peer_gone", "_limiter", "_rejected", "_nursery",
        "_detached",
    )

    def __init__(self, server: Server, transport: Transport, peer: str) -> None:
        self.server = server
        self.cfg = server.config
        self.transport = transport
        self.peer = peer
        self.identity: Identity | None = None
        self.state: SessionState | None = None
        self.actor: UserActor | None = None
        self.session_id = secrets.token_hex(8)
        self.device_id = ""
        self.opened = time.monotonic()
        self._close: tuple[int, str, bytes | None] | None = None
        self._peer_gone: tuple[int, str] | None = None
        self._limiter = RateLimiter(self.cfg.rate_limit_ops_per_s, self.cfg.rate_limit_burst_ops)
        self._rejected = 0
        # The session's nursery while it runs (writer, service ops); its cancel scope is the
        # session's: cancelling it ends the session.
        self._nursery: trio.Nursery | None = None
        self._detached = False

    # ------------------------------------------------------------------ closing
    def request_close(self, code: int, reason: str, final_frame: bytes | None = None) -> None:
        """End the session: optionally write ``final_frame``, then close with ``code``."""
        if self._close is None:
            self._close = (code, reason, final_frame)
        self._cancel()

    def _cancel(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _finish(self) -> tuple[int, str]:
        code, reason, final = self._close or (Close.NORMAL, "closed", None)
        with trio.move_on_after(CLOSE_HANDSHAKE_TIMEOUT_S) as cs:
            cs.shield = True
            try:
                if final is not None:
                    await self.transport.send(final)
                await self.transport.close(code, reason)
            except TransportClosed:
                pass  # the peer is already gone: nothing left to tell it
        return code, reason

    # ------------------------------------------------------------------ main
    def _peer_closed(self, exc: TransportClosed) -> None:
        """The peer going away ends the whole session quietly."""
        self._peer_gone = (exc.code or 1006, exc.reason or "peer closed")
        self._cancel()

    async def _guarded_writer(self) -> None:
        try:
            await self._writer()
        except TransportClosed as exc:
            self._peer_closed(exc)

    async def run(self) -> None:
        code: int = Close.NORMAL
        reason = "closed"
        try:
            # The session's one nursery: its body reads (Hello, then ops), the writer and
            # service ops are its children, and cancelling it ends the session. The peer
            # going away is handled in the body (and in the writer): out of the nursery it
            # would come wrapped in an ExceptionGroup, not a quiet end.
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    if await self._open():
                        self.server.register(self)
                        await self._reader(nursery)
                except TransportClosed as exc:
                    self._peer_closed(exc)
                finally:
                    # Still inside the nursery, before it closes: nothing may start work in
                    # it from here on, and the session leaves its actor, so a change handed
                    # over while the children finish goes to the user's other sessions only.
                    self._nursery = None
                    self._detach()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._detach()  # done already, unless the nursery failed before its body ran
            if self._peer_gone is not None and self._close is None:
                code, reason = self._peer_gone
            elif self._close is not None:
                code, reason = await self._finish()
            self.server.metrics.closes.labels(str(code)).inc()
            log.info(
                "session closed",
                extra={
                    "event": "session_close", "user": self.identity.user_id if self.identity else "",
                    "device": self.device_id, "session": self.session_id, "peer": self.peer,
                    "duration_s": round(time.monotonic() - self.opened, 3), "code": code,
                    "reason": reason,
                },
            )

    async def _open(self) -> bool:
        """Hello -> Welcome: authenticate and attach to the user's actor; False when the
        session ends here. (Its own frame: the Hello is not kept for the session's life.)"""
        hello = await self._receive_hello()
        if hello is None:
            return False
        request_id, msg = hello
        try:
            identity = verify_token(
                self.server.secret, msg.token, self.cfg.max_token_lifetime_s
            )
        except AuthError as exc:
            self._fail(request_id, Code.UNAUTHENTICATED, str(exc), Close.AUTH_FAILED)
            return False
        self.identity = identity
        self.device_id = msg.device_id[:128]
        state = SessionState(
            self.session_id, identity.user_id, self.device_id, self.cfg.reply_queue_frames,
            self._on_fatal, self.server.metrics.counters,
        )
        state.direct = getattr(self.transport, "write_nowait", None)
        state.hold = getattr(self.transport, "hold", None)
        if state.direct is not None and getattr(self.transport, "fd_now", None) is not None:
            # The stream publishes its direct-write descriptor into ``state.fd`` (-1 = not now).
            stream = self.transport.stream  # type: ignore[attr-defined]
            stream.attach(state)
            state.wire = stream  # keeps the socket alive as long as the state can name its fd
        state.start_writer = self._start_writer
        self.state = state
        # The hub adds the state to the actor as part of attaching, so the actor cannot be
        # retired by another session closing in between. It follows nothing until Subscribe.
        actor = await self.server.hub.attach(identity.user_id, self.server.actor_nursery, state)
        self.actor = actor
        log.info(
            "session open",
            extra={
                "event": "session_open", "user": identity.user_id, "device": self.device_id,
                "session": self.session_id, "peer": self.peer, "role": identity.role,
                "platform": msg.platform[:64], "client_version": msg.client_version[:64],
            },
        )
        await self.transport.send(
            frames.welcome(
                request_id, identity.user_id, self.session_id,
                int(self.cfg.heartbeat_interval_s * 1000), self.cfg.max_frame_bytes,
                identity.role,
            )
        )
        return True

    def _on_fatal(self, code: int, reason: str) -> None:
        self.request_close(code, reason, frames.error(0, Code.INTERNAL, reason))

    def _fail(self, request_id: int, code: int, message: str, close_code: int) -> None:
        self.server.metrics.ops.labels("session", Code.Name(code)).inc()
        self.request_close(close_code, message, frames.error(request_id, code, message))

    def _detach(self) -> None:
        """Leave the server's registry and the actor (once; later calls do nothing)."""
        if self._detached:
            return
        self._detached = True
        state, actor = self.state, self.actor
        self.server.unregister(self)
        if state is not None and actor is None:
            # Cancelled inside hub.attach: the state may have joined the actor already.
            actor = self.server.hub.actors.get(state.user_id)
        if state is not None and actor is not None:
            if state in actor.sessions:
                actor.sessions.remove(state)
            self.server.hub.detach_if_idle(actor)

    # ------------------------------------------------------------------ hello
    async def _receive_hello(self) -> tuple[int, pb.Hello] | None:
        with trio.move_on_after(self.cfg.hello_timeout_s):
            data = await self.transport.receive()
            msg = self._decode(data)
            if msg is None:
                return None
            if msg.WhichOneof("body") != "hello":
                self._fail(
                    msg.request_id, Code.UNAUTHENTICATED, "the first message must be Hello",
                    Close.AUTH_FAILED,
                )
                return None
            return msg.request_id, msg.hello
        self.request_close(Close.HELLO_TIMEOUT, "no Hello within the hello timeout")
        return None

    def _decode(self, data: bytes | str) -> pb.ClientMessage | None:
        if isinstance(data, str):
            self.request_close(Close.UNSUPPORTED_DATA, "text frames are not supported")
            return None
        try:
            return pb.ClientMessage.FromString(data)
        except (ProtoDecodeError, ValueError) as exc:
            self._fail(0, Code.BAD_REQUEST, f"undecodable frame: {exc}", Close.PROTOCOL_ERROR)
            return None

    # ------------------------------------------------------------------ tasks
    def check_idle(self, now: float) -> None:
        """Close the session when nothing arrived for the idle timeout (the server's watchdog
        calls this for every session; WebSocket pings count as traffic)."""
        state = self.state
        timeout = (
            self.cfg.background_idle_timeout_s if state is not None and state.background
            else self.cfg.idle_timeout_s
        )
        if now - self.transport.last_rx >= timeout:
            self.request_close(Close.NORMAL, "idle timeout")

    def _start_writer(self) -> None:
        if self._nursery is None:
            # The session is ending: output is dropped, and ``writer_running`` stays set so
            # nothing else tries to write to it either.
            return
        self._nursery.start_soon(self._guarded_writer)

    async def _writer(self) -> None:
        """Drain the outbox, then end (the session starts a writer again when needed)."""
        s, actor = self.state, self.actor
        assert s is not None and actor is not None
        counters = self.server.metrics.counters
        transport = self.transport
        try:
            while True:
                item = s.next_frame()
                if item is None:
                    return
                frame, raw = item
                with trio.move_on_after(self.cfg.write_timeout_s) as cs:
                    if raw:
                        await transport.flush()  # the held rest of a direct write
                    else:
                        await transport.send(frame)
                if cs.cancelled_caught:
                    self._close = (Close.GOING_AWAY, "write timeout", None)
                    self._cancel()
                    return
                if not raw:
                    counters.frames_sent += 1
                    counters.bytes_sent += len(frame)
                if s.has_pending() and not s.background:
                    actor.wake()
        finally:
            s.writer_running = False

    async def _reader(self, nursery: trio.Nursery) -> None:
        assert self.identity is not None and self.state is not None
        service = self.identity.is_service
        # Concurrent service ops (a user session runs one op at a time and needs none).
        slots = trio.Semaphore(SERVICE_INFLIGHT_OPS) if service else None
        msg: pb.ClientMessage | None = None
        while True:
            msg = None  # the last message is not kept while waiting for the next one
            msg = self._decode(await self.transport.receive())
            if msg is None:
                return
            if not service and not self._limiter.allow():
                self._rejected += 1
                self.server.metrics.ops.labels("any", "RATE_LIMITED").inc()
                if self._rejected >= self.cfg.rate_limit_max_rejected:
                    self._fail(
                        msg.request_id, Code.RATE_LIMITED, "rate limit exceeded persistently",
                        Close.RATE_LIMITED,
                    )
                    return
                await self.state.put_reply(
                    frames.error(msg.request_id, Code.RATE_LIMITED, "rate limit exceeded")
                )
                continue
            # An allowed op pays back one rejection (not all of them): a flood far above the
            # rate gets a token now and then, and must still reach the limit and be closed.
            if self._rejected:
                self._rejected -= 1
            if slots is not None:
                await slots.acquire()
                nursery.start_soon(self._run_op, msg, slots)
            else:
                await self._run_op(msg, None)

    # ------------------------------------------------------------------ ops
    async def _run_op(self, msg: pb.ClientMessage, slots: trio.Semaphore | None) -> None:
        state = self.state
        assert state is not None
        kind = msg.WhichOneof("body") or "none"
        rid = msg.request_id
        started = time.perf_counter()
        try:
            reply = await self._dispatch(kind, rid, msg)
            result = "OK"
        except StoreError as exc:
            code = _store_error_code(exc)
            reply = frames.error(rid, code, str(exc))
            result = Code.Name(code)
        except _OpError as exc:
            reply = frames.error(rid, exc.code, exc.message)
            result = Code.Name(exc.code)
        except Exception:
            log.exception("op %s failed for user %r", kind, state.user_id)
            reply = frames.error(rid, Code.INTERNAL, "internal error")
            result = "INTERNAL"
        finally:
            if slots is not None:
                slots.release()
        m = self.server.metrics
        m.ops.labels(kind, result).inc()
        m.op_latency.labels(kind).observe(time.perf_counter() - started)
        if reply is not None:
            await state.put_reply(reply)

    async def _dispatch(self, kind: str, rid: int, msg: pb.ClientMessage) -> bytes | None:
        if kind == "none":
            raise _OpError(Code.BAD_REQUEST, "message has no operation")
        if kind == "hello":
            raise _OpError(Code.BAD_REQUEST, "already authenticated: Hello is only valid first")
        if rid == 0:
            raise _OpError(Code.BAD_REQUEST, "request_id must be non-zero")
        handler = _HANDLERS.get(kind)
        if handler is None:
            raise _OpError(Code.BAD_REQUEST, f"unknown operation {kind!r}")
        op, service_only = handler
        if service_only and not (self.identity and self.identity.is_service):
            raise _OpError(Code.FORBIDDEN, f"{kind} requires a service token")
        return await op(self, rid, getattr(msg, kind))

    def _check_ids(self, repeated: Iterable[str]) -> list[str]:
        ids = list(repeated)
        if len(ids) > self.cfg.max_ids_per_request:
            raise _OpError(
                Code.TOO_LARGE,
                f"{len(ids)} ids in one request; the limit is {self.cfg.max_ids_per_request}",
            )
        return ids

    def _view_key(self, conversation_id: str) -> int:
        """Key id of a conversation in this user's view, or -1 (unknown and foreign alike)."""
        assert self.actor is not None
        key_id = self.server.hub.keys.lookup(conversation_id)
        if key_id < 0 or self.actor.table.row_of(key_id) < 0:
            return -1
        return key_id

    async def op_get_sequences(self, rid: int, m: pb.GetSequences) -> bytes:
        actor = self.actor
        assert actor is not None
        hub = self.server.hub
        ids = self._check_ids(m.conversation_ids)
        table = actor.table
        if ids:
            rows: list[int] = []
            seen: set[int] = set()
            for cid in ids:
                key_id = self._view_key(cid)
                if key_id >= 0 and key_id not in seen:
                    seen.add(key_id)
                    rows.append(table.row_of(key_id))
            return kernel.frame_update(rid, kernel.encode_rows(hub.keys, table, rows))
        position = hub.synced_position
        token = make_token(hub.epoch, position)
        since = token_position(m.since, hub.epoch, hub.position) if m.since else None
        removed: list[str] | None = None
        if since is not None:
            removed = await self.server.store.removed_since(actor.user_id, since)
        if since is None or removed is None:
            payload = kernel.encode_snapshot(hub.keys, table, token, True)
        else:
            keys = hub.keys
            gone = [
                cid for cid in removed
                if keys.lookup(cid) < 0 or table.row_of(keys.lookup(cid)) < 0
            ]
            payload = kernel.encode_delta(keys, table, since, token, gone)
        return kernel.frame_update(rid, payload)

    async def op_subscribe(self, rid: int, m: pb.Subscribe) -> bytes:
        state = self.state
        assert state is not None
        ids = self._check_ids(m.conversation_ids)
        keys: list[int] = []
        for cid in ids:
            key_id = self._view_key(cid)
            if key_id < 0:
                raise _OpError(Code.FORBIDDEN, f"conversation {cid[:128]!r} is not in your view")
            keys.append(key_id)
        if m.all:
            state.subscribed_all = True
        state.subscribed.update(keys)
        return frames.ack(rid)

    async def op_unsubscribe(self, rid: int, m: pb.Unsubscribe) -> bytes:
        state = self.state
        assert state is not None
        ids = self._check_ids(m.conversation_ids)
        if m.all:
            state.subscribed_all = False
            state.subscribed.clear()
            state.clear_pending()
            return frames.ack(rid)
        for cid in ids:
            key_id = self.server.hub.keys.lookup(cid)
            if key_id >= 0:
                state.subscribed.discard(key_id)
                if not state.follows(key_id) and state.pending.pop(key_id, None) is not None:
                    state.shared = None
        return frames.ack(rid)

    async def op_mark_read(self, rid: int, m: pb.MarkRead) -> bytes:
        state, actor = self.state, self.actor
        assert state is not None and actor is not None
        key_id = self._view_key(m.conversation_id)
        if key_id < 0:
            raise _OpError(Code.FORBIDDEN, "conversation is not in your view")
        inflight = state.inflight_reads
        inflight[key_id] = inflight.get(key_id, 0) + 1
        started = time.perf_counter()
        try:
            result = await self.server.store.mark_read(
                m.conversation_id, actor.user_id, m.read_sequence
            )
        except (NotMember, NotFound):
            raise _OpError(Code.FORBIDDEN, "conversation is not in your view") from None
        finally:
            left = inflight[key_id] - 1
            if left:
                inflight[key_id] = left
            else:
                del inflight[key_id]
        self.server.metrics.commit_latency.observe(time.perf_counter() - started)
        row = actor.table.row_of(key_id)
        pending = state.pending.get(key_id)
        if row >= 0 and pending is not None and actor.table.read_seq[row] == result.read_sequence:
            rest = pending & ~2
            if rest:
                state.pending[key_id] = rest
            else:
                del state.pending[key_id]
        if state.has_pending():
            actor.wake()
        return frames.ack(rid, result.read_sequence)

    async def op_set_background(self, rid: int, m: pb.SetBackground) -> bytes:
        state, actor = self.state, self.actor
        assert state is not None and actor is not None
        state.background = m.background
        if not m.background and state.has_pending():
            actor.wake()
        return frames.ack(rid)

    async def op_ping(self, rid: int, m: pb.Ping) -> bytes:
        return frames.pong(rid, m.client_time_ms)

    async def op_allocate(self, rid: int, m: pb.AllocateSequences) -> bytes:
        started = time.perf_counter()
        result = await self.server.store.allocate(
            m.conversation_id, m.count, m.sender_user_id or None
        )
        self.server.metrics.commit_latency.observe(time.perf_counter() - started)
        return frames.allocated(rid, result.first, result.last, result.time_ms)

    async def op_add_members(self, rid: int, m: pb.AddMembers) -> bytes:
        ids = self._check_ids(m.user_ids)
        await self.server.store.add_members(m.conversation_id, ids)
        return frames.ack(rid)

    async def op_remove_members(self, rid: int, m: pb.RemoveMembers) -> bytes:
        ids = self._check_ids(m.user_ids)
        await self.server.store.remove_members(m.conversation_id, ids, m.keep_history)
        return frames.ack(rid)

    async def op_set_min_sequence(self, rid: int, m: pb.SetMinSequence) -> bytes:
        await self.server.store.set_min_sequence(m.conversation_id, m.min_sequence)
        return frames.ack(rid)


class _OpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_Handler = Callable[[Session, int, object], Awaitable[bytes | None]]
_HANDLERS: dict[str, tuple[_Handler, bool]] = {
    "get_sequences": (Session.op_get_sequences, False),  # type: ignore[dict-item]
    "subscribe": (Session.op_subscribe, False),  # type: ignore[dict-item]
    "unsubscribe": (Session.op_unsubscribe, False),  # type: ignore[dict-item]
    "mark_read": (Session.op_mark_read, False),  # type: ignore[dict-item]
    "set_background": (Session.op_set_background, False),  # type: ignore[dict-item]
    "ping": (Session.op_ping, False),  # type: ignore[dict-item]
    "allocate_sequences": (Session.op_allocate, True),  # type: ignore[dict-item]
    "add_members": (Session.op_add_members, True),  # type: ignore[dict-item]
    "remove_members": (Session.op_remove_members, True),  # type: ignore[dict-item]
    "set_min_sequence": (Session.op_set_min_sequence, True),  # type: ignore[dict-item]
    # group read counts (docs/protocol.md "Group read counts"), in their own module
    "get_read_counts": (readcounts.op_get_read_counts, False),  # type: ignore[dict-item]
    "watch_read_counts": (readcounts.op_watch_read_counts, False),  # type: ignore[dict-item]
    "get_readers": (readcounts.op_get_readers, False),  # type: ignore[dict-item]
}
