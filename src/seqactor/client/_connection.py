"""Connection machinery shared by :class:`~seqactor.Client` and :class:`~seqactor.ServiceClient`.

One :class:`_Endpoint` owns a reconnect loop. Each pass opens TCP (+TLS), upgrades to a
WebSocket, sends ``Hello``, waits for ``Welcome`` and then runs three things on that *link*:
the reader (dispatches replies by request id and pushes in arrival order), the heartbeat
(a ``Ping`` only after ``heartbeat_interval`` without anything sent) and the subclass's
``_on_open`` (re-subscribe and resume). When the link ends, the loop waits (GoAway delay or
backoff with full jitter) and tries again. Close 4001 (authentication) and 4009 (session
replaced) end the loop: the error is kept and surfaced to the caller.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio
import trio_websocket as tws

from seqactor import _kernel as kernel
from seqactor._proto import seqactor_pb2 as pb
from seqactor.client._backoff import Backoff
from seqactor.protocol import WS_PATH, Close, ErrorCode

log = logging.getLogger("seqactor.client")

DEFAULT_PATH = WS_PATH
CONNECT_TIMEOUT_S = 10.0
DEFAULT_HEARTBEAT_S = 25.0  # used until the server's Welcome says otherwise
BACKGROUND_PING_FACTOR = 4.0  # in background the server's idle timeout is 4x: ping 4x less
DEAD_AFTER_FACTOR = 2.5  # nothing received for 2.5 x the ping interval: the link is dead
CLOSE_TIMEOUT_S = 1.0
SHUTDOWN_CLOSE_TIMEOUT_S = 0.25  # closing the client: the close handshake gets this long
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # snapshots of large views exceed the server's inbound limit
WS_QUEUE_FRAMES = 64

# ServerMessage body field numbers (docs/protocol.md, "Messages")
F_WELCOME, F_UPDATE, F_ACK, F_ERROR, F_PONG, F_ALLOCATED, F_GOAWAY = 2, 3, 4, 5, 6, 7, 8
F_READ_COUNTS = 9  # v1.1: a read-count watch's push (docs/protocol.md "Group read counts")


TokenSource = str | Callable[[], str] | Callable[[], Awaitable[str]]


# ---------------------------------------------------------------------------------- errors


class SeqactorError(Exception):
    """Base of every error the client raises."""


class ConnectError(SeqactorError):
    """Could not connect (bad URL, refused, unreachable, timed out, handshake rejected)."""


class AuthenticationError(SeqactorError):
    """The server refused the token (Error UNAUTHENTICATED / close 4001). Not retried."""


class SessionReplaced(SeqactorError):
    """Another session with the same user and device id took over (close 4009). Not retried."""


class ConnectionLost(SeqactorError):
    """The connection dropped while the request was in flight (or none came up in time).

    The request may or may not have been applied by the server; the caller decides whether to
    retry (an allocation is not idempotent)."""


class ClientClosed(SeqactorError):
    """The client was closed."""



class ServerError(SeqactorError):
    """The server answered a request with ``Error``; ``code`` is the :class:`ErrorCode`."""

    def __init__(self, code: int, message: str) -> None:
        try:
            self.code: ErrorCode | int = ErrorCode(code)
            name = self.code.name
        except ValueError:
            self.code, name = code, str(code)
        self.message = message
        super().__init__(f"{name}: {message}")


class BadRequest(ServerError):
    pass


class Forbidden(ServerError):
    pass


class NotFound(ServerError):
    pass


class TooLarge(ServerError):
    pass


class RateLimited(ServerError):
    pass


class Unavailable(ServerError):
    pass


_ERROR_TYPES: dict[int, type[ServerError]] = {
    ErrorCode.BAD_REQUEST: BadRequest, ErrorCode.FORBIDDEN: Forbidden,
    ErrorCode.NOT_FOUND: NotFound, ErrorCode.TOO_LARGE: TooLarge,
    ErrorCode.RATE_LIMITED: RateLimited, ErrorCode.UNAVAILABLE: Unavailable,
}


def server_error(code: int, message: str) -> ServerError:
    return _ERROR_TYPES.get(code, ServerError)(code, message)


class _Closed(Exception):
    """The WebSocket closed (code/reason from the close frame, 1006 when none)."""

    def __init__(self, code: int | None, reason: str | None) -> None:
        self.code = code or 1006
        self.reason = reason or ""
        super().__init__(f"connection closed by the server ({self.code} {self.reason})".strip())


class _Dead(Exception):
    """Nothing arrived for too long: the link is presumed dead."""


# ---------------------------------------------------------------------------------- stats


@dataclass(slots=True)
class ClientStats:
    """Counters a client keeps (wire bytes are TCP payload bytes: WebSocket framing, the
    HTTP upgrade and TLS records included)."""

    connects: int = 0  # links that reached Welcome
    attempts: int = 0  # connection attempts
    frames_in: int = 0
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pings_sent: int = 0
    pushes: int = 0
    goaways: int = 0


def ws_header_len(payload_len: int, masked: bool = False) -> int:
    """Bytes of a WebSocket frame header for a payload (RFC 6455 §5.2)."""
    n = 2 if payload_len < 126 else 4 if payload_len < 1 << 16 else 10
    return n + (4 if masked else 0)


class _CountingStream(trio.abc.Stream):
    """Wraps the TCP stream: counts bytes each way and when traffic last moved."""

    def __init__(self, inner: trio.abc.Stream, stats: ClientStats) -> None:
        self.inner = inner
        self.stats = stats
        self.last_rx = self.last_tx = trio.current_time()
        # trio-websocket 0.12 waits forever when the peer closes during the opening
        # handshake: the handshake runs in a scope that this callback cancels.
        self.on_eof: Callable[[], None] | None = None

    def _eof(self) -> None:
        if self.on_eof is not None:
            self.on_eof()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)
        self.stats.bytes_out += len(data)
        self.last_tx = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._eof()
            raise
        if not data:
            self._eof()
        self.stats.bytes_in += len(data)
        self.last_rx = trio.current_time()
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


# ---------------------------------------------------------------------------------- URL


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    tls: bool
    host: str
    port: int
    resource: str

    @property
    def host_header(self) -> str:
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    """``ws://host[:port][/path]`` or ``wss://...``; the path defaults to ``/v1``."""
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as exc:
        raise ConnectError(f"bad URL {url!r}: {exc}") from None
    if u.scheme not in ("ws", "wss"):
        raise ConnectError(f"bad URL {url!r}: expected ws://host:port/v1 or wss://...")
    if not u.hostname:
        raise ConnectError(f"bad URL {url!r}: no host")
    tls = u.scheme == "wss"
    resource = (u.path or DEFAULT_PATH) + (f"?{u.query}" if u.query else "")
    return Target(url, tls, u.hostname, port or (443 if tls else 80), resource)


