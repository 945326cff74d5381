"""The WebSocket gateway: listener, accept loop, handshake admission, connection limit, TLS,
graceful shutdown.

Each accepted TCP socket (wrapped in TLS when configured) becomes an
:class:`~seqactor.server.stream.ActivityStream` (every byte received, WebSocket pings included,
counts as traffic for the idle timeout), is upgraded at ``/v1`` by the server's own handshake
(:mod:`seqactor.server.handshake`), and handed as a :class:`WebSocketTransport`
(:mod:`seqactor.server.ws`) to a :class:`~seqactor.server.session.Session`. At most one task per
connection: the handler, which reads (the session's reader calls ``receive``, which answers
pings as it reads). An open user session on plain TCP with nothing to read parks instead
(:mod:`seqactor.server.parking`: no task until its socket is readable or it is asked to end;
then :meth:`Server._resume`). Pushes are written as ready WebSocket frames, directly when the
socket takes them, else under the connection's send lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

import trio

from seqactor.protocol import WS_PATH, Close
from seqactor.server import _frames as frames
from seqactor.server.config import HANDSHAKE_TIMEOUT_S, ServerConfig
from seqactor.server.handshake import (
    HandshakeRefused,
    accept_response,
    parse_upgrade_request,
    read_request_head,
    refusal_response,
)
from seqactor.server.hub import Hub
from seqactor.server.metrics import Metrics
from seqactor.server.parking import AVAILABLE as PARKING_AVAILABLE
from seqactor.server.parking import Parking
from seqactor.server.readcounts import ReadIndexes
from seqactor.server.session import Session, TransportClosed
from seqactor.server.stream import ActivityStream, DirectSink
from seqactor.server.ws import ServerWebSocket
from seqactor.store import Store

__all__ = ["ActivityStream", "DirectSink", "Server", "WebSocketTransport"]

log = logging.getLogger("seqactor.gateway")

WATCHDOG_TICK_S = 1.0  # how often idle sessions are looked for (at most)
WATCHDOG_MIN_TICK_S = 0.01
NOTSENT_LOWAT_BYTES = 16_384  # unsent bytes a connection's socket takes (trio's choice)
# Every connection handler's task name: one shared string (trio would format one per task).
HANDLER_TASK_NAME = "seqactor.server.gateway.Server._handle"
RESUME_TASK_NAME = "seqactor.server.gateway.Server._resume"
ACCEPT_RETRY_S = 0.1  # accept ran out of descriptors or memory: try again after this long
ACCEPT_BATCH = 64  # connections accepted in one pass before other tasks get to run
# accept errors that concern only the connection being accepted (trio's list): skip it
IGNORED_ACCEPT_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT", "ETIMEDOUT", "ECONNRESET",
    ) if hasattr(errno, name)
)
ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
# the listener was closed before its accept loop started (trio's SocketListener reads these as
# "closed" too): the accept loop ends
CLOSED_LISTENER_ERRNOS = frozenset({errno.EBADF, errno.ENOTSOCK})


class WebSocketTransport(ServerWebSocket):
    """A session's view of one connection (:class:`~seqactor.server.session.Transport`): the
    connection itself, its closes raised as the session's ``TransportClosed``."""

    __slots__ = ()

    closed_error = TransportClosed

    @property
    def last_rx(self) -> float:
        return self.stream.last_rx

    send = ServerWebSocket.send_message

    def fd_now(self) -> int:
        """The socket's descriptor if a direct write is possible right now, else -1."""
        return self.stream.fd

    def hold(self, rest: bytes) -> None:
        """Keep the unsent rest of a direct write; it goes out before anything else."""
        self.stream.hold(rest)

    def park_fd(self) -> int:
        """The descriptor an idle session may park (plain TCP), else -1 (TLS: the SSL
        stream may hold decrypted bytes the socket no longer shows)."""
        tcp = self.stream.tcp
        return -1 if tcp is None else tcp.fileno()


