"""One client connection's I/O: it reads frames, feeds them to the sans-IO
:class:`~seqactor.server.session_protocol.SessionProtocol` and carries out what it decides —
attach to the user's actor and send Welcome, run an op (:mod:`seqactor.server.ops`) and queue its
reply, send a refusal, close — plus the writer that drains the session's outbox.

The session talks to the network only through a :class:`Transport` (``receive``, ``send``,
``close``) and to the node only through a :class:`SessionHost` (the gateway's
:class:`~seqactor.server.gateway.Server`), so it runs the same over a real WebSocket or an
in-memory fake.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Protocol

import trio

from seqactor._proto import seqactor_pb2 as pb
from seqactor.protocol import Close
from seqactor.server import _frames as frames
from seqactor.server.actor import SessionState, UserActor
from seqactor.server.ops import OpContext
from seqactor.server.session_protocol import (
    CloseConnection,
    Opened,
    Reply,
    RunOp,
    SessionProtocol,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from seqactor.auth import Identity
    from seqactor.server.config import ServerConfig
    from seqactor.server.hub import Hub
    from seqactor.server.metrics import Metrics
    from seqactor.server.readcounts import ReadIndexes
    from seqactor.store import Store

log = logging.getLogger("seqactor.session")
Code = pb.Error.Code

SESSION_ID_BYTES = 8  # random bytes in a session id (sent hex-encoded in Welcome)
CHILD_TASK_NAME = "seqactor.server.session.Session._child"  # (shared: not formatted per task)
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


class SessionHost(Protocol):
    """What a session needs of its node (the gateway's ``Server``)."""

    config: ServerConfig
    secret: bytes
    store: Store
    hub: Hub
    metrics: Metrics
    actor_nursery: trio.Nursery
    task_nursery: trio.Nursery  # where sessions' children run (each under its own scope)

    def read_indexes(self) -> ReadIndexes: ...
    def register(self, session: Session) -> None: ...
    def unregister(self, session: Session) -> None: ...
    def park(self, session: Session, fd: int) -> bool:
        """Watch ``fd`` (the session's socket, nothing to read now) and resume the session
        in a new task (:meth:`Session.resume`) once it is readable; False: not possible
        (the session's task waits for it itself)."""
    def unpark(self, session: Session, fd: int) -> None:
        """Resume the parked session now (it is asked to end)."""


class Session:
    """One client connection's session, run by :meth:`run` (or :meth:`serve`, inside
    :attr:`scope`) in the connection's task.

    The session has one cancel scope (``scope``: the gateway's handshake deadline, then the
    Hello deadline, then none) and no nursery: the reader runs in the connection's task, and
    the few children a session may need (its writer, while output waits; read-count watch
    pushes) run in the host's ``task_nursery``, each under its own cancel scope, which the
    session cancels and waits for when it ends. A service session's concurrent ops run in a
    nursery of their own, opened only on service sessions.

    An open user session whose transport can park (plain TCP, ``park_fd``) holds no task
    while it has nothing to read: :meth:`serve` (and :meth:`resume`) return True once the
    socket is drained and handed to the host (:meth:`SessionHost.park`); the host calls
    :meth:`resume` in a new task when the socket is readable or the session is asked to end
    (then with a fresh ``scope``).
    """

    __slots__ = (
        "host", "cfg", "transport", "peer", "protocol", "state", "actor", "ctx", "session_id",
        "device_id", "opened", "scope", "_peer_gone", "_accepting", "_children",
        "_child_scopes", "_children_done", "_detached", "_ending", "_parked",
    )

    def __init__(
        self, host: SessionHost, transport: Transport, peer: str,
        scope: trio.CancelScope | None = None,
    ) -> None:
        self.host = host
        self.cfg = host.config
        self.transport = transport
        self.peer = peer
        self.protocol = SessionProtocol(host.config, host.secret, trio.current_time())
        self.state: SessionState | None = None
        self.actor: UserActor | None = None
        self.ctx: OpContext | None = None
        self.session_id = secrets.token_hex(SESSION_ID_BYTES)
        self.device_id = ""
        self.opened = time.monotonic()
        # The session's cancel scope: cancelling it ends the session (its deadline is the
        # Hello deadline until the session is open). :meth:`serve` runs inside it.
        self.scope = trio.CancelScope() if scope is None else scope
        self._peer_gone: tuple[int, str] | None = None
        self._accepting = False  # children may start (between serve's start and its end)
        self._children = 0  # children started and not yet finished
        # Made on first use (most sessions never start a child): the children's scopes, and
        # the event the ending session waits on until the last child has finished.
        self._child_scopes: set[trio.CancelScope] | None = None
        self._children_done: trio.Event | None = None
        self._detached = False
        self._ending = False  # the session was asked to end (its scope cancelled)
        self._parked = -1  # the parked socket's descriptor (no task meanwhile), else -1

    @property
    def identity(self) -> Identity | None:
        return self.protocol.identity

    # ------------------------------------------------------------------ closing
    def request_close(self, code: int, reason: str, final_frame: bytes | None = None) -> None:
        """End the session: optionally write ``final_frame``, then close with ``code``."""
        self.protocol.close(code, reason, final_frame)
        self._cancel()

    def _cancel(self) -> None:
        self._ending = True
        self.scope.cancel()
        fd = self._parked
        if fd >= 0:  # no task to cancel: a new one runs the session's end
            self._parked = -1
            self.host.unpark(self, fd)

    async def _finish(self, closing: CloseConnection) -> None:
        with trio.move_on_after(CLOSE_HANDSHAKE_TIMEOUT_S) as cs:
            cs.shield = True
            try:
                if closing.final_frame is not None:
                    await self.transport.send(closing.final_frame)
                await self.transport.close(closing.code, closing.reason)
            except TransportClosed:
                pass  # the peer is already gone: nothing left to tell it

    def _peer_closed(self, exc: TransportClosed) -> None:
        """The peer going away ends the whole session quietly."""
        self._peer_gone = (exc.code or Close.ABNORMAL, exc.reason or "peer closed")
        self._cancel()

    def unparked(self) -> None:
        """The host took the session's socket out of its parking (a task resumes it)."""
        self._parked = -1

    # ------------------------------------------------------------------ main
    async def run(self) -> None:
        """Run the session to its end, in its own cancel scope (its task never parks)."""
        with self.scope:
            await self.serve(park=False)

    async def serve(self, park: bool = True) -> bool:
        """The session, in the caller's ``with self.scope`` block: Hello, then ops until the
        session ends; then its children end, it leaves its actor and closes. True: the
        session parked instead (``park``; see the class), it has not ended."""
        proto = self.protocol
        self.scope.deadline = proto.hello_deadline
        self._accepting = True
        parked = False
        try:
            try:
                if await self._open():
                    self.scope.deadline = math.inf
                    self.host.register(self)
                    identity = proto.identity
                    assert identity is not None
                    if identity.is_service:
                        await self._service_reader()
                    else:  # (called from here: one coroutine frame less per idle session)
                        parked = await self._read_ops(None, None, park)
            except TransportClosed as exc:
                self._peer_closed(exc)
        finally:
            if not parked:
                await self._end()
        return parked

    async def resume(self) -> bool:
        """Go on reading after the session parked (in a new task, under a new ``scope``):
        until it parks again (True) or ends."""
        scope = self.scope = trio.CancelScope()
        if self._ending:
            scope.cancel()
        parked = False
        with scope:
            try:
                try:
                    parked = await self._read_ops(None, None, True)
                except TransportClosed as exc:
                    self._peer_closed(exc)
            finally:
                if not parked:
                    await self._end()
        return parked

    async def _end(self) -> None:
        """The session's end: its children end, it leaves its actor, closes, logs."""
        proto = self.protocol
        try:
            # Nothing may start work for the session from here on, and the session leaves
            # its actor, so a change handed over while the children finish goes to the
            # user's other sessions only.
            self._accepting = False
            self._detach()
            await self._end_children()
        finally:
            closing = proto.closing
            if self._peer_gone is not None and closing is None:
                code, reason = self._peer_gone
            else:
                if closing is None:  # the Hello deadline passed (the scope's), or the server stops
                    closing = proto.check_hello_timeout(trio.current_time()) or proto.close(
                        Close.NORMAL, "closed")
                await self._finish(closing)
                code, reason = closing.code, closing.reason
            self.host.metrics.closed(code)
            if log.isEnabledFor(logging.INFO):
                identity = self.identity
                log.info(
                    "session closed",
                    extra={
                        "event": "session_close", "user": identity.user_id if identity else "",
                        "device": self.device_id, "session": self.session_id, "peer": self.peer,
                        "duration_s": round(time.monotonic() - self.opened, 3), "code": code,
                        "reason": reason,
                    },
                )

    async def _open(self) -> bool:
        """Hello -> Welcome: authenticate and attach to the user's actor; False when the
        session ends here."""
        proto = self.protocol
        # (The Hello deadline is the session scope's: serve() turns it into close 4002.)
        action = proto.receive(await self.transport.receive(), trio.current_time())
        if not isinstance(action, Opened):
            return False
        identity = action.identity
        self.device_id = action.device_id
        host = self.host
        state = SessionState(
            self.session_id, identity.user_id, self.device_id, self.cfg.reply_queue_frames,
            self._on_fatal, host.metrics.counters,
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
        actor = await host.hub.attach(identity.user_id, host.actor_nursery, state)
        self.actor = actor
        self.ctx = OpContext(identity, state, actor, host.hub, host.store, self.cfg, host.metrics,
                             host.read_indexes, self._start_soon)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "session open",
                extra={
                    "event": "session_open", "user": identity.user_id, "device": self.device_id,
                    "session": self.session_id, "peer": self.peer, "role": identity.role,
                    "platform": action.platform, "client_version": action.client_version,
                },
            )
        await self.transport.send(proto.welcome(action.request_id, self.session_id))
        return True

    def _on_fatal(self, code: int, reason: str) -> None:
        self.request_close(code, reason, frames.error(0, Code.INTERNAL, reason))

    def _detach(self) -> None:
        """Leave the server's registry and the actor (once; later calls do nothing)."""
        if self._detached:
            return
        self._detached = True
        state, actor = self.state, self.actor
        hub = self.host.hub
        self.host.unregister(self)
        if state is not None and actor is None:
            # Cancelled inside hub.attach: the state may have joined the actor already.
            actor = hub.actors.get(state.user_id)
        if state is not None and actor is not None:
            if state in actor.sessions:
                actor.sessions.remove(state)
            hub.detach_if_idle(actor)

    # ------------------------------------------------------------------ tasks
    def check_idle(self, now: float) -> None:
        """Close the session when nothing arrived for the idle timeout (the server's watchdog
        calls this for every session; WebSocket pings count as traffic)."""
        state = self.state
        background = state is not None and state.background
        if self.protocol.check_idle(now, self.transport.last_rx, background) is not None:
            self._cancel()

    def _start_soon(self, fn: Callable[[], Awaitable[None]]) -> bool:
        """Start ``fn`` as a child of the session (in the host's ``task_nursery``, under a
        cancel scope of its own that the session cancels when it ends); False when the
        session is ending."""
        if not self._accepting:
            return False
        self._children += 1
        self.host.task_nursery.start_soon(self._child, fn, name=CHILD_TASK_NAME)
        return True

    async def _child(self, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            if not self._accepting:
                return  # the session ended before this child first ran
            scopes = self._child_scopes
            if scopes is None:
                scopes = self._child_scopes = set()
            with trio.CancelScope() as scope:
                scopes.add(scope)
                try:
                    await fn()
                except TransportClosed as exc:
                    self._peer_closed(exc)
                finally:
                    scopes.discard(scope)
        except Exception:  # a child's bug ends its session only (not the host's nursery)
            log.exception("session %s: a task failed; closing the session", self.session_id)
            self._on_fatal(Close.INTERNAL, "internal error")
        finally:
            self._children -= 1
            if not self._children and self._children_done is not None:
                self._children_done.set()

    async def _end_children(self) -> None:
        """Cancel the session's children and wait until they have finished (shielded: the
        session's own scope may be cancelled by now)."""
        if not self._children:
            return
        for scope in self._child_scopes or ():
            scope.cancel()
        done = self._children_done = trio.Event()
        with trio.CancelScope(shield=True):
            await done.wait()

    def _rest_held(self) -> None:
        """The transport holds the unsent rest of a batch: a writer sends it."""
        state = self.state
        assert state is not None
        state.rest_held = True
        state.kick()

    def _start_writer(self) -> None:
        # While the session is ending output is dropped, and ``writer_running`` stays set so
        # nothing else tries to write to it either.
        self._start_soon(self._writer)

    async def _writer(self) -> None:
        """Drain the outbox, then end (the session starts a writer again when needed)."""
        s, actor = self.state, self.actor
        assert s is not None and actor is not None
        counters = self.host.metrics.counters
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
                    self.request_close(Close.GOING_AWAY, "write timeout")
                    return
                if not raw:
                    counters.frames_sent += 1
                    counters.bytes_sent += len(frame)
                if s.has_pending() and not s.background:
                    actor.wake()
        finally:
            s.writer_running = False

    async def _service_reader(self) -> None:
        """A service session's reader: its ops run concurrently, in a nursery of their own
        (a user session runs one op at a time and needs none)."""
        async with trio.open_nursery() as ops:
            try:
                await self._read_ops(ops, trio.Semaphore(SERVICE_INFLIGHT_OPS))
            except TransportClosed as exc:  # (out of the nursery it would come wrapped)
                self._peer_closed(exc)
            finally:
                ops.cancel_scope.cancel()

    async def _read_ops(
        self, ops: trio.Nursery | None, slots: trio.Semaphore | None, park: bool = False,
    ) -> bool:
        """Read and carry out ops until the session ends (False) or, with ``park`` (a user
        session), it parked its drained socket (True)."""
        state, proto, transport = self.state, self.protocol, self.transport
        assert state is not None
        metrics = self.host.metrics
        # A user session's replies to pipelined requests (the next one already read) go out
        # in one write (the transport writes the batch before it next waits to read).
        batching = ops is None and hasattr(transport, "begin_batch")
        # The socket a drained session parks (-1: its task waits; TLS, fakes, service ops).
        park_fd = transport.park_fd() if park and hasattr(transport, "park_fd") else -1
        while True:
            if park_fd >= 0:
                message = await transport.receive(False)  # type: ignore[call-arg]
                if message is None:  # nothing to read now: no task until there is
                    if self.host.park(self, park_fd):
                        self._parked = park_fd
                        return True
                    park_fd = -1
                    continue
            else:
                message = await transport.receive()
            action = proto.receive(message, trio.current_time())
            del message
            if isinstance(action, RunOp):
                if ops is not None and slots is not None:
                    await slots.acquire()
                    ops.start_soon(self._run_op, action, slots)
                else:
                    if batching and transport.buffered:  # type: ignore[attr-defined]
                        transport.begin_batch(self._rest_held)  # type: ignore[attr-defined]
                    await self._run_op(action, None)
            elif isinstance(action, Reply):
                metrics.op_done(action.kind, action.result)
                await state.put_reply(action.frame)
            else:
                return False  # CloseConnection (_end() sends it)
            del action  # the last message is not kept while waiting for the next one

    async def _run_op(self, action: RunOp, slots: trio.Semaphore | None) -> None:
        state, ctx = self.state, self.ctx
        assert state is not None and ctx is not None
        started = time.perf_counter()
        try:
            reply = await action.op(ctx, action.request_id, action.body)
            result = "OK"
        except Exception as exc:  # noqa: BLE001 - every op error becomes its Error reply
            refusal = self.protocol.op_error(action, exc)
            if refusal.result == "INTERNAL":
                log.exception("op %s failed for user %r", action.kind, state.user_id)
            reply, result = refusal.frame, refusal.result
        finally:
            if slots is not None:
                slots.release()
        self.host.metrics.op_done(action.kind, result, time.perf_counter() - started)
        if reply is not None:
            await state.put_reply(reply)