def describe(exc: BaseException) -> str:
    """One line for a connection failure."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        cause = exc.__cause__
        if isinstance(cause, BaseExceptionGroup):
            leaves = [e for e in cause.exceptions if isinstance(e, OSError)]
            if leaves and all(isinstance(e, ConnectionRefusedError) for e in leaves):
                return "connection refused"
            if leaves:
                return leaves[0].strerror or str(leaves[0])
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    if isinstance(exc, tws.ConnectionRejected):
        return f"WebSocket handshake rejected with HTTP {exc.status_code}"
    if isinstance(exc, tws.HandshakeError):
        return f"WebSocket handshake failed ({exc})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc.reason or exc})"
    if isinstance(exc, tws.ConnectionClosed):
        code, reason = close_info(exc)
        return f"connection closed ({code} {reason})".strip()
    return str(exc) or type(exc).__name__


def close_info(exc: tws.ConnectionClosed) -> tuple[int | None, str]:
    reason = exc.reason
    if reason is None:
        return None, ""
    return reason.code, reason.reason or ""


def unwrap(exc: BaseException) -> BaseException:
    """The single leaf of (nested) exception groups, else ``exc`` itself."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# ---------------------------------------------------------------------------------- link


class _Waiter:
    __slots__ = ("kind", "meta", "event", "field", "body", "error", "sent_at", "size")

    def __init__(self, kind: str, meta: Any = None) -> None:
        self.kind = kind
        self.meta = meta
        self.event = trio.Event()
        self.field = 0
        self.body = b""
        self.error: BaseException | None = None
        self.sent_at = 0.0
        self.size = 0  # bytes of the reply frame (payload + WebSocket header)

    def resolve(self, field: int, body: bytes, size: int) -> None:
        self.field, self.body, self.size = field, body, size
        self.event.set()

    def fail(self, exc: BaseException) -> None:
        if not self.event.is_set():
            self.error = exc
            self.event.set()

    async def wait(self) -> tuple[int, bytes]:
        await self.event.wait()
        if self.error is not None:
            raise self.error
        if self.field == F_ERROR:
            err = pb.Error.FromString(self.body)
            raise server_error(err.code, err.message)
        return self.field, self.body


