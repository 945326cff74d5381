"""The server side of one WebSocket connection (RFC 6455) on wsproto's public API.

Modelled on hypercorn (``protocol/ws_stream.py``: its own upgrade handshake, then a public
``wsproto.connection.Connection`` for frames; ``trio/tcp_server.py``: one task reads and
feeds the protocol, and every byte written goes through one send path).

* **Handshake** (:func:`read_request_head`, :func:`parse_upgrade_request`,
  :func:`accept_response`, :func:`refusal_response`): sans-IO functions over bytes. The
  request head (request line + headers, at most ``MAX_REQUEST_HEAD_BYTES``) is parsed here,
  not by h11 through wsproto's ``H11Handshake``: measured on this machine, a full
  ``H11Handshake`` (request parse, accept, the ``Connection`` it hands over) costs ~86 µs and
  holds ~1.7 KB until dropped, h11's request parse alone ~24 µs, and this parser plus
  ``generate_accept_token`` ~2 µs. The server accepts only what it serves (``GET``, HTTP/1.1,
  ``Upgrade: websocket``, version 13, a 16-byte key; no extensions, no subprotocol), so the
  parser is small and strict; anything else gets a plain HTTP error and the connection ends.
* **Frames in**: a ``wsproto.connection.Connection`` parses what the socket delivers. An idle
  connection does not keep one: the connection is dropped whenever it provably holds nothing
  (every byte fed was consumed by complete frames, no message half-received) and a fresh one
  is made when bytes arrive (~4 µs; an idle session saves ~1.7 KB). Pings are answered as
  they are read; a Close is answered and ends the connection.
* **Frames out**: one send path. A binary frame (header + payload: no extension is ever
  negotiated) is written straight to the socket when it takes it without waiting
  (:meth:`ServerWebSocket.write_nowait`, the fan-out's direct writes); otherwise, and for
  control frames, under the connection's one lock (made when a send first has to wait: most
  idle sessions never make one). :class:`ActivityStream` holds the unsent rest of a partial
  direct write, which goes out before any other byte; once a Close frame has gone out
  (``close_sent``) nothing else is written.

Errors: the peer going away, a protocol error, an oversized message (close 1009) and our own
close all surface as :class:`ConnectionClosed` (``code``, ``reason``) from ``receive`` and
``send_message``; the handshake's refusals as :class:`HandshakeRefused` (an HTTP status).
"""

from __future__ import annotations

import base64
import binascii
import errno
import os
from dataclasses import dataclass
from http import HTTPStatus
from typing import ClassVar, Protocol

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage
from wsproto.utilities import generate_accept_token

from seqactor._frames import ws_binary_frame

MAX_REQUEST_HEAD_BYTES = 8_192  # request line + headers; beyond: 431
RECEIVE_BYTES = 65_536  # one read from the socket asks for at most this many bytes
WEBSOCKET_VERSION = b"13"  # RFC 6455; other versions get 426 naming this one
WEBSOCKET_KEY_BYTES = 16  # Sec-WebSocket-Key decodes to this many bytes
CONTROL_SEND_TIMEOUT_S = 5.0  # a pong or Close reply the socket does not take by then: drop
MASK_BYTES = 4  # every client frame is masked
SHORT_PAYLOAD_MAX = 125  # payload lengths up to this fit the first header bytes
MEDIUM_PAYLOAD_MAX = 65_535  # ... up to this take 2 more bytes, beyond 8 (RFC 6455 §5.2)

CLOSE_ABNORMAL = 1006  # the connection ended without a Close frame
CLOSE_TOO_BIG = 1009