class Server:
    """One seqactor node: gateway + hub + actors over a store."""

    def __init__(self, config: ServerConfig, store: Store, secret: bytes) -> None:
        self.config = config
        self.store = store
        store.max_view_conversations = config.max_view_conversations
        store.max_conversation_members = config.max_conversation_members
        self.secret = secret
        self.metrics = Metrics()
        self.hub: Hub = None  # type: ignore[assignment]  # made in serve() once the store is open
        self.actor_nursery: trio.Nursery = None  # type: ignore[assignment]
        self.sessions: set[Session] = set()
        self.devices: dict[tuple[str, str], Session] = {}
        self.connections = 0
        self.listeners: list[trio.SocketListener] = []
        self.port: int = config.port
        self.stopping = False
        self._stop = trio.Event()
        self._accepting = trio.CancelScope()
        # Connection handlers (one task each), and the sessions' children (writers, watch
        # pushes: each under its session's control, see Session._start_soon).
        self.task_nursery: trio.Nursery = None  # type: ignore[assignment]  # set in serve()
        self._ssl: ssl.SSLContext | None = None
        self._read_indexes: ReadIndexes | None = None
        # Idle user sessions' sockets (plain TCP) wait here, without a task each (Linux).
        self.parking: Parking[Session] | None = (
            Parking(self._wake) if config.park_idle_sessions and PARKING_AVAILABLE else None
        )
        if config.tls_cert and config.tls_key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(config.tls_cert, config.tls_key)
            self._ssl = ctx

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self.config.host}:{self.port}{WS_PATH}"

    def read_indexes(self) -> ReadIndexes:
        """The node's read-count indexes (made, and registered as a store listener, on first
        use: a node nobody asks for read counts keeps none)."""
        if self._read_indexes is None:
            self._read_indexes = ReadIndexes(self.store, self.config)
        return self._read_indexes

    # ------------------------------------------------------------------ sessions
    def register(self, session: Session) -> None:
        self.sessions.add(session)
        self.metrics.sessions.set(len(self.sessions))
        assert session.identity is not None
        # A user's device has one session: a newer one replaces it (close 4009). Service
        # sessions are never replaced: a backend pool may hold any number of connections on
        # one credential and one device id (docs/protocol.md, "Sessions").
        if session.device_id and not session.identity.is_service:
            key = (session.identity.user_id, session.device_id)
            old = self.devices.get(key)
            self.devices[key] = session
            if old is not None and old is not session:
                old.request_close(Close.REPLACED, "session replaced by a newer one")

    def unregister(self, session: Session) -> None:
        self.sessions.discard(session)
        self.metrics.sessions.set(len(self.sessions))
        if session.identity is not None and session.device_id and not session.identity.is_service:
            key = (session.identity.user_id, session.device_id)
            if self.devices.get(key) is session:
                del self.devices[key]

    def park(self, session: Session, fd: int) -> bool:
        parking = self.parking
        # (Not once stopping: every session open then was asked to end; one that opens
        # later keeps its task, which the end of the grace period cancels.)
        return parking is not None and not self.stopping and parking.park(fd, session)

    def unpark(self, session: Session, fd: int) -> None:
        if self.parking is not None and self.parking.unpark(fd) is session:
            self._wake(session)

    def _wake(self, session: Session) -> None:
        """A parked session's socket is readable (or it is asked to end): a task for it."""
        session.unparked()
        self.task_nursery.start_soon(self._resume, session, name=RESUME_TASK_NAME)

    # ------------------------------------------------------------------ serving
    async def serve(
        self, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
        on_listening: Callable[[str], None] | None = None,
    ) -> None:
        """Run until :meth:`stop`; ``task_status.started(self)`` once accepting connections."""
        await self.store.open()
        try:
            self.hub = Hub(self.store, self.metrics)
            if self.config.metrics_port is not None:
                self.metrics.serve(self.config.metrics_port, self.config.host)
            async with trio.open_nursery() as actors:
                self.actor_nursery = actors
                self.hub.nursery = actors
                actors.start_soon(self.hub.run_fanout)
                async with trio.open_nursery() as conns:
                    self.task_nursery = conns
                    if self.config.reuse_port:
                        from seqactor.server.listen import reuse_port_listeners

                        self.listeners = reuse_port_listeners(self.config.host, self.config.port)
                    else:
                        self.listeners = await trio.open_tcp_listeners(
                            self.config.port, host=self.config.host
                        )
                    self.port = self.listeners[0].socket.getsockname()[1]
                    for listener in self.listeners:
                        _tune_listener(listener.socket)
                    conns.start_soon(self._accept_loop, conns)
                    conns.start_soon(self._watchdog)
                    if self.parking is not None:
                        conns.start_soon(self.parking.run)
                    if on_listening is not None:
                        on_listening(self.url)
                    task_status.started(self)
                    await self._stop.wait()
                    await self._shutdown(conns)
                actors.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self.store.aclose()

    async def _accept_loop(self, conns: trio.Nursery) -> None:
        with self._accepting:
            async with trio.open_nursery() as loops:
                for listener in self.listeners:
                    loops.start_soon(self._accept, listener.socket, conns)

    async def _accept(self, sock: trio.socket.SocketType, conns: trio.Nursery) -> None:
        """What ``trio.serve_listeners`` does for one listener (errors that concern only the
        connection being accepted are skipped; running out of descriptors or memory is
        logged and retried after ``ACCEPT_RETRY_S``), without a ``trio.SocketStream`` and a
        wrapper task frame per connection: the handler gets the socket and peer address.

        The accepts go through a duplicate of the listening descriptor, a plain non-blocking
        socket owned by this loop: what the backlog holds is taken in one pass (at most
        ``ACCEPT_BATCH``, then other tasks run), one ``accept`` call each, then the loop
        waits until the listener is readable. (trio's ``accept`` is a schedule point per
        connection: ~4 µs of each session open.) Closing the listener never closes the
        duplicate under this loop, so an accept cannot reach a reused descriptor number;
        the server cancels the loop before it closes its listeners."""
        while True:
            try:
                listening = socket.socket(fileno=os.dup(sock.fileno()))
                break
            except OSError as exc:
                if exc.errno in CLOSED_LISTENER_ERRNOS:
                    return  # the listener is closed already
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("listener: cannot duplicate its descriptor (%s); retrying in %s s",
                          exc, ACCEPT_RETRY_S)
                await trio.sleep(ACCEPT_RETRY_S)
        with listening:
            listening.setblocking(False)
            accepted = 0
            while True:
                try:
                    conn, address = listening.accept()
                except BlockingIOError:
                    accepted = 0
                    await trio.lowlevel.wait_readable(listening)
                    continue
                except OSError as exc:
                    if exc.errno in ACCEPT_CAPACITY_ERRNOS:
                        log.error("accept failed (%s); retrying in %s s", exc, ACCEPT_RETRY_S)
                        await trio.sleep(ACCEPT_RETRY_S)
                    elif exc.errno not in IGNORED_ACCEPT_ERRNOS:
                        raise
                    continue
                conns.start_soon(
                    self._handle, trio.socket.from_stdlib_socket(conn), address,
                    name=HANDLER_TASK_NAME,
                )
                accepted += 1
                if accepted >= ACCEPT_BATCH:
                    accepted = 0
                    await trio.lowlevel.checkpoint()

    async def _watchdog(self) -> None:
        """One task for every session's idle timeout (cheaper than a task per session)."""
        tick = max(WATCHDOG_MIN_TICK_S, min(WATCHDOG_TICK_S, self.config.heartbeat_interval_s / 4))
        while True:
            await trio.sleep(tick)
            now = trio.current_time()
            for session in list(self.sessions):
                session.check_idle(now)

    def stop(self) -> None:
        """Begin a graceful stop: GoAway to every session, close 1001, then exit serve()."""
        self._stop.set()

    async def _shutdown(self, conns: trio.Nursery) -> None:
        self.stopping = True
        self._accepting.cancel()
        for listener in self.listeners:
            await listener.aclose()
        goaway = frames.go_away("server shutting down", self.config.goaway_reconnect_after_ms)
        for session in list(self.sessions):
            session.request_close(Close.GOING_AWAY, "server shutting down", goaway)
        with trio.move_on_after(self.config.shutdown_grace_s):
            while self.connections:
                await trio.sleep(0.01)
        if self.parking is not None:  # (none should be left: each was woken to end)
            for session in self.parking.close():
                session.unparked()
                self._close_connection(session.transport)
        conns.cancel_scope.cancel()

    async def _handle(self, sock: trio.socket.SocketType, address: Any) -> None:
        """One connection, in the task the accept loop started for it: the only task the
        connection has (it reads; the session starts a writer only while output waits)."""
        self.connections += 1
        self.metrics.connections.set(self.connections)
        peer = _peer_name(address)
        activity: ActivityStream | None = None
        parked = False
        try:
            if self._ssl is not None:
                activity = ActivityStream(
                    trio.SSLStream(trio.SocketStream(sock), self._ssl, server_side=True)
                )
            else:
                activity = ActivityStream(sock)
            # One cancel scope for the connection: the handshake's deadline, then the
            # session's (its Hello deadline; cancelling it ends the session).
            with trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S) as scope:
                transport = await self._upgrade(activity)
                if transport is not None:
                    parked = await Session(self, transport, peer, scope).serve()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError,
                TransportClosed) as exc:
            log.debug("connection from %s ended during handshake: %r", peer, exc)
        except Exception:  # last resort: one connection's bug must not end the server
            log.exception("connection handler failed; the connection is dropped")
        finally:
            if not parked:  # (parked: the session goes on without a task, see _resume)
                with trio.CancelScope(shield=True):
                    if activity is not None:
                        await trio.aclose_forcefully(activity)
                    else:
                        sock.close()
                self.connections -= 1
                self.metrics.connections.set(self.connections)

    async def _resume(self, session: Session) -> None:
        """A parked session's task: it reads until it parks again or ends; the connection
        closes with it (as at the end of :meth:`_handle`)."""
        parked = False
        try:
            parked = await session.resume()
        except (trio.BrokenResourceError, trio.ClosedResourceError, TransportClosed) as exc:
            log.debug("connection from %s ended: %r", session.peer, exc)
        except Exception:  # last resort: one connection's bug must not end the server
            log.exception("connection handler failed; the connection is dropped")
        finally:
            if not parked:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(session.transport.stream)  # type: ignore[attr-defined]
                self.connections -= 1
                self.metrics.connections.set(self.connections)

    def _close_connection(self, transport: object) -> None:
        """Close a parked session's connection without its task (the server stops)."""
        assert isinstance(transport, WebSocketTransport)
        transport.stream.close_now()
        self.connections -= 1
        self.metrics.connections.set(self.connections)

    async def _upgrade(self, activity: ActivityStream) -> WebSocketTransport | None:
        """The WebSocket handshake; None when refused or abandoned (the caller's scope holds
        its deadline)."""
        try:
            head, rest = await read_request_head(activity)
            request = parse_upgrade_request(head)
            self._admit(request.path)
        except HandshakeRefused as refused:
            if refused.status is not None:
                await activity.send_all(
                    refusal_response(refused.status, refused.message, refused.headers)
                )
            log.debug("handshake refused: %s", refused)
            return None
        transport = WebSocketTransport(activity, self.config.max_frame_bytes, rest)
        await transport.send_raw(accept_response(request.key))
        return transport

    def _admit(self, path: str) -> None:
        """Raise :class:`HandshakeRefused` when this upgrade is not served (404, 503)."""
        if path != WS_PATH:
            raise HandshakeRefused(404, f"not found; the WebSocket path is {WS_PATH}")
        if self.stopping:
            raise HandshakeRefused(503, "server shutting down")
        # Every open connection counts (this one included), authenticated or not: connections
        # that never say Hello hold descriptors too.
        if self.connections > self.config.max_connections:
            raise HandshakeRefused(503, "connection limit reached; retry later")


def _tune_listener(sock: trio.socket.SocketType) -> None:
    """Socket options every accepted connection inherits from its listener (Linux): no Nagle
    delay, and at most ``NOTSENT_LOWAT_BYTES`` unsent bytes in the kernel (as
    ``trio.SocketStream`` sets per connection): a slow reader's socket fills early, so its
    pushes coalesce in the actor instead of queueing in the kernel (I5)."""
    with contextlib.suppress(OSError):  # (not every platform has both)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)


def _peer_name(address: Any) -> str:
    """``host:port`` of a peer address as ``accept`` returns it ("?" when it has none)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return "?"
