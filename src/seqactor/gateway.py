"""The WebSocket gateway: listener, handshake, connection limit, TLS, graceful shutdown.

Each TCP connection is wrapped in an activity-tracking stream (every byte received, WebSocket
pings included, counts as traffic for the idle timeout), upgraded with trio-websocket at
``/v1``, and handed to a :class:`~seqactor._session.Session`. Pushes are written as ready
WebSocket frames under trio-websocket's stream lock, so the per-recipient path is one
``send_all`` of pre-encoded bytes.
"""

from __future__ import annotations

import errno
import logging
import os
import ssl
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import trio
import trio_websocket as tws
import wsproto
from wsproto import ConnectionType, WSConnection
from wsproto import events as wsevents
from wsproto.connection import ConnectionState as WSState
from wsproto.utilities import RemoteProtocolError

from seqactor import _frames as frames
from seqactor._session import CLOSE_GOING_AWAY, CLOSE_REPLACED, Session, TransportClosed
from seqactor.config import HANDSHAKE_TIMEOUT_S, WS_MESSAGE_QUEUE, WS_PATH, ServerConfig
from seqactor.hub import Hub
from seqactor.metrics import Metrics
from seqactor.store import Store

log = logging.getLogger("seqactor.gateway")

WATCHDOG_TICK_S = 1.0  # how often idle sessions are looked for (at most)
WATCHDOG_MIN_TICK_S = 0.01
CLOSE_FRAME_FIRST_BYTE = 0x88  # FIN + opcode 8: a server's unmasked Close frame starts with it
DEFAULT_RECEIVE_BYTES = 65_536  # a read without a size asks for this many (trio's default)


class DirectSink(Protocol):
    """Where the stream publishes its direct-write descriptor (the session's state)."""

    fd: int


class ActivityStream(trio.abc.Stream):
    """Wraps the connection's stream: records when bytes last arrived, and publishes the
    descriptor a push may be written to directly.

    Every byte the server sends goes through :meth:`send_all` (ours and trio-websocket's:
    pongs, Close), always under the connection's send lock, and the socket is only ever closed
    through :meth:`aclose`. So ``fd`` — the plain TCP socket's descriptor while nothing is
    being sent, no unsent rest is held, no Close frame has gone out and the stream is open,
    else -1 — is exact without asking the lock, wsproto or the socket on every push. It is
    copied to ``sink.fd`` (the session's state), which the fan-out reads per recipient.
    """

    __slots__ = (
        "inner", "last_rx", "held", "_tcp", "_fd_open", "_sending", "_closing", "sink",
    )

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.last_rx = trio.current_time()
        # The unsent rest of a frame written directly to the socket: it goes out before any
        # other byte, whoever writes next (our writer, or trio-websocket answering a ping),
        # so frames never interleave on the wire.
        self.held: bytes | None = None
        # A plain TCP stream's trio socket: read here directly (see receive_some).
        self._tcp = inner.socket if isinstance(inner, trio.SocketStream) else None
        # Direct writes need the plain socket (TLS bytes go through the SSL stream).
        self._fd_open = self._tcp.fileno() if self._tcp is not None else -1
        self._sending = False
        self._closing = False  # a Close frame went out (or the stream closed): no more frames
        self.sink: DirectSink | None = None

    @property
    def fd(self) -> int:
        return -1 if self._sending or self._closing or self.held is not None else self._fd_open

    def _publish(self) -> None:
        if self.sink is not None:
            self.sink.fd = self.fd

    def attach(self, sink: DirectSink) -> None:
        self.sink = sink
        sink.fd = self.fd

    def hold(self, rest: bytes) -> None:
        """Keep the unsent rest of a direct write; it goes out before anything else."""
        assert self.held is None
        self.held = rest
        self._publish()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        tcp = self._tcp
        if tcp is None:
            data: bytes | bytearray = await self.inner.receive_some(max_bytes)
        else:
            # What trio.SocketStream.receive_some does (try now, else wait until readable;
            # the same checkpoints and error translation), in this one frame: every idle
            # connection waits here, and trio's path holds four more frames and a context
            # manager while waiting (~1 KB a connection). The descriptor is read at every
            # attempt: a closed socket answers -1 (EBADF), never a reused number.
            size = DEFAULT_RECEIVE_BYTES if max_bytes is None else max_bytes
            if size < 1:
                raise ValueError("max_bytes must be >= 1")
            # (Never waits inside an ``except`` block: the exception and its traceback would
            # be held for as long as the connection is idle.)
            await trio.lowlevel.checkpoint_if_cancelled()
            got = _read(tcp.fileno(), size)
            if got is None:
                while got is None:
                    await trio.lowlevel.wait_readable(tcp.fileno())
                    got = _read(tcp.fileno(), size)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
            data = got
        self.last_rx = trio.current_time()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if data and data[0] == CLOSE_FRAME_FIRST_BYTE:
            self._closing = True  # wsproto sends each event as its own send_all
        self._sending = True
        self._publish()
        try:
            held = self.held
            if held is not None:
                self.held = None
                await self.inner.send_all(held)
            if data:
                await self.inner.send_all(data)
        finally:
            self._sending = False
            self._publish()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._fd_open = -1  # before the descriptor can be closed and its number reused
        self._closing = True
        self._publish()
        await self.inner.aclose()