class ConnectionClosed(Exception):
    """The WebSocket is closed: by the peer, by us, or the connection was lost.

    ``code`` is the close code (1006 when no Close frame was exchanged), ``reason`` its text.
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed ({code} {reason})")
        self.code = code
        self.reason = reason


class HandshakeRefused(Exception):
    """The upgrade request is refused with HTTP ``status`` (None: the peer went away first);
    ``message`` is the plain-text body, ``headers`` extra response headers."""

    def __init__(
        self, status: int | None, message: str = "", headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{status} {message}".strip())
        self.status = status
        self.message = message
        self.headers = headers


# --------------------------------------------------------------------------- handshake


@dataclass(slots=True)
class UpgradeRequest:
    """A valid WebSocket upgrade request: its target (path and query, as sent) and key."""

    target: str
    key: bytes

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip(b" \t").lower() for t in value.split(b",")}


def parse_upgrade_request(head: bytes) -> UpgradeRequest:
    """Parse an HTTP/1.1 request head (without the final blank line) as a WebSocket upgrade.

    Raises :class:`HandshakeRefused`: 400 for a malformed request or a missing/invalid
    ``Upgrade``, ``Connection`` or ``Sec-WebSocket-Key``; 405 for a method other than GET;
    426 (with ``Sec-WebSocket-Version: 13``) for another WebSocket version.
    """
    lines = head.split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or not request_line[1]:
        raise HandshakeRefused(400, "malformed request line")
    method, target, version = request_line
    if version != b"HTTP/1.1":
        raise HandshakeRefused(400, "a WebSocket upgrade needs HTTP/1.1")
    if method != b"GET":
        raise HandshakeRefused(405, "only GET upgrades to WebSocket", (("Allow", "GET"),))
    connection: set[bytes] = set()
    upgrade: set[bytes] = set()
    key: bytes | None = None
    ws_version: bytes | None = None
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name[-1:] in b" \t" or line[:1] in b" \t":
            raise HandshakeRefused(400, "malformed header line")
        name = name.lower()
        if name == b"connection":
            connection |= _tokens(value)
        elif name == b"upgrade":
            upgrade |= _tokens(value)
        elif name == b"sec-websocket-key":
            key = value.strip(b" \t")
        elif name == b"sec-websocket-version":
            ws_version = value.strip(b" \t")
    if b"upgrade" not in connection or b"websocket" not in upgrade:
        raise HandshakeRefused(400, "not a WebSocket upgrade request")
    if ws_version != WEBSOCKET_VERSION:
        raise HandshakeRefused(
            426, "WebSocket version 13 required",
            (("Sec-WebSocket-Version", WEBSOCKET_VERSION.decode()),),
        )
    try:
        if key is None or len(base64.b64decode(key, validate=True)) != WEBSOCKET_KEY_BYTES:
            raise ValueError("key")
    except (ValueError, binascii.Error):
        raise HandshakeRefused(400, "missing or invalid Sec-WebSocket-Key") from None
    return UpgradeRequest(target.decode("latin-1"), key)


def accept_response(key: bytes) -> bytes:
    """The 101 response accepting an upgrade with ``key`` (no extension, no subprotocol)."""
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + generate_accept_token(key) + b"\r\n\r\n"
    )


def refusal_response(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A complete HTTP response refusing the upgrade: ``status``, a plain-text body
    (``message`` and a newline), ``Connection: close``."""
    body = (message + "\n").encode()
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"Connection: close\r\n{extra}\r\n"
    ).encode() + body


async def read_request_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, bytes]:
    """Read until the blank line ending the request head; returns (head without it, the bytes
    after it). Raises :class:`HandshakeRefused` (431 beyond ``MAX_REQUEST_HEAD_BYTES``, None
    when the peer closes first)."""
    buf = b""
    while True:
        data = await stream.receive_some(MAX_REQUEST_HEAD_BYTES)
        if not data:
            raise HandshakeRefused(None, "peer closed during the handshake")
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            return buf[:end], buf[end + 4:]
        if len(buf) > MAX_REQUEST_HEAD_BYTES:
            raise HandshakeRefused(431, "request head too large")


# --------------------------------------------------------------------------- the stream