class Link:
    """One authenticated WebSocket connection."""

    def __init__(
        self, conn: tws.WebSocketConnection, stream: _CountingStream, welcome: pb.Welcome
    ) -> None:
        self.conn = conn
        self.stream = stream
        self.welcome = welcome
        self.heartbeat_s = (welcome.heartbeat_interval_ms / 1000.0) or DEFAULT_HEARTBEAT_S
        self.waiters: dict[int, _Waiter] = {}
        self.scope = trio.CancelScope()
        self.error: BaseException | None = None
        self.ready = False  # Client: resumed and synced
        self.alive = True

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.scope.cancel()


# ---------------------------------------------------------------------------------- endpoint


class _Endpoint:
    """Reconnecting connection to one seqactor server (base of the public clients)."""

    def __init__(
        self, url: str, token: TokenSource, *, device_id: str = "", platform: str = "python",
        client_version: str = "", connect_timeout_s: float = CONNECT_TIMEOUT_S,
        backoff: Backoff | None = None, ssl_context: ssl.SSLContext | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        from seqactor import __version__

        self.target = parse_url(url)
        self.url = url
        self._token_source = token
        self.device_id = device_id
        self.platform = platform
        self.client_version = client_version or f"seqactor-py/{__version__}"
        self.connect_timeout_s = connect_timeout_s
        self.backoff = backoff or Backoff()
        self._ssl = ssl_context
        self.max_message_bytes = max_message_bytes
        self.stats = ClientStats()
        self.user_id = ""
        self.role = ""
        self.last_error: str | None = None
        self.error: SeqactorError | None = None  # fatal: the loop stopped
        self._ids = itertools.count(1)
        self._link: Link | None = None
        self._changed = trio.Event()  # set (and replaced) on every link state change
        self._closing = False
        self._goaway_s: float | None = None
        self._ever_connected = False
        self._auth_retry_ok = True
        self._fail_first = True
        self._background = False

    # ------------------------------------------------------------------ state
    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.ready

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _ready_link(self) -> Link | None:
        link = self._link
        return link if link is not None and link.ready and link.alive else None

    def _start_tasks(self, nursery: trio.Nursery) -> None:
        """Start the client's own background tasks beside the connection loop (none here)."""

    async def _aclose(self) -> None:
        await self._shutdown()

    @property
    def closing(self) -> bool:
        """True once the client is being closed."""
        return self._closing

    async def _wait_link(self) -> Link:
        while True:
            if self.error is not None:
                raise self.error
            if self._closing:
                raise ClientClosed("client closed")
            link = self._ready_link()
            if link is not None:
                return link
            await self._changed.wait()

    # ------------------------------------------------------------------ requests
    async def _start(self, link: Link, kind: str, body: Any, meta: Any = None) -> _Waiter:
        """Send one request on ``link``; the returned waiter resolves with its reply."""
        if not link.alive:
            raise ConnectionLost("not connected")
        rid = next(self._ids)
        waiter = _Waiter(kind, meta)
        link.waiters[rid] = waiter
        msg = pb.ClientMessage(request_id=rid)
        getattr(msg, kind).CopyFrom(body)
        data = msg.SerializeToString()
        waiter.sent_at = trio.current_time()
        try:
            await link.conn.send_message(data)
        except (tws.ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            link.waiters.pop(rid, None)
            link.alive = False  # no new request goes to this link; its tasks are ending
            link.fail(_Closed(1006, f"send failed: {describe(exc)}"))
            raise ConnectionLost("the connection dropped before the request was sent") from None
        self.stats.frames_out += 1
        return waiter

    async def _request(
        self, link: Link, kind: str, body: Any, meta: Any = None
    ) -> tuple[int, bytes]:
        waiter = await self._start(link, kind, body, meta)
        return await waiter.wait()

    # ------------------------------------------------------------------ the loop
    async def _token(self) -> str:
        src = self._token_source
        if isinstance(src, str):
            return src
        value = src()
        if not isinstance(value, str):
            value = await value
        return value

    async def _run(self) -> None:
        """Connect, serve the link, reconnect; returns when closed or on a fatal error."""
        provider = not isinstance(self._token_source, str)
        while not self._closing:
            err: BaseException | None = None
            try:
                await self._connect_once()
            except BaseException as exc:  # every failure of one link lands here, once
                if self._closing:
                    return
                err = unwrap(exc)
                if not isinstance(err, Exception):
                    raise  # cancelled (or KeyboardInterrupt): not ours to handle
            if self._closing:
                return
            now = trio.current_time()
            self.backoff.disconnected(now)
            if (isinstance(err, AuthenticationError) and provider and self._ever_connected
                    and self._auth_retry_ok):
                self._auth_retry_ok = False  # a token provider gets one more try, fresh token
                continue
            if isinstance(err, AuthenticationError | SessionReplaced):
                self._stop(err)
                return
            if err is not None and not isinstance(err, OSError | trio.TooSlowError | _Closed
                                                  | _Dead | tws.HandshakeError
                                                  | tws.ConnectionClosed | ssl.SSLError
                                                  | trio.BrokenResourceError
                                                  | trio.ClosedResourceError
                                                  | kernel.DecodeError | ConnectionLost
                                                  | ServerError):
                log.exception("seqactor client: unexpected error", exc_info=err)
            reason = describe(err) if err is not None else "connection ended"
            self.last_error = reason
            if self._fail_first and not self._ever_connected:
                self._stop(ConnectError(f"cannot connect to {self.url}: {reason}"))
                return
            if self._goaway_s is not None:
                delay = self.backoff.goaway_delay(self._goaway_s)
                self._goaway_s = None
            else:
                delay = self.backoff.next_delay()
            log.info("seqactor client: %s; reconnecting in %.2fs", reason, delay)
            await trio.sleep(delay)
        # closing

    def _stop(self, err: SeqactorError) -> None:
        self.error = err
        self._notify()
        self._on_fatal(err)

    def _on_fatal(self, err: SeqactorError) -> None:
        """Subclass hook: wake whatever waits on the client."""

    async def _connect_once(self) -> None:
        t = self.target
        self.stats.attempts += 1
        token = await self._token()
        async with trio.open_nursery() as nursery:
            with trio.fail_after(self.connect_timeout_s):
                tcp = await trio.open_tcp_stream(t.host, t.port)
                counting = _CountingStream(tcp, self.stats)
                stream: Any = counting
                if t.tls:
                    ctx = self._ssl or ssl.create_default_context()
                    stream = trio.SSLStream(counting, ctx, server_hostname=t.host)
                    await stream.do_handshake()
                with trio.CancelScope() as handshake:
                    counting.on_eof = handshake.cancel
                    conn = await tws.wrap_client_stream(
                        nursery, stream, t.host_header, t.resource,
                        message_queue_size=WS_QUEUE_FRAMES,
                        max_message_size=self.max_message_bytes,
                    )
                counting.on_eof = None
                if handshake.cancelled_caught:
                    raise _Closed(1006, "connection closed during the WebSocket handshake")
                try:
                    welcome = await self._hello(conn, token)
                except BaseException:
                    with trio.move_on_after(CLOSE_TIMEOUT_S) as cs:
                        cs.shield = True
                        await conn.aclose()
                    raise
            link = Link(conn, counting, welcome)
            self.user_id, self.role = welcome.user_id, welcome.role
            self.stats.connects += 1
            self._ever_connected = True
            self._auth_retry_ok = True
            self.backoff.connected(trio.current_time())
            self._link = link
            self._notify()
            try:
                with link.scope:
                    async with trio.open_nursery() as tasks:
                        tasks.start_soon(self._guard, link, self._heartbeat, link)
                        tasks.start_soon(self._guard, link, self._on_open, link)
                        await self._guard(link, self._read_loop, link)
            finally:
                link.alive = False
                self._link = None
                lost = ConnectionLost(
                    f"connection lost while the request was in flight ({self.last_error or ''})"
                )
                for waiter in link.waiters.values():
                    waiter.fail(lost)
                self._on_close(link)
                self._notify()
                with trio.move_on_after(CLOSE_TIMEOUT_S) as cs:
                    cs.shield = True
                    await conn.aclose()
                nursery.cancel_scope.cancel()
        if link.error is not None:
            raise link.error

    async def _guard(self, link: Link, fn: Callable[[Link], Awaitable[None]], arg: Link) -> None:
        try:
            await fn(arg)
        except Exception as exc:
            link.fail(unwrap(exc))

    async def _hello(self, conn: tws.WebSocketConnection, token: str) -> pb.Welcome:
        hello = pb.ClientMessage(
            request_id=next(self._ids),
            hello=pb.Hello(
                token=token, device_id=self.device_id, platform=self.platform,
                client_version=self.client_version,
            ),
        )
        await conn.send_message(hello.SerializeToString())
        self.stats.frames_out += 1
        while True:
            data = await self._next_frame(conn)
            _rid, field, body = kernel.split_server_message(data)
            if field == F_WELCOME:
                return pb.Welcome.FromString(body)
            if field == F_ERROR:
                err = pb.Error.FromString(body)
                if int(err.code) == int(ErrorCode.UNAUTHENTICATED):
                    raise AuthenticationError(f"authentication failed: {err.message}")
                raise server_error(err.code, err.message)
            if field == F_GOAWAY:
                self._goaway(pb.GoAway.FromString(body))

    async def _next_frame(self, conn: tws.WebSocketConnection) -> bytes:
        """The next binary frame (text frames are not part of the protocol and are skipped);
        a closed connection raises the error its close code means."""
        while True:
            try:
                data = await conn.get_message()
            except tws.ConnectionClosed as exc:
                raise self._closed_error(*close_info(exc)) from None
            if isinstance(data, bytes):
                self.stats.frames_in += 1
                return data

    def _closed_error(self, code: int | None, reason: str | None) -> Exception:
        if code == Close.AUTH_FAILED:
            return AuthenticationError(f"authentication failed: {reason or 'closed 4001'}")
        if code == Close.REPLACED:
            return SessionReplaced(reason or "session replaced by a newer one")
        return _Closed(code, reason)

    def _goaway(self, msg: pb.GoAway) -> None:
        self.stats.goaways += 1
        self._goaway_s = msg.reconnect_after_ms / 1000.0
        log.info("seqactor client: GoAway (%s), reconnect after %d ms",
                 msg.reason, msg.reconnect_after_ms)

    async def _read_loop(self, link: Link) -> None:
        conn = link.conn
        while True:
            data = await self._next_frame(conn)
            rid, field, body = kernel.split_server_message(data)
            size = len(data) + ws_header_len(len(data))
            if rid == 0:
                if field == F_UPDATE:
                    self.stats.pushes += 1
                    self._on_push(body, size)
                elif field == F_GOAWAY:
                    self._goaway(pb.GoAway.FromString(body))
                elif field == F_READ_COUNTS:
                    self._on_read_counts(body)
                elif field == F_ERROR:
                    err = pb.Error.FromString(body)
                    self.last_error = f"server error: {err.message}"
                    log.warning("seqactor client: server error %s", err.message)
                continue
            waiter = link.waiters.pop(rid, None)
            if waiter is None:
                continue  # a Pong, or the reply to an abandoned request
            self._on_reply(waiter, field, body, size)
            waiter.resolve(field, body, size)

    async def _heartbeat(self, link: Link) -> None:
        stream = link.stream
        while True:
            interval = link.heartbeat_s * (BACKGROUND_PING_FACTOR if self._background else 1.0)
            now = trio.current_time()
            dead_at = stream.last_rx + interval * DEAD_AFTER_FACTOR
            if now >= dead_at:
                raise _Dead(f"nothing received for {interval * DEAD_AFTER_FACTOR:.1f}s")
            ping_at = stream.last_tx + interval
            if now >= ping_at:
                msg = pb.ClientMessage(
                    request_id=next(self._ids), ping=pb.Ping(client_time_ms=trio_ms())
                )
                await link.conn.send_message(msg.SerializeToString())
                self.stats.frames_out += 1
                self.stats.pings_sent += 1
                continue
            await trio.sleep_until(min(ping_at, dead_at))

    # ------------------------------------------------------------------ subclass hooks
    async def _on_open(self, link: Link) -> None:
        link.ready = True
        self._notify()

    def _on_close(self, link: Link) -> None:
        pass

    def _on_push(self, body: bytes, size: int) -> None:
        pass

    def _on_read_counts(self, body: bytes) -> None:
        pass

    def _on_reply(self, waiter: _Waiter, field: int, body: bytes, size: int) -> None:
        pass

    # ------------------------------------------------------------------ closing
    async def _shutdown(self) -> None:
        self._closing = True
        link = self._link
        if link is not None:
            with trio.move_on_after(SHUTDOWN_CLOSE_TIMEOUT_S) as cs:
                cs.shield = True
                await link.conn.aclose(1000, "client closing")
        self._notify()


def trio_ms() -> int:
    import time

    return time.time_ns() // 1_000_000


# ---------------------------------------------------------------------------------- running


E = TypeVar("E", bound="_Endpoint")


@asynccontextmanager
async def connected(client: E, offline_ok: bool) -> AsyncIterator[E]:
    """``Client.connect`` / ``ServiceClient.connect``: run ``client`` around the caller's
    block, after its first connection unless ``offline_ok``."""
    client._fail_first = not offline_ok
    async with running(client, wait=not offline_ok):
        yield client


@asynccontextmanager
async def running(client: _Endpoint, wait: bool) -> AsyncIterator[None]:
    """Run the client's tasks around the caller's block; re-raise a fatal error at the end."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_supervise, client, nursery.cancel_scope)
            client._start_tasks(nursery)
            try:
                if wait:
                    await client._wait_link()
                yield
            finally:
                await client._aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        leaf = unwrap(group)
        if leaf is group:
            raise
        raise leaf from None
    if client.error is not None and not isinstance(client.error, ClientClosed):
        raise client.error


async def _supervise(client: _Endpoint, scope: trio.CancelScope) -> None:
    await client._run()
    if client.error is not None and not client._closing:
        scope.cancel()  # a fatal error ends the caller's block; raised after it