def _read(fd: int, size: int) -> bytes | None:
    """One non-blocking read (None: nothing to read yet), errors as trio's streams report
    them."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


class WebSocketTransport:
    """A session's view of one trio-websocket connection."""

    __slots__ = ("conn", "stream", "_lock")

    def __init__(self, conn: tws.WebSocketConnection, stream: ActivityStream) -> None:
        self.conn = conn
        self.stream = stream
        # Pushes bypass wsproto's per-message framing: the frame header is written here and
        # the bytes go out under the connection's own stream lock (no extensions are
        # negotiated, so a binary frame is just header + payload).
        self._lock: trio.StrictFIFOLock | None = getattr(conn, "_stream_lock", None)

    @property
    def last_rx(self) -> float:
        return self.stream.last_rx

    async def receive(self) -> bytes | str:
        try:
            return await self.conn.get_message()
        except tws.ConnectionClosed as exc:
            reason = exc.reason
            raise TransportClosed(
                getattr(reason, "code", None), getattr(reason, "reason", None)
            ) from None

    async def send(self, frame: bytes) -> None:
        conn = self.conn
        if conn.closed is not None:
            raise TransportClosed(conn.closed.code, conn.closed.reason)
        if self._lock is None:
            try:
                await conn.send_message(frame)
            except tws.ConnectionClosed as exc:
                raise TransportClosed(
                    getattr(exc.reason, "code", None), getattr(exc.reason, "reason", None)
                ) from None
            return
        async with self._lock:
            try:
                await self.stream.send_all(frames.ws_binary_frame(frame))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise TransportClosed(1006, "connection lost") from None

    def fd_now(self) -> int:
        """The socket's descriptor if a direct write is possible right now, else -1."""
        return self.stream.fd if self._lock is not None else -1

    def hold(self, rest: bytes) -> None:
        """Keep the unsent rest of a direct write; it goes out before anything else."""
        self.stream.hold(rest)

    def write_nowait(self, frame: bytes) -> bytes | None:
        """Write ``frame`` now if the socket takes it: None = not possible (use ``send``),
        b"" = written, else the framed bytes still to go (held: ``flush`` sends them)."""
        fd = self.fd_now()
        if fd < 0 or self.conn.closed is not None:
            return None
        raw = frames.ws_binary_frame(frame)
        try:
            n = os.write(fd, raw)
        except BlockingIOError:
            n = 0
        except OSError:
            return None  # the writer's send will meet the error and end the session
        rest = raw[n:]
        if rest:
            self.hold(rest)
        return rest

    async def flush(self) -> None:
        """Send the held rest of a direct write (if trio-websocket has not already)."""
        assert self._lock is not None
        async with self._lock:
            try:
                await self.stream.send_all(b"")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise TransportClosed(1006, "connection lost") from None

    async def close(self, code: int, reason: str) -> None:
        await self.conn.aclose(code, reason[:120])


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
        self._conns: trio.Nursery | None = None  # connection handlers and WebSocket readers
        self._ssl: ssl.SSLContext | None = None
        if config.tls_cert and config.tls_key:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(config.tls_cert, config.tls_key)
            self._ssl = ctx

    @property
    def url(self) -> str:
        scheme = "wss" if self._ssl else "ws"
        return f"{scheme}://{self.config.host}:{self.port}{WS_PATH}"

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
                old.request_close(CLOSE_REPLACED, "session replaced by a newer one")

    def unregister(self, session: Session) -> None:
        self.sessions.discard(session)
        self.metrics.sessions.set(len(self.sessions))
        if session.identity is not None and session.device_id and not session.identity.is_service:
            key = (session.identity.user_id, session.device_id)
            if self.devices.get(key) is session:
                del self.devices[key]

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
                    self._conns = conns
                    if self.config.reuse_port:
                        from seqactor._workers import reuse_port_listeners

                        self.listeners = reuse_port_listeners(self.config.host, self.config.port)
                    else:
                        self.listeners = await trio.open_tcp_listeners(
                            self.config.port, host=self.config.host
                        )
                    self.port = self.listeners[0].socket.getsockname()[1]
                    conns.start_soon(self._accept_loop, conns)
                    conns.start_soon(self._watchdog)
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
            await trio.serve_listeners(self._handle, self.listeners, handler_nursery=conns)

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
            session.request_close(CLOSE_GOING_AWAY, "server shutting down", goaway)
        with trio.move_on_after(self.config.shutdown_grace_s):
            while self.connections:
                await trio.sleep(0.01)
        conns.cancel_scope.cancel()

    async def _handle(self, tcp: trio.abc.Stream) -> None:
        """One connection, in the task trio's listener started for it.

        Per-session memory is mostly trio's and trio-websocket's per-connection objects, so
        this path keeps them few: no nursery of its own (trio-websocket's reader runs in the
        server's connection nursery, guarded), the session's nursery doubles as its cancel
        scope, and the handshake's objects are dropped once the connection is open.
        """
        self.connections += 1
        self.metrics.connections.set(self.connections)
        peer = _peer_name(tcp)
        activity: trio.abc.Stream = tcp  # closed at the end (the wrapper once it exists)
        try:
            stream: trio.abc.Stream = tcp
            if self._ssl is not None:
                stream = trio.SSLStream(tcp, self._ssl, server_side=True)
            activity = ActivityStream(stream)
            conn = await self._upgrade(activity)
            if conn is not None:
                await Session(self, WebSocketTransport(conn, activity), peer).run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, tws.ConnectionClosed,
                tws.HandshakeError, ssl.SSLError) as exc:
            log.debug("connection from %s ended during handshake: %r", peer, exc)
        except Exception:  # last resort: one connection's bug must not end the server
            log.exception("connection handler failed; the connection is dropped")
        finally:
            # Also ends trio-websocket's reader task: its receive_some fails on a closed stream.
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(activity)
            self.connections -= 1
            self.metrics.connections.set(self.connections)

    async def _upgrade(self, activity: ActivityStream) -> tws.WebSocketConnection | None:
        """The WebSocket handshake (what ``tws.wrap_server_stream`` does, with the reader task
        in the server's connection nursery); None when refused or timed out."""
        conn = tws.WebSocketConnection(
            activity, WSConnection(ConnectionType.SERVER), message_queue_size=WS_MESSAGE_QUEUE,
            max_message_size=self.config.max_frame_bytes,
        )
        assert self._conns is not None
        self._conns.start_soon(_ws_reader, conn)
        with trio.move_on_after(HANDSHAKE_TIMEOUT_S):
            request = await conn._get_request()  # noqa: SLF001 - as wrap_server_stream does
            if await self._accept(request):
                _release_handshake(conn)
                return conn
        return None

    async def _accept(self, request: tws.WebSocketRequest) -> bool:
        if request.path.split("?", 1)[0] != WS_PATH:
            await request.reject(404, body=f"not found; the WebSocket path is {WS_PATH}\n".encode())
            return False
        if self.stopping:
            await request.reject(503, body=b"server shutting down\n")
            return False
        # Every open connection counts (this one included), authenticated or not: connections
        # that never say Hello hold descriptors too.
        if self.connections > self.config.max_connections:
            await request.reject(503, body=b"connection limit reached; retry later\n")
            return False
        await request.accept()
        return True