class DirectSink(Protocol):
    """Where the stream publishes its direct-write descriptor (the session's state)."""

    fd: int


class ActivityStream(trio.abc.Stream):
    """The connection's byte stream: records when bytes last arrived, holds the unsent rest
    of a direct write, and publishes the descriptor a push may be written to directly.

    It wraps either a plain TCP trio socket (read and written here directly: no
    ``trio.SocketStream`` per connection) or any trio stream (TLS: a ``trio.SSLStream``; a
    ``trio.SocketStream`` is taken apart into its socket).

    Every byte the server sends goes through :meth:`send_all` (under the connection's send
    lock) or a direct write while ``fd`` is published, and the socket is only ever closed
    through :meth:`aclose`. So ``fd`` — the plain TCP socket's descriptor while nothing is
    being sent, no unsent rest is held, no Close frame is going out or has gone out
    (:meth:`stop_direct`) and the stream is open, else -1 — is exact without asking the lock,
    wsproto or the socket on every push. It is copied to ``sink.fd`` (the session's state),
    which the fan-out reads per recipient.
    """

    __slots__ = (
        "inner", "last_rx", "held", "_tcp", "_fd_open", "_sending", "_closing", "sink",
    )

    def __init__(self, inner: trio.abc.Stream | trio.socket.SocketType) -> None:
        # A plain TCP connection's trio socket: read and written here directly.
        if isinstance(inner, trio.SocketStream):
            inner = inner.socket
        self._tcp = inner if isinstance(inner, trio.socket.SocketType) else None
        self.inner: trio.abc.Stream | None = None if self._tcp is not None else inner  # type: ignore[assignment]
        self.last_rx = trio.current_time()
        # The unsent rest of a frame written directly to the socket: it goes out before any
        # other byte, whoever writes next, so frames never interleave on the wire.
        self.held: bytes | None = None
        # Direct writes need the plain socket (TLS bytes go through the SSL stream).
        self._fd_open = self._tcp.fileno() if self._tcp is not None else -1
        self._sending = False
        self._closing = False  # a Close frame is going out (or the stream closed): no more frames
        self.sink: DirectSink | None = None

    @property
    def tcp(self) -> trio.socket.SocketType | None:
        """The plain TCP socket (None under TLS): the connection reads it directly."""
        return self._tcp

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

    def stop_direct(self) -> None:
        """No more direct writes, for good (a Close frame is about to go out)."""
        self._closing = True
        self._publish()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        tcp = self._tcp
        if tcp is None:
            assert self.inner is not None
            data: bytes | bytearray = await self.inner.receive_some(max_bytes)
        else:
            # What trio.SocketStream.receive_some does (try now, else wait until readable;
            # the same checkpoints and error translation), in this one frame: every idle
            # connection waits here, and trio's path holds four more frames and a context
            # manager while waiting (~1 KB a connection). The descriptor is read at every
            # attempt: a closed socket answers -1 (EBADF), never a reused number.
            size = RECEIVE_BYTES if max_bytes is None else max_bytes
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
        """Send the held rest (if any), then ``data``; callers hold the send lock."""
        self._sending = True
        self._publish()
        try:
            held = self.held
            if held is not None:
                self.held = None
                await self._send(held)
            if data:
                await self._send(data)
            elif held is None and self._tcp is not None and self._tcp.fileno() < 0:
                raise trio.ClosedResourceError("socket was already closed")
        finally:
            self._sending = False
            self._publish()

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        tcp = self._tcp
        if tcp is None:
            assert self.inner is not None
            await self.inner.send_all(data)
            return
        # What trio.SocketStream.send_all does: write what the socket takes, wait until it
        # is writable again, repeat; errors as trio's streams report them.
        await trio.lowlevel.checkpoint_if_cancelled()
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                n = _write(tcp.fileno(), view[sent:])
                if n is None:
                    await trio.lowlevel.wait_writable(tcp.fileno())
                else:
                    sent += n
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        if self._tcp is None:
            assert self.inner is not None
            await self.inner.wait_send_all_might_not_block()
        else:
            await trio.lowlevel.wait_writable(self._tcp.fileno())

    def close_now(self) -> None:
        """Close without waiting (a plain socket closes at once; a TLS stream's socket too,
        without close_notify). A task waiting to read or write gets ClosedResourceError."""
        self._fd_open = -1  # before the descriptor can be closed and its number reused
        self._closing = True
        self._publish()
        if self._tcp is not None:
            self._tcp.close()  # (trio's close wakes the tasks waiting on it)

    async def aclose(self) -> None:
        self.close_now()
        if self._tcp is not None:
            await trio.lowlevel.checkpoint()
        else:
            assert self.inner is not None
            await self.inner.aclose()