# trio-websocket's reader dispatch: event type -> the connection's handler method's name.
_WS_HANDLERS: dict[type[wsevents.Event], str] = {
    wsevents.AcceptConnection: "_handle_accept_connection_event",
    wsevents.BytesMessage: "_handle_message_event",
    wsevents.CloseConnection: "_handle_close_connection_event",
    wsevents.Ping: "_handle_ping_event",
    wsevents.Pong: "_handle_pong_event",
    wsevents.RejectConnection: "_handle_reject_connection_event",
    wsevents.RejectData: "_handle_reject_data_event",
    wsevents.Request: "_handle_request_event",
    wsevents.TextMessage: "_handle_message_event",
}


async def _ws_reader(conn: tws.WebSocketConnection) -> None:
    """trio-websocket's reader task for one server connection, in the server's connection
    nursery.

    The loop of ``WebSocketConnection._reader_task`` (trio-websocket 0.12), step for step,
    minus its per-connection dict of nine bound handler methods (~1 KB a connection, held for
    the connection's life): handlers are looked up per event. It ends by itself when the
    stream is closed (the connection's handler closes it when it ends). An unexpected error
    must not end the server: it is logged and the connection closed (the session then sees
    the connection closed, as when the peer goes away).
    """
    # noqa: SLF001 throughout: trio-websocket's own reader uses these the same way.
    ws = conn._wsproto  # noqa: SLF001
    try:
        async with conn._send_channel:  # noqa: SLF001 - closed: get_message ends
            while conn._reader_running:  # noqa: SLF001
                for event in ws.events():
                    name = _WS_HANDLERS.get(type(event))
                    if name is None:
                        log.warning("%s received unknown event type: %r", conn, type(event))
                        continue
                    try:
                        await getattr(conn, name)(event)
                    except tws.ConnectionClosed:
                        conn._reader_running = False  # noqa: SLF001
                        break
                try:
                    data = await conn._stream.receive_some(  # noqa: SLF001
                        conn._receive_buffer_size  # noqa: SLF001
                    )
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await conn._abort_web_socket()  # noqa: SLF001
                    break
                if not data:  # TCP closed (before the WebSocket did: an abnormal closure)
                    if ws.state != WSState.CLOSED:
                        await conn._abort_web_socket()  # noqa: SLF001
                    break
                if ws.state != WSState.CLOSED:
                    try:
                        ws.receive_data(data if isinstance(data, bytes) else bytes(data))
                    except RemoteProtocolError as err:
                        if err.event_hint:
                            await conn._send(err.event_hint)  # noqa: SLF001
                        await conn._close_stream()  # noqa: SLF001
    except Exception:
        log.exception("WebSocket reader failed; the connection is dropped")
        await trio.aclose_forcefully(conn._stream)  # noqa: SLF001


class _OpenHandshake:
    """Stands in for wsproto's handshake object once the connection is open.

    ``WSConnection`` asks its handshake for events on every ``events()`` call; once open, the
    handshake has none left (the upgrade request was taken before the accept, and bytes that
    followed it went to the connection with the accept), and nothing else of it is used.
    """

    __slots__ = ()

    def events(self) -> Iterator[object]:
        return iter(())


_OPEN_HANDSHAKE = _OpenHandshake()
_SET_EVENT = trio.Event()
_SET_EVENT.set()


def _release_handshake(conn: tws.WebSocketConnection) -> None:
    """Drop what only the handshake needed (~2.5 KB a connection: wsproto's h11 machinery and
    its event queue, two trio Events). Checked against trio-websocket 0.12 and wsproto 1.x
    (the versions pyproject allows): once the server has accepted, ``_open_handshake`` is only
    waited on by client-side connects, ``_for_testing_peer_closed_connection`` is only set
    (never waited on) by the library, and the handshake object only yields events.
    """
    ws = conn._wsproto  # noqa: SLF001
    if ws.connection is None or not conn._open_handshake.is_set():  # noqa: SLF001
        return  # not open after all: leave everything as the library made it
    ws.handshake = _OPEN_HANDSHAKE  # type: ignore[assignment]
    conn._open_handshake = _SET_EVENT  # noqa: SLF001
    conn._for_testing_peer_closed_connection = _SET_EVENT  # noqa: SLF001
    _slim_queues(conn)


class _SmallQueue(list[Any]):
    """A FIFO for queues that stay short, without a deque's 64-slot block (~0.7 KB each).

    It has what the two queues below are used with (append, popleft, len, truth, clear);
    popping the head of a short list costs less than the memory a deque holds per queue.
    """

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


def _slim_queues(conn: tws.WebSocketConnection) -> None:
    """Swap the open connection's two deques for :class:`_SmallQueue` (contents kept).

    * wsproto's ``Connection._events``: only ``append``, truth and ``popleft`` (wsproto 1.x);
      it holds nothing but an abnormal-closure event (frames are parsed lazily in
      ``events()``, whose generator re-reads the attribute on every step).
    * trio's memory channel buffer (``MemoryChannelState.data``, trio 0.25+): ``append``,
      ``popleft``, ``len``, truth, ``clear``; at most ``WS_MESSAGE_QUEUE`` messages.

    Only for the library versions whose code was read (a newer one may use other deque
    methods: it keeps its deque and costs the memory, never correctness); a queue that is not
    the expected deque is left alone too.
    """
    if _WSPROTO_QUEUES_CHECKED:
        connection = conn._wsproto.connection  # noqa: SLF001
        events = getattr(connection, "_events", None)
        if type(events) is deque:
            connection._events = _SmallQueue(events)  # type: ignore[union-attr]  # noqa: SLF001
    if _TRIO_QUEUES_CHECKED:
        state = getattr(conn._recv_channel, "_state", None)  # noqa: SLF001
        data = getattr(state, "data", None)
        if type(data) is deque:
            state.data = _SmallQueue(data)  # type: ignore[union-attr]


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0", "0"])[:2]
    try:
        return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)
    except ValueError:
        return (-1, -1)


# The versions whose queue usage _slim_queues was checked against.
_TRIO_QUEUES_CHECKED = (0, 25) <= _major_minor(trio.__version__) <= (0, 35)
_WSPROTO_QUEUES_CHECKED = _major_minor(wsproto.__version__)[0] == 1


def _peer_name(stream: Any) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except (AttributeError, OSError, ValueError):
        return "?"