def _write(fd: int, data: memoryview) -> int | None:
    """One non-blocking write (None: the socket takes nothing now), errors as trio's streams
    report them."""
    try:
        return os.write(fd, data)
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise trio.ClosedResourceError("this socket was already closed") from None
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


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


def _client_frame_bytes(payload: int) -> int:
    """Wire size of a masked (client) frame with ``payload`` bytes (minimal length encoding,
    which wsproto enforces)."""
    if payload <= SHORT_PAYLOAD_MAX:
        return 2 + MASK_BYTES + payload
    if payload <= MEDIUM_PAYLOAD_MAX:
        return 4 + MASK_BYTES + payload
    return 10 + MASK_BYTES + payload


# --------------------------------------------------------------------------- the connection


class ServerWebSocket:
    """One open server-side WebSocket over an :class:`ActivityStream` (after the 101).

    ``receive`` returns whole messages (``bytes``, or ``str`` for a text message) of at most
    ``max_message_bytes``; larger ones close the connection with 1009. ``send_message`` sends
    one binary message; ``close`` sends a Close frame and waits for the peer's (the caller
    bounds the wait). One task receives at a time; any number may send. Closes are raised as
    ``closed_error(code, reason)`` (a subclass may name its own exception: no wrapper
    coroutine per call, which an idle connection would hold while it waits).
    """

    closed_error: ClassVar[type[Exception]] = ConnectionClosed

    __slots__ = (
        "stream", "max_message_bytes", "_ws", "_fed", "_used", "_frame_bytes", "_in_message",
        "_reusable", "_parts", "_parts_bytes", "_lock", "close_sent", "closed",
    )

    def __init__(self, stream: ActivityStream, max_message_bytes: int, trailing: bytes = b"") -> None:
        self.stream = stream
        self.max_message_bytes = max_message_bytes
        # The frame parser while bytes are in flight (None: idle, nothing buffered).
        self._ws: Connection | None = None
        self._fed = 0  # bytes given to ``_ws``
        self._used = 0  # ... of which complete frames account for
        self._frame_bytes = 0  # payload bytes so far of a frame not yet complete
        self._in_message = False  # a fragmented message has begun and not ended
        self._reusable = True  # False once ``_ws`` must be kept (text decoding, closing)
        self._parts: list[bytes | str] | None = None  # fragments of the message being read
        self._parts_bytes = 0
        # Made when a send first has to wait (then kept: a session whose socket filled once
        # is likely to again); an idle session that never waited holds none (~340 bytes).
        self._lock: trio.StrictFIFOLock | None = None
        self.close_sent = False  # a Close frame has been handed to the send path
        self.closed: tuple[int, str] | None = None  # (code, reason) once closed
        if trailing:
            self._feed(trailing)

    @property
    def parsing(self) -> bool:
        """A frame parser is held (bytes of an unfinished frame or message are in flight, or
        the connection is closing); False while idle."""
        return self._ws is not None

    # ---------------------------------------------------------------- receiving
    def _parser(self) -> Connection:
        ws = self._ws
        if ws is None:
            ws = self._ws = Connection(ConnectionType.SERVER)
            self._fed = self._used = 0
        return ws

    def _feed(self, data: bytes) -> None:
        ws = self._parser()
        self._fed += len(data)
        ws.receive_data(data)

    def _idle(self) -> bool:
        """The parser provably holds nothing: a fresh one would behave the same."""
        return (
            self._reusable and not self._in_message and not self._frame_bytes
            and self._used == self._fed
        )

    async def receive(self) -> bytes | str:
        """The next message. Raises :class:`ConnectionClosed` when the connection closes."""
        while True:
            if self._ws is not None:  # (no local name for it: it would outlive the drop)
                message = await self._next_message(self._ws)
                if message is not None:
                    return message
                if self._idle():
                    self._ws = None
            if self.closed is not None:
                raise self.closed_error(*self.closed)
            stream = self.stream
            tcp = stream.tcp
            data: bytes | bytearray | None
            try:
                if tcp is None:
                    data = await stream.receive_some(RECEIVE_BYTES)
                else:
                    # ActivityStream.receive_some's plain-TCP read, inlined: every idle
                    # connection waits here, and a call would hold one coroutine frame more.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    data = _read(tcp.fileno(), RECEIVE_BYTES)
                    if data is None:
                        while data is None:
                            await trio.lowlevel.wait_readable(tcp.fileno())
                            data = _read(tcp.fileno(), RECEIVE_BYTES)
                    else:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    stream.last_rx = trio.current_time()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._lost("connection lost")
            self._feed(bytes(data))

    async def _next_message(self, ws: Connection) -> bytes | str | None:
        """Handle the parsed events up to the next complete message (None: none yet)."""
        for event in ws.events():
            if isinstance(event, BytesMessage | TextMessage):
                data: bytes | str
                if isinstance(event, TextMessage):
                    self._reusable = False  # its decoder may hold part of a character
                    data = event.data
                    size = len(data.encode())
                else:
                    data = bytes(event.data)  # (already bytes: no copy)
                    size = len(data)
                self._frame_bytes += size
                if event.frame_finished:
                    self._used += _client_frame_bytes(self._frame_bytes)
                    self._frame_bytes = 0
                self._in_message = not event.message_finished
                if self.close_sent:
                    continue  # waiting for the peer's Close: data is dropped
                if self._parts_bytes + size > self.max_message_bytes:
                    await self._fail(CLOSE_TOO_BIG, "message larger than max_frame_bytes")
                if event.message_finished and self._parts is None:
                    return self._deliver(data)
                if self._parts is None:
                    self._parts = []
                self._parts.append(data)
                self._parts_bytes += size
                if event.message_finished:
                    parts, self._parts, self._parts_bytes = self._parts, None, 0
                    if isinstance(data, str):
                        return "".join(p for p in parts if isinstance(p, str))
                    return self._deliver(b"".join(p for p in parts if isinstance(p, bytes)))
            elif isinstance(event, Ping):
                self._used += _client_frame_bytes(len(event.payload))
                if not self.close_sent:
                    await self._send_control(ws.send(event.response()))
            elif isinstance(event, Pong):
                self._used += _client_frame_bytes(len(event.payload))
            elif isinstance(event, CloseConnection):
                self._reusable = False
                code, reason = int(event.code), event.reason or ""
                state = ws.state
                if state is ConnectionState.REMOTE_CLOSING:  # the peer began closing
                    self.close_sent = True
                    self.stream.stop_direct()
                    self.closed = (code, reason)
                    await self._send_control(ws.send(event.response()))
                elif state is ConnectionState.CLOSED:  # the peer answered our Close
                    self.closed = (code, reason)
                else:  # a protocol error: wsproto names the close code
                    await self._fail(code, reason)
                raise self.closed_error(code, reason)
        return None

    def _deliver(self, message: bytes | str) -> bytes | str:
        """A complete message: the parser goes now if it holds nothing more (the session may
        then stay idle for long)."""
        if self._idle():
            self._ws = None
        return message

    def _lost(self, reason: str) -> None:
        """The byte stream ended or broke without a Close frame."""
        self.stream.stop_direct()
        self.close_sent = True
        if self.closed is None:
            self.closed = (CLOSE_ABNORMAL, reason)
        raise self.closed_error(*self.closed)

    async def _fail(self, code: int, reason: str) -> None:
        """Close with ``code`` now (no wait for the peer's Close) and raise."""
        if not self.close_sent:
            await self._send_close(code, reason)
        self.closed = (code, reason)
        raise self.closed_error(code, reason)

    # ---------------------------------------------------------------- sending
    def write_nowait(self, payload: bytes) -> bytes | None:
        """Write one binary message now if the socket takes it: None = not possible (use
        :meth:`send_message`), b"" = written, else the framed bytes still to go (held by the
        stream: :meth:`flush` sends them)."""
        fd = self.stream.fd
        if fd < 0:
            return None
        raw = ws_binary_frame(payload)
        try:
            n = os.write(fd, raw)
        except BlockingIOError:
            n = 0
        except OSError:
            return None  # the locked send meets the error and reports it
        rest = raw[n:]
        if rest:
            self.stream.hold(rest)
        return rest

    async def _locked_send(self, data: bytes) -> None:
        """The one send path for anything that may wait: the held rest, then ``data``."""
        lock = self._lock
        if lock is None:
            lock = self._lock = trio.StrictFIFOLock()
        try:
            async with lock:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.stream.stop_direct()
            self.close_sent = True
            if self.closed is None:
                self.closed = (CLOSE_ABNORMAL, "connection lost")
            raise self.closed_error(*self.closed) from None

    async def send_message(self, frame: bytes) -> None:
        """Send one binary message. Raises :class:`ConnectionClosed` once closed."""
        if self.close_sent:
            raise self.closed_error(*(self.closed or (CLOSE_ABNORMAL, "closing")))
        await trio.lowlevel.checkpoint_if_cancelled()
        rest = self.write_nowait(frame)
        if rest == b"":
            return  # written (no yield to the scheduler: a session writes a bounded outbox)
        await self._locked_send(ws_binary_frame(frame) if rest is None else b"")

    async def send_raw(self, data: bytes) -> None:
        """Send bytes that are not a data frame (the 101 response): written at once when the
        socket takes them all (no scheduler round trip), else through the send path."""
        fd = self.stream.fd
        if fd >= 0:
            try:
                n = os.write(fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                n = 0  # the locked send meets the error and reports it
            if n == len(data):
                return
            data = data[n:]
        await self._locked_send(data)

    async def flush(self) -> None:
        """Send the held rest of a direct write (nothing if it already went out)."""
        await self._locked_send(b"")

    async def _send_control(self, data: bytes) -> None:
        """A pong or Close reply: it must not be cut short by a cancellation (a half-sent
        frame would corrupt the stream), nor wait forever on a peer that does not read."""
        with trio.move_on_after(CONTROL_SEND_TIMEOUT_S) as scope:
            scope.shield = True
            await self._locked_send(data)
        if scope.cancelled_caught:
            await trio.aclose_forcefully(self.stream)
            self._lost("write timeout")

    async def _send_close(self, code: int, reason: str) -> None:
        self._reusable = False
        data = self._parser().send(CloseConnection(code=code, reason=reason))
        self.close_sent = True
        self.stream.stop_direct()
        await self._send_control(data)

    async def close(self, code: int, reason: str) -> None:
        """Send a Close frame (``code``, ``reason``: wsproto truncates it to 123 bytes) and
        wait for the peer's; the caller bounds the wait. Quiet if already closed."""
        try:
            if not self.close_sent:
                await self._send_close(code, reason)
            while self.closed is None:
                await self.receive()  # data is dropped until the peer's Close
        except self.closed_error:
            pass
